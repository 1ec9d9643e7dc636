"""Gradient accumulation (issue 13): ``optim.micro_batch_size`` makes up the global batch from
micro-batches, the same update as the whole batch at once; under DDP the ranks accumulate without
all-reducing (``no_sync``) until the last micro-step; the token-averaged losses (MLM, QA) divide
by the global batch's label counts on every micro-step; a micro-batch that does not divide the
batch is refused before anything runs (exit 2) and by the loop."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from _helpers import free_port, synthetic_data
from test_train_loop import ToyData, make_model, read_log, settings, step

from lxmert_bench.cli import main
from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, accumulation_problem
from lxmert_bench.data.tasks import PretrainCorpus
from lxmert_bench.model import LxmertConfig, LxmertForPretraining
from lxmert_bench.model.bert import BertForMaskedLM
from lxmert_bench.train import bert as bert_stage
from lxmert_bench.train.common import load_tokenizer
from lxmert_bench.train.loop import setup_distributed, teardown_distributed, train
from lxmert_bench.train.pretrain import label_counts, make_examples, pretrain_forward

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIM = OptimConfig(lr=1e-2, batch_size=8, epochs=2, warmup=0.1)


def _same_parameters(a: torch.nn.Module, b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b[k], atol=atol, rtol=1e-5), k


def test_micro_batches_give_the_update_of_the_whole_batch(tmp_path):
    whole = make_model(dropout=0.0)
    train(whole, ToyData(), step, settings(tmp_path / "whole", optim=OPTIM))
    micro = make_model(dropout=0.0)
    train(micro, ToyData(), step,
          settings(tmp_path / "micro", optim=replace(OPTIM, micro_batch_size=2)))
    _same_parameters(micro, whole.state_dict())
    # the logged losses are the whole batch's means too
    for a, b in zip(read_log(tmp_path / "whole" / "log.jsonl"),
                    read_log(tmp_path / "micro" / "log.jsonl")):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # ... and they are not the update of one micro-batch (the test can fail)
    small = make_model(dropout=0.0)
    train(small, ToyData(), step, settings(tmp_path / "small", optim=replace(OPTIM, batch_size=2)))
    assert not torch.allclose(small.lin.weight, whole.lin.weight, atol=1e-3)


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused(tmp_path):
    assert accumulation_problem(256, 64) is None and accumulation_problem(256, None) is None
    assert "does not divide the per-process batch 64" in accumulation_problem(256, 48, 4)
    assert "must be positive" in accumulation_problem(256, 0)
    with pytest.raises(ValueError, match=r"optim.micro_batch_size=3 does not divide batch_size 8"):
        train(make_model(), ToyData(), step,
              settings(tmp_path, optim=replace(OPTIM, micro_batch_size=3)))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_plan_refuses_micro_batches_that_do_not_divide_the_batch(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "accum", "tasks": ["vqa"], "seeds": [0],
        "variants": {"A": {"pretrain": {"optim": {"micro_batch_size": 5}}}}}))
    assert main(["plan", str(spec), "--profile", "test", "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert "pretrain.optim.micro_batch_size=5 does not divide batch_size" in err
    assert "Traceback" not in err


# --- the token-averaged pretraining losses ---------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return synthetic_data(tmp_path_factory).root


class _Fixed:
    """The same batches every epoch, drawn once (TrainData)."""

    def __init__(self, items: list[dict], collate):
        self.items, self._collate = items, collate

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index, epoch, rng):
        return self.items[index]

    def collate(self, examples):
        return self._collate(examples)


def _pretrain_data(root: str) -> tuple[_Fixed, int]:
    corpus = PretrainCorpus(root, ("mscoco_train", "mscoco_nominival", "vgnococo"))
    examples = make_examples(PretrainConfig(), corpus, load_tokenizer(DataConfig(root=root)), 0)
    import numpy as np

    items = [examples.example(i, 0, np.random.default_rng(i)) for i in range(32)]
    return _Fixed(items, examples.collate), len(corpus.answer_table)


def _pretrain_model(num_answers: int) -> LxmertForPretraining:
    torch.manual_seed(0)
    config = LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 num_qa_labels=num_answers)
    return LxmertForPretraining(config, num_answers=num_answers)


def _pretrain_step(m, batch, epoch, denominators=None):
    return pretrain_forward(m, batch, PretrainConfig(), True, 1.0, denominators)


def test_pretraining_micro_batches_normalise_by_the_whole_batch_label_counts(root, tmp_path):
    data, num_answers = _pretrain_data(root)
    optim = OptimConfig(lr=1e-3, batch_size=16, epochs=1, max_steps=2)
    runs = {}
    for name, micro, counts in (("whole", None, label_counts), ("micro", 4, label_counts),
                                ("per_micro_mean", 4, None)):
        model = _pretrain_model(num_answers)
        s = settings(tmp_path / name, optim=replace(optim, micro_batch_size=micro))
        train(model, data, _pretrain_step, s, label_counts=counts)
        runs[name] = model.state_dict()
    whole = runs["whole"]
    for k, v in runs["micro"].items():
        assert torch.allclose(v, whole[k], atol=2e-6, rtol=1e-4), k
    # micro-batches averaging over their own labelled words give another update
    assert any(not torch.allclose(v, whole[k], atol=1e-5, rtol=1e-4)
               for k, v in runs["per_micro_mean"].items())


# --- DDP: two gloo ranks, each accumulating, equal one process ---------------------------------
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    syncs: list[bool] = []

    def recording_step(m, batch, epoch):
        syncs.append(bool(m.require_backward_grad_sync))  # False inside DDP's no_sync()
        return step(m, batch, epoch)

    try:
        model = make_model(dropout=0.0)
        s = settings(Path(out_dir), optim=replace(OPTIM, micro_batch_size=2))
        summary = train(model, ToyData(), recording_step, s, dist_info=info)
        if info.is_main:
            torch.save({"model": model.state_dict(), "steps": summary.steps, "syncs": syncs},
                       Path(out_dir) / "final.pt")
    finally:
        teardown_distributed(info)


def test_two_ranks_accumulating_with_no_sync_equal_one_process(tmp_path):
    one = make_model(dropout=0.0)
    train(one, ToyData(), step, settings(tmp_path / "one", optim=OPTIM))
    two = tmp_path / "two"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(two)), nprocs=2, join=True)
    final = torch.load(two / "final.pt")
    assert final["steps"] == 10
    # per rank: 4 examples of each global batch of 8, in 2 micro-steps; only the last syncs
    assert final["syncs"] == [False, True] * 10
    _same_parameters(one, final["model"], atol=1e-5)


# --- the BERT stage: the MLM loss over the global count of labelled words ----------------------
def _bert_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        model, data = _bert_model_and_data(root)
        s = settings(Path(out_dir), optim=OptimConfig(lr=1e-3, batch_size=16, epochs=1, max_steps=2),
                     find_unused_parameters=True)  # the pooler, as in the stage
        train(model, data, _bert_step, s, dist_info=info, label_counts=bert_stage.label_counts)
        if info.is_main:
            torch.save(model.state_dict(), Path(out_dir) / "final.pt")
    finally:
        teardown_distributed(info)


def _bert_model_and_data(root: str):
    sentences = bert_stage.corpus_sentences(root, ("mscoco_train",), None)[:32]
    examples = bert_stage.SentenceExamples(sentences, load_tokenizer(DataConfig(root=root)), 0.15)
    torch.manual_seed(0)
    config = LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config), examples


def _bert_step(m, batch, epoch, denominators=None):
    return m(**batch, loss_denominators=denominators)


def test_bert_stage_two_ranks_and_micro_batches_equal_one_process(root, tmp_path):
    optim = OptimConfig(lr=1e-3, batch_size=16, epochs=1, max_steps=2)
    model, data = _bert_model_and_data(root)
    train(model, data, _bert_step, settings(tmp_path / "one", optim=optim),
          label_counts=bert_stage.label_counts)
    micro, _ = _bert_model_and_data(root)
    train(micro, data, _bert_step, settings(tmp_path / "micro", optim=replace(optim, micro_batch_size=4)),
          label_counts=bert_stage.label_counts)
    _same_parameters(micro, model.state_dict(), atol=2e-6)
    mp.spawn(_bert_worker, args=(2, free_port(), root, str(tmp_path / "two")), nprocs=2, join=True)
    _same_parameters(model, torch.load(tmp_path / "two" / "final.pt"), atol=2e-6)
    # micro-batches averaging over their own labelled words (as the BERT stage's DDP ranks did
    # before) give another update
    per_rank, _ = _bert_model_and_data(root)
    train(per_rank, data, _bert_step,
          settings(tmp_path / "per_micro", optim=replace(optim, micro_batch_size=4)))
    assert any(not torch.allclose(v, model.state_dict()[k], atol=1e-5, rtol=1e-4)
               for k, v in per_rank.state_dict().items())
