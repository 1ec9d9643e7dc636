"""data.pad_to: training batches padded to max_seq_length (the official code) or cut to the batch's
longest sentence (the demo profile: fewer tokens per CPU step). What is cut is masked padding, so
the model computes the same thing on both; only dropout's draws differ (tests/test_identity_effects
shows the key enters the hash)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lxmert_bench.config import DataConfig, PretrainConfig, RunConfig
from lxmert_bench.model.config import PRESETS
from lxmert_bench.train.loop import iterate_batches, trim_padding


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from lxmert_bench.data.root import ensure_data_root

    path = tmp_path_factory.mktemp("pad") / "syn"
    ensure_data_root(DataConfig(root=str(path), synthetic=True, synthetic_images=100))
    return path


def _pretraining_examples(root: Path):
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.pretrain import load_corpora, make_examples

    cfg = RunConfig(kind="pretrain", model=PRESETS["test"], pretrain=PretrainConfig(),
                    data=DataConfig(root=str(root), synthetic=True, synthetic_images=100))
    train, _valid = load_corpora(cfg)
    return cfg, make_examples(cfg.pretrain, train, load_tokenizer(cfg.data), 0)


def test_trim_cuts_the_language_tensors_to_the_longest_sentence_and_nothing_else():
    mask = torch.zeros(2, 8, dtype=torch.long)
    mask[0, :3], mask[1, :5] = 1, 1
    batch = {"input_ids": torch.arange(16).view(2, 8), "attention_mask": mask,
             "masked_lm_labels": torch.full((2, 8), -1), "feats": torch.rand(2, 8, 4),
             "question_id": [1, 2]}
    out = trim_padding(batch)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["masked_lm_labels"].shape \
        == (2, 5)
    assert torch.equal(out["input_ids"], batch["input_ids"][:, :5])
    assert out["feats"] is batch["feats"] and out["question_id"] == [1, 2]  # 8 boxes, not words
    full = {**batch, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    assert trim_padding(full)["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loop_reads_trimmed_batches_in_process_and_from_workers(root, workers, one_thread):
    _cfg, examples = _pretraining_examples(root)
    picks = [range(16)]
    full = next(iterate_batches(examples, picks, 0, 0, num_workers=workers))
    cut = next(iterate_batches(examples, picks, 0, 0, num_workers=workers, pad_to="longest"))
    longest = int(full["attention_mask"].sum(1).max())
    assert full["input_ids"].shape[1] == 20 > longest  # the synthetic captions are short
    assert cut["input_ids"].shape[1] == longest
    for key in ("input_ids", "attention_mask", "masked_lm_labels"):
        assert torch.equal(cut[key], full[key][:, :longest]), key
        assert not full[key][:, longest:].any() or key == "masked_lm_labels"
    assert (full["masked_lm_labels"][:, longest:] == -1).all()  # no label is cut
    assert torch.equal(cut["feats"], full["feats"])


def test_pretraining_losses_and_answers_are_the_same_on_trimmed_batches(root, one_thread):
    from lxmert_bench.model.heads import LxmertForQuestionAnswering
    from lxmert_bench.train.pretrain import build_model, pretrain_forward

    cfg, examples = _pretraining_examples(root)
    picks = [range(12)]
    full = next(iterate_batches(examples, picks, 0, 0))
    cut = next(iterate_batches(examples, picks, 0, 0, pad_to="longest"))
    assert cut["input_ids"].shape[1] < full["input_ids"].shape[1]
    torch.manual_seed(0)
    model = build_model(replace(cfg, pretrain=replace(cfg.pretrain, qa=True)), num_answers=7).eval()
    with torch.no_grad():
        a = pretrain_forward(model, full, cfg.pretrain, with_qa=True, qa_weight=1.0)
        b = pretrain_forward(model, cut, cfg.pretrain, with_qa=True, qa_weight=1.0)
    assert a["losses"].keys() == b["losses"].keys() and "mlm" in a["losses"]
    for name in a["losses"]:
        assert torch.allclose(a["losses"][name], b["losses"][name], atol=1e-5), name
    qa = LxmertForQuestionAnswering(cfg.model, 7).eval()
    with torch.no_grad():
        logits = [qa(x["input_ids"], x["attention_mask"], x["feats"], x["boxes"]) for x in (full, cut)]
    assert torch.allclose(*logits, atol=1e-5)
