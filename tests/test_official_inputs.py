"""Ablations see the official inputs (issue 12): words and objects are masked whatever tasks are
on, as the official ``lxmert_pretrain.py`` always calls ``random_word`` / ``random_feat``; with a
task off its loss is not taken. ``pretrain.mask_inactive: none`` keeps the older behaviour."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _helpers import synthetic_data

from lxmert_bench.config import PretrainConfig, RunConfig
from lxmert_bench.data.pretrain import IGNORE, PretrainExamples
from lxmert_bench.data.tasks import PretrainCorpus
from lxmert_bench.train.common import load_tokenizer
from lxmert_bench.train.loop import example_rng
from lxmert_bench.train.pretrain import make_examples

SPLITS = ("mscoco_train", "mscoco_nominival", "vgnococo")
OFF = dict(mask_lm=False, matched=False, visual_losses=(), qa=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(data) -> PretrainCorpus:
    return PretrainCorpus(data.root, SPLITS)


def build(ex: PretrainExamples, n: int) -> list[dict]:
    return [ex.example(i % len(ex), 0, example_rng(0, 0, 0, i)) for i in range(n)]


def rates(corpus, data, items: list[dict]) -> tuple[float, float]:
    """Share of real words changed or masked, share of objects whose features changed."""
    tok = load_tokenizer(data)
    words = changed_words = objects = changed_objects = 0
    for i, e in enumerate(items):
        entry = corpus.entries[i % len(corpus)]
        ids, attention = (np.asarray(a) for a in tok.encode(entry["sent"]))
        real = (attention == 1) & ~np.isin(ids, [tok.cls_id, tok.sep_id, tok.pad_id])
        words += real.sum()
        changed_words += (e["input_ids"][real] != ids[real]).sum()
        feats = corpus.features(entry["img_id"])["features"]
        objects += feats.shape[0]
        changed_objects += (~np.isclose(e["feats"], feats).all(axis=1)).sum()
    return changed_words / words, changed_objects / objects


def test_tasks_off_still_see_official_masked_inputs(corpus, data):
    p = PretrainConfig(**OFF)
    assert p.mask_inactive == "official"  # the default follows the official code
    items = build(make_examples(p, corpus, load_tokenizer(data), None), 600)
    word_rate, obj_rate = rates(corpus, data, items)
    # 15% picked; of those 80% [MASK] + ~10% random ids change the word: ~13.5%
    assert 0.11 < word_rate < 0.16
    # 15% picked; 80% zeroed + 10% another object's feature: ~13.5% of the boxes change
    assert 0.11 < obj_rate < 0.16
    for e in items:  # ... but no loss is taken: no targets
        assert (e["masked_lm_labels"] == IGNORE).all()
        assert "obj_labels" not in e and "attr_labels" not in e and "feat_labels" not in e
        assert e["matched_label"] == 1 and e["ans"] == IGNORE


def test_mask_inactive_none_keeps_inputs_of_tasks_that_are_off(corpus, data):
    p = PretrainConfig(**OFF, mask_inactive="none")
    items = build(make_examples(p, corpus, load_tokenizer(data), None), 200)
    assert rates(corpus, data, items) == (0.0, 0.0)


def test_mask_inactive_changes_nothing_when_both_tasks_are_on(corpus, data):
    tok = load_tokenizer(data)
    a = build(make_examples(PretrainConfig(), corpus, tok, 0), 50)
    b = build(make_examples(PretrainConfig(mask_inactive="none"), corpus, tok, 0), 50)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_only_the_stages_whose_inputs_change_get_a_new_hash():
    def stage(**kw) -> RunConfig:
        return RunConfig(kind="pretrain", pretrain=PretrainConfig(**kw), code_version="v")

    # tasks on: the switch has no effect and never enters the hash (golden hashes stay)
    assert stage().content_hash() == stage(mask_inactive="none").content_hash() == "ed51aa5578dc"
    # a task off: 'none' is what such stages computed before the switch existed, so it keeps
    # their hash; the official inputs are a different result under a new hash
    for off in (dict(mask_lm=False), dict(visual_losses=()), dict(visual_losses=(), qa=False)):
        old = stage(**off, mask_inactive="none")
        assert "mask_inactive" not in old.identity()["pretrain"]
        assert stage(**off).content_hash() != old.content_hash()
    # round trip through config.json
    cfg = stage(visual_losses=())
    assert RunConfig.from_json(cfg.to_json()).content_hash() == cfg.content_hash()
    assert dataclasses.asdict(cfg.pretrain)["mask_inactive"] == "official"
