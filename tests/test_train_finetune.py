"""Fine-tuning end to end (VQA, GQA, NLVR2), starting weights, and the BERT-init path (Table 3)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lxmert_bench.config import (
    TASK_DEFAULTS,
    BertConfig,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
)
from lxmert_bench.data.answers import AnswerTable, load_task_answers
from lxmert_bench.data.root import ensure_data_root
from lxmert_bench.model import LxmertConfig, LxmertForQuestionAnswering
from lxmert_bench.model.weights import canonical_state_dict
from lxmert_bench.store import RunDir
from lxmert_bench.train.finetune import build_model, initialise, load_qa_head
from lxmert_bench.train.stages import run_stage

RESULT_KEYS = {
    "stage_id", "kind", "config_hash", "seed", "task", "metrics", "last_metrics", "best_epoch",
    "history", "predictions", "steps", "samples", "samples_per_s", "timings", "device", "num_gpus",
    "gpu_hours", "precision", "versions", "data_fingerprint", "code_version", "finished_at",
}
METRIC_KEYS = {"vqa": {"accuracy"}, "gqa": {"accuracy"}, "nlvr2": {"accuracy", "consistency"}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def data(workdir) -> DataConfig:
    cfg = DataConfig(root=str(workdir / "data" / "syn"), synthetic=True, synthetic_images=120,
                     fingerprint="synthetic-test")
    ensure_data_root(cfg)
    return cfg


def run(workdir: Path, cfg: RunConfig) -> tuple[dict, RunDir]:
    rd = RunDir(workdir, cfg.stage_id)
    rd.write_config(cfg)
    return run_stage(rd), rd


@pytest.fixture(scope="module")
def pretrained(workdir, data) -> RunConfig:
    cfg = RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"),
                    data=replace(data, image_limit=6),
                    pretrain=PretrainConfig(optim=OptimConfig(batch_size=16, epochs=1, max_steps=2)),
                    log_every=1, checkpoint_every=100, device="cpu")
    run(workdir, cfg)
    return cfg


def finetune_config(data: DataConfig, task: str, init_from: str | None, **kw) -> RunConfig:
    ft = replace(TASK_DEFAULTS[task], optim=OptimConfig(batch_size=16, epochs=2, max_steps=3,
                                                       lr=1e-3, warmup=0.1, grad_clip=5.0), **kw)
    return RunConfig(kind="finetune", seed=0, model=LxmertConfig.preset("test"), data=data,
                     finetune=ft, init_from=init_from, log_every=1, checkpoint_every=100,
                     device="cpu", code_version="test")


@pytest.mark.parametrize("task", ["vqa", "gqa", "nlvr2"])
def test_finetune_writes_result_and_official_predictions(workdir, data, pretrained, task):
    result, rd = run(workdir, finetune_config(data, task, pretrained.stage_id))
    assert RESULT_KEYS <= set(result)
    assert result["task"] == task and result["kind"] == "finetune" and result["init"] == pretrained.stage_id
    assert METRIC_KEYS[task] <= set(result["metrics"])
    assert all(0 <= v <= 100 for v in result["metrics"].values())
    assert result["best_epoch"] in {h["epoch"] for h in result["history"]}
    best = next(h for h in result["history"] if h["epoch"] == result["best_epoch"])
    assert best["metrics"] == result["metrics"]
    assert result["last_metrics"] == result["history"][-1]["metrics"]
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["gpu_hours"] == 0
    assert result["data_fingerprint"] == "synthetic-test" and result["code_version"] == "test"
    assert json.loads(rd.result_path.read_text()) == result
    assert (rd.checkpoint_dir / "best.pt").is_file() and (rd.checkpoint_dir / "last.pt").is_file()

    dev_file = rd.path / result["predictions"]["dev"]
    scores = json.loads((rd.path / result["predictions"]["scores"]).read_text())
    dev = json.loads((Path(data.root) / task / f"{TASK_DEFAULTS[task].valid_split}.json").read_text())
    if task == "vqa":
        rows = json.loads(dev_file.read_text())
        assert all(set(r) == {"question_id", "answer"} and isinstance(r["question_id"], int) for r in rows)
        ids = {str(d["question_id"]) for d in dev}
        assert {str(r["question_id"]) for r in rows} == ids
        # a question's score is the soft score of the predicted answer
        labels = {str(d["question_id"]): d["label"] for d in dev}
        assert all(scores[str(r["question_id"])] == labels[str(r["question_id"])].get(r["answer"], 0)
                   for r in rows)
    elif task == "gqa":
        rows = json.loads(dev_file.read_text())
        assert all(set(r) == {"questionId", "prediction"} and isinstance(r["questionId"], str) for r in rows)
        ids = {d["question_id"] for d in dev}
        assert {r["questionId"] for r in rows} == ids
    else:
        rows = list(csv.reader(dev_file.read_text().splitlines()))
        assert all(len(r) == 2 and r[1] in ("True", "False") for r in rows)
        ids = {d["identifier"] for d in dev}
        assert {r[0] for r in rows} == ids
    assert set(scores) == ids and all(0 <= v <= 1 for v in scores.values())
    assert 100 * sum(scores.values()) / len(scores) == pytest.approx(result["metrics"]["accuracy"])


def test_qa_head_rows_are_transferred_and_unmapped_rows_zeroed(workdir, data, pretrained):
    source = RunDir(workdir, pretrained.stage_id).checkpoint_dir / "model.pt"
    _, label2ans = load_task_answers(data.root, "vqa")
    label2ans = [*label2ans, "no such answer"]  # one answer the pretraining table lacks
    table = AnswerTable.from_root(data.root)
    model = LxmertForQuestionAnswering(LxmertConfig.preset("test"), len(label2ans))
    info = load_qa_head(model, source, label2ans, table)
    assert info["unmapped"] >= 1 and info["mapped"] >= 1
    pre = canonical_state_dict(source).tensors
    w, b = model.logit_fc[3].weight, model.logit_fc[3].bias
    assert torch.equal(model.logit_fc[0].weight, pre["answer_head.logit_fc.0.weight"])
    for row, ans in enumerate(label2ans):
        if ans == "no such answer":
            assert not w[row].any() and b[row] == 0
        elif table.used(AnswerTable.convert_ans(ans)):
            src = table.ans2label(AnswerTable.convert_ans(ans))
            assert torch.equal(w[row], pre["answer_head.logit_fc.3.weight"][src])


def test_a_checkpoint_without_encoder_weights_is_an_error_naming_it(workdir, data, pretrained,
                                                                   tmp_path):
    source = RunDir(workdir, pretrained.stage_id).checkpoint_dir / "model.pt"
    stripped = {k: v for k, v in canonical_state_dict(source).tensors.items()
                if ".encoder.layer." not in k and ".r_layers." not in k and ".x_layers." not in k}
    path = tmp_path / "no_encoder.pt"
    torch.save(stripped, path)
    cfg = finetune_config(data, "nlvr2", None)
    cfg = replace(cfg, finetune=replace(cfg.finetune, init_checkpoint=str(path)))
    rd = RunDir(tmp_path, cfg.stage_id)
    with pytest.raises(ValueError, match=r"no_encoder\.pt: no language-encoder weight was loaded "
                                         r"\(\w+ checkpoint\)"):
        initialise(build_model(cfg, None), cfg, rd, None)


def test_missing_dependency_is_an_error_naming_it(workdir, data):
    cfg = finetune_config(data, "nlvr2", "pretrain/000000000000")
    with pytest.raises(FileNotFoundError, match="pretrain/000000000000"):
        run(workdir, cfg)
    assert "000000000000" in RunDir(workdir, cfg.stage_id).read_error()["error"]


def test_bert_stage_then_pretraining_and_finetuning_from_it(workdir, data):
    """Table 3 offline: a text-only BERT stage; 'Pre-train + BERT' and 'Train + BERT' start from it."""
    bert_model = LxmertConfig.preset("test", l_layers=3, x_layers=0, r_layers=0)
    bert_cfg = RunConfig(kind="bert", seed=0, model=bert_model, data=replace(data, image_limit=6),
                         bert=BertConfig(optim=OptimConfig(batch_size=16, epochs=1, max_steps=2)),
                         log_every=1, checkpoint_every=100, device="cpu")
    result, rd = run(workdir, bert_cfg)
    assert set(result["metrics"]) == {"loss", "mlm"}
    state = torch.load(rd.checkpoint_dir / "model.pt", weights_only=True)
    assert "bert.encoder.layer.2.attention.self.query.weight" in state  # HF BERT names
    assert "cls.predictions.bias" in state and not any("visn" in k for k in state)

    for layers, first in (("bottom", 0), ("top", 1)):
        pre_cfg = RunConfig(
            kind="pretrain", seed=0, model=LxmertConfig.preset("test"), data=replace(data, image_limit=6),
            pretrain=PretrainConfig(init="bert", bert_layers=layers,
                                    optim=OptimConfig(batch_size=16, epochs=1, max_steps=1, lr=0.0)),
            init_from=bert_cfg.stage_id, log_every=1, checkpoint_every=100, device="cpu")
        pre, pre_rd = run(workdir, pre_cfg)
        assert pre["init"].endswith("model.pt")
        # lr 0: after one step only decoupled decay (x (1 - 0)) touched the weights: layer 0 = BERT layer `first`
        loaded = torch.load(pre_rd.checkpoint_dir / "model.pt", weights_only=True)
        key = "module.bert.encoder.layer.0.attention.self.query.weight"  # official LXRT layout
        assert torch.equal(loaded[key], state[f"bert.encoder.layer.{first}.attention.self.query.weight"])

    ft_cfg = finetune_config(data, "nlvr2", bert_cfg.stage_id, bert_layers="top")
    ft, _ = run(workdir, ft_cfg)
    assert ft["init"] == bert_cfg.stage_id and ft["loaded_tensors"] > 0


def test_data_augmentation_adds_other_sources_questions(data):
    from lxmert_bench.data.tasks import PretrainCorpus, VQADataset
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.finetune import AugmentedQA

    tok = load_tokenizer(data)
    vqa = VQADataset(data.root, ["train"], tok)
    corpus = PretrainCorpus(data.root, ("mscoco_train", "mscoco_nominival", "vgnococo"))
    aug = AugmentedQA(vqa, corpus, "vqa", tok)
    assert len(aug) > len(vqa)
    assert all(e["source"] not in ("vqa", "mscoco") for e, _ in aug.extra)
    item = aug[len(vqa)]
    entry, label = aug.extra[0]
    assert item["question_id"] == entry["uid"] and item["target"].sum() > 0
    assert {vqa.label2ans[i] for i in item["target"].nonzero().flatten().tolist()} == set(label)
    assert set(item) == set(vqa[0])


def test_float16_feature_stores_are_used_when_configured(workdir, data):
    """data.feature_dtype reaches the datasets: the run reads half-precision stores beside fp32 ones."""
    half = replace(data, feature_dtype="float16")
    result, rd = run(workdir, finetune_config(half, "nlvr2", None))
    assert rd.is_done() and 0.0 <= result["metrics"]["accuracy"] <= 100.0
    stores = Path(data.root) / ".stores"
    assert any(p.name.endswith(".float16") for p in stores.rglob("*.float16")), sorted(stores.rglob("*"))
