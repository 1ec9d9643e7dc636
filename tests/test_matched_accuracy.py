"""Pretraining logs image-sentence matching as an accuracy (in %, 50 = chance) after every epoch,
not only as a loss (a loss stuck at 0.693 is chance, which a reader has to know), and whether the
language side reads the image (the matched pairs' masked-LM loss with their own image and with
another); the stage's result keeps both beside its metrics, which stay the losses (golden results
are unchanged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import synthetic_data

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.metrics import IMAGE_READING
from lxmert_bench.model import LxmertConfig
from lxmert_bench.model.heads import IGNORE, masked_cross_entropy
from lxmert_bench.store import RunDir
from lxmert_bench.train.common import load_tokenizer
from lxmert_bench.train.pretrain import (
    build_model,
    image_reading,
    load_corpora,
    make_examples,
    pretrain_forward,
)
from lxmert_bench.train.stages import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory, image_limit=6)


def _run(tmp_path, data: DataConfig, **kw) -> tuple[dict, list[dict]]:
    optim = OptimConfig(batch_size=32, epochs=2)  # 6 images: a few steps per epoch
    cfg = RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"), data=data,
                    pretrain=PretrainConfig(optim=optim, **kw), log_every=1,
                    checkpoint_every=100, device="cpu")
    rd = RunDir(tmp_path, cfg.stage_id)
    rd.write_config(cfg)
    result = run_stage(rd)
    return result, [json.loads(line) for line in rd.log_path.read_text().splitlines()]


def test_each_epoch_logs_the_matching_accuracy(tmp_path, data):
    result, log = _run(tmp_path, data)
    evals = [r for r in log if "split" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    for r in evals:
        acc = r["metrics"]["matched_accuracy"]
        assert 0.0 <= acc <= 100.0
        # an accuracy, not folded into the summed loss
        not_losses = ("loss", "matched_accuracy", *IMAGE_READING)
        losses = [v for k, v in r["metrics"].items() if k not in not_losses]
        assert r["metrics"]["loss"] == pytest.approx(sum(losses))
        assert all(r["metrics"][k] > 0 for k in IMAGE_READING)
    assert result["matched_accuracy"] == pytest.approx(evals[-1]["metrics"]["matched_accuracy"])
    assert "matched_accuracy" not in result["metrics"]
    assert result["image_reading"] == pytest.approx(
        {k: evals[-1]["metrics"][k] for k in IMAGE_READING})
    assert not set(IMAGE_READING) & set(result["metrics"])


def test_no_matching_task_no_accuracy(tmp_path, data):
    result, log = _run(tmp_path, data, matched=False)
    assert all("matched_accuracy" not in r["metrics"] for r in log if "split" in r)
    assert result["matched_accuracy"] is None
    assert result["image_reading"]  # every pair is matched: all of them count


def test_no_masked_lm_no_image_reading(tmp_path, data):
    result, log = _run(tmp_path, data, mask_lm=False)
    assert all(not set(IMAGE_READING) & set(r["metrics"]) for r in log if "split" in r)
    assert result["image_reading"] is None


@pytest.mark.parametrize("sparse_mlm", [True, False])
def test_image_reading_is_the_matched_pairs_loss_with_each_image(data, sparse_mlm):
    """Against plain forward passes: the matched pairs whose neighbour shows another image, scored
    with their own image and with the neighbour's (the head's sparse and dense logits alike)."""
    p = PretrainConfig()
    cfg = RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"), data=data,
                    pretrain=p, device="cpu")
    corpus, _ = load_corpora(cfg)
    examples = make_examples(p, corpus, load_tokenizer(data), 0)
    torch.manual_seed(0)
    model = build_model(cfg, len(corpus.answer_table)).eval()
    model.sparse_mlm = sparse_mlm
    picked: list[int] = []  # sentences, each of another image than the one before it
    for i, entry in enumerate(corpus.entries):
        last = corpus.entries[picked[-1]]["img_id"] if picked else corpus.entries[-1]["img_id"]
        if entry["img_id"] != last:
            picked.append(i)
    n = len(picked)
    assert n >= 8
    assert corpus.entries[picked[0]]["img_id"] != corpus.entries[picked[-1]]["img_id"]
    rng = np.random.default_rng(0)
    batch = examples.collate([examples.example(i, 0, rng) for i in picked])
    batch["boxes"][3] = batch["boxes"][2]  # row 3's neighbour shows its image: row 3 is left out
    with torch.no_grad():
        out = pretrain_forward(model, batch, p, with_qa=True, qa_weight=1.0)
        sums = image_reading(model, batch, out)
        keep = (batch["matched_label"] == 1) & (torch.arange(n) != 3)
        assert 0 < int(keep.sum()) < n - 1
        labels = batch["masked_lm_labels"][keep]
        words = int((labels != IGNORE).sum())
        expected = {}
        for name, image in (("mlm_own_image", keep.nonzero().flatten()),
                            ("mlm_other_image", (keep.nonzero().flatten() - 1) % n)):
            alone = model(batch["input_ids"][keep], batch["attention_mask"][keep],
                          batch["feats"][image], batch["boxes"][image], masked_lm_labels=labels)
            expected[name] = float(masked_cross_entropy(alone["lm_logits"], alone["lm_labels"])) * words
    assert sums["words"] == words
    assert sums == pytest.approx({"words": words, **expected}, rel=1e-5)
    # the other pass did see other images (an untrained model reads them barely: ~2e-5 apart)
    assert sums["mlm_own_image"] != sums["mlm_other_image"]
