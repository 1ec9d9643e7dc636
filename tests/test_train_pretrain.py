"""Pretraining: example construction (matching, QA labels, targets) and every task subset end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import synthetic_data

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.data.pretrain import IGNORE, PretrainExamples
from lxmert_bench.data.tasks import PretrainCorpus
from lxmert_bench.model import LxmertConfig, LxmertForPretraining
from lxmert_bench.model.weights import load_weights
from lxmert_bench.store import RunDir
from lxmert_bench.train.common import load_tokenizer
from lxmert_bench.train.loop import example_rng
from lxmert_bench.train.stages import run_stage

SPLITS = ("mscoco_train", "mscoco_nominival", "vgnococo")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(data) -> PretrainCorpus:
    return PretrainCorpus(data.root, SPLITS)


def examples(corpus, data, **kw) -> PretrainExamples:
    return PretrainExamples(corpus, load_tokenizer(data), **kw)


def build(ex: PretrainExamples, n: int = 400, epoch: int = 0) -> list[dict]:
    return [ex.example(i % len(ex), epoch, example_rng(0, 0, epoch, i)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
def test_examples_are_functions_of_their_coordinates(corpus, data):
    ex = examples(corpus, data)
    a = ex.example(5, 1, example_rng(0, 0, 1, 5))
    b = ex.example(5, 1, example_rng(0, 0, 1, 5))
    c = ex.example(5, 2, example_rng(0, 0, 2, 5))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_qa_labels_only_on_matched_pairs(corpus, data):
    ex = examples(corpus, data)
    items = build(ex, 600)
    matched = np.array([int(e["matched_label"]) for e in items])
    ans = np.array([int(e["ans"]) for e in items])
    assert 0.4 < matched.mean() < 0.6  # negatives with p = 0.5
    assert (ans[matched == 0] == IGNORE).all()
    assert (ans[matched == 1] != IGNORE).sum() > 50
    # a labelled sentence gets one of its own answers
    for i, e in enumerate(items):
        entry = corpus.entries[i % len(corpus)]
        if e["ans"] != IGNORE:
            assert corpus.answer_table.label2ans(int(e["ans"])) in entry["label"]
    # a mismatched pair carries a sentence of another image
    tok = load_tokenizer(data)
    for i, e in enumerate(items[:200]):
        entry = corpus.entries[i]
        own = tok.encode(entry["sent"])[0]
        if e["matched_label"] == 0:
            same_image = [x["sent"] for x in corpus.entries if x["img_id"] == entry["img_id"]]
            assert all(tok.encode(s)[0] != list(e["input_ids"]) for s in same_image
                       if not (e["masked_lm_labels"] != IGNORE).any())
        elif not (e["masked_lm_labels"] != IGNORE).any():
            assert list(e["input_ids"]) == own


def test_switched_off_tasks_change_nothing_with_mask_inactive_none(corpus, data):
    # the default masks them as the official code does: tests/test_official_inputs.py
    ex = examples(corpus, data, mask_lm=False, matched=False, visual_losses=(), qa=False,
                  mask_inactive="none")
    tok = load_tokenizer(data)
    for i, e in enumerate(build(ex, 100)):
        entry = corpus.entries[i]
        img = corpus.features(entry["img_id"])
        assert e["matched_label"] == 1 and e["ans"] == IGNORE
        assert (e["masked_lm_labels"] == IGNORE).all() and list(e["input_ids"]) == tok.encode(entry["sent"])[0]
        assert np.array_equal(e["feats"], img["features"]) and not e["feat_mask"].any()
        assert "obj_labels" not in e and "feat_labels" not in e


def test_visual_targets_and_label_weights(corpus, data):
    conf = examples(corpus, data, label_targets="all_confidence")
    masked = examples(corpus, data, label_targets="masked")
    for i, (a, b) in enumerate(zip(build(conf, 60), build(masked, 60))):
        img = corpus.features(corpus.entries[i]["img_id"])
        assert np.array_equal(a["boxes"], img["boxes"])  # boxes are never masked
        assert np.array_equal(a["feat_labels"], img["features"])  # the feature target is unmasked
        assert np.array_equal(a["obj_labels"], img["objects_id"])
        assert np.array_equal(a["obj_weights"], img["objects_conf"])  # official: all boxes
        assert np.array_equal(a["attr_weights"], img["attrs_conf"])
        assert np.array_equal(b["obj_weights"], b["feat_mask"])  # paper: masked boxes only
        # masked objects differ from the original unless kept (10%)
        assert (a["feats"][a["feat_mask"] == 0] == img["features"][a["feat_mask"] == 0]).all()


def test_qa_labels_wait_for_their_epoch(corpus, data):
    ex = examples(corpus, data, qa_from_epoch=1)
    assert all(e["ans"] == IGNORE for e in build(ex, 200, epoch=0))
    assert any(e["ans"] != IGNORE for e in build(ex, 200, epoch=1))


# ---------------------------------------------------------------------------------------------
def pretrain_config(data: DataConfig, **kw) -> RunConfig:
    optim = kw.pop("optim", OptimConfig(batch_size=16, epochs=1, max_steps=2))
    return RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"),
                     data=DataConfig(**{**data.__dict__, "image_limit": kw.pop("image_limit", 6)}),
                     pretrain=PretrainConfig(optim=optim, **kw), log_every=1, checkpoint_every=100,
                     device="cpu")


def run(workdir: Path, cfg: RunConfig) -> tuple[dict, RunDir]:
    rd = RunDir(workdir, cfg.stage_id)
    rd.write_config(cfg)
    return run_stage(rd), rd


def read_log(rd: RunDir) -> list[dict]:
    return [json.loads(line) for line in rd.log_path.read_text().splitlines()]


SUBSETS = {
    "all": dict(),
    "no-visual": dict(visual_losses=()),
    "mlm": dict(matched=False, visual_losses=(), qa=False),
    "matched": dict(mask_lm=False, visual_losses=(), qa=False),
    "obj": dict(mask_lm=False, matched=False, visual_losses=("obj",), qa=False),
    "attr": dict(mask_lm=False, matched=False, visual_losses=("attr",), qa=False),
    "feat": dict(mask_lm=False, matched=False, visual_losses=("feat",), qa=False),
    "qa": dict(mask_lm=False, matched=False, visual_losses=(), qa=True),
}
EXPECTED = {
    "all": ["mlm", "matched", "obj", "attr", "feat", "qa"],
    "no-visual": ["mlm", "matched", "qa"],
    "mlm": ["mlm"], "matched": ["matched"], "obj": ["obj"], "attr": ["attr"], "feat": ["feat"],
    "qa": ["qa"],
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_every_task_subset_runs(tmp_path, data, subset):
    cfg = pretrain_config(data, **SUBSETS[subset])
    result, rd = run(tmp_path, cfg)
    tasks = EXPECTED[subset]
    assert result["tasks"] == tasks
    assert set(result["metrics"]) == {"loss", *tasks}
    assert result["metrics"]["loss"] == pytest.approx(sum(result["metrics"][t] for t in tasks))
    assert all(np.isfinite(v) for v in result["metrics"].values())
    steps = [r for r in read_log(rd) if "losses" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(set(r["losses"]) == set(tasks) for r in steps)
    # model.pt holds the official names and loads back into a model with the same heads
    state = torch.load(rd.checkpoint_dir / "model.pt", weights_only=True)
    assert "module.bert.embeddings.word_embeddings.weight" in state  # official layout
    assert ("module.obj_predict_head.decoder_dict.feat.weight" in state) == ("feat" in tasks)
    assert any(k.startswith("module.answer_head.") for k in state) == ("qa" in tasks)
    p = cfg.pretrain
    again = LxmertForPretraining(
        LxmertConfig.preset("test", num_qa_labels=result["num_qa_labels"]), visual_losses=p.visual_losses,
        mask_lm=p.mask_lm, matched=p.matched, qa=p.qa)
    assert load_weights(again, rd.checkpoint_dir / "model.pt", strict=True).missing == []


def test_qa_starts_at_its_epoch(tmp_path, data):
    cfg = pretrain_config(data, qa_start=0.5, image_limit=2,
                          optim=OptimConfig(batch_size=32, epochs=2))
    result, rd = run(tmp_path, cfg)
    assert result["qa_start_epoch"] == 2
    steps = [r for r in read_log(rd) if "losses" in r]
    assert {r["epoch"] for r in steps} == {1, 2}
    assert all(("qa" in r["losses"]) == (r["epoch"] == 2) for r in steps)


def test_no_task_at_all_is_refused(tmp_path, data):
    cfg = pretrain_config(data, mask_lm=False, matched=False, visual_losses=(), qa=False)
    with pytest.raises(ValueError, match="every task is off"):
        run(tmp_path, cfg)
    assert "every task is off" in RunDir(tmp_path, cfg.stage_id).read_error()["error"]


def test_absurd_lr_stops_with_error_json_naming_the_step(tmp_path, data):
    cfg = pretrain_config(data, optim=OptimConfig(batch_size=16, epochs=1, max_steps=6, lr=1e30, warmup=0.0))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d"):
        run(tmp_path, cfg)
    err = RunDir(tmp_path, cfg.stage_id).read_error()
    assert err["type"] == "NonFiniteLoss" and err["step"] >= 2
    assert f"step {err['step']}" in err["error"]
    assert not RunDir(tmp_path, cfg.stage_id).is_done()


def test_finished_stage_is_never_redone(tmp_path, data):
    cfg = pretrain_config(data, visual_losses=(), qa=False)
    result, rd = run(tmp_path, cfg)
    before = rd.result_path.stat().st_mtime_ns, rd.log_path.read_text()
    again, _ = run(tmp_path, cfg)
    assert again == result
    assert (rd.result_path.stat().st_mtime_ns, rd.log_path.read_text()) == before
