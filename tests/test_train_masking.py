"""Pretraining example randomness: masking statistics, answer sampling (LXMERT_FACTS.md §2)."""

from __future__ import annotations

import numpy as np
import pytest

from lxmert_bench.data.pretrain import IGNORE, mask_objects, mask_words, sample_answer

MASK_ID, VOCAB = 3, 1000


def test_word_masking_rates_and_labels():
    rng = np.random.default_rng(0)
    n, length = 4000, 20
    ids = rng.integers(10, VOCAB, size=(n, length))
    maskable = np.zeros(length, dtype=bool)
    maskable[1:15] = True  # [CLS] at 0, [SEP] at 15, padding after
    picked = to_mask = to_random = kept = 0
    for row in ids:
        out, labels = mask_words(row, maskable, rng, 0.15, MASK_ID, VOCAB)
        sel = labels != IGNORE
        assert not sel[~maskable].any()  # never CLS / SEP / PAD
        assert np.array_equal(labels[sel], row[sel])
        assert np.array_equal(out[~sel], row[~sel])  # unpicked tokens untouched
        picked += sel.sum()
        to_mask += (out[sel] == MASK_ID).sum()
        same = out[sel] == row[sel]
        kept += same.sum()
        to_random += (~same & (out[sel] != MASK_ID)).sum()
    assert picked / (n * maskable.sum()) == pytest.approx(0.15, abs=0.005)
    assert to_mask / picked == pytest.approx(0.8, abs=0.015)
    # a random id may equal the original (1/990): "kept" is 10% + a hair
    assert to_random / picked == pytest.approx(0.1, abs=0.01)
    assert kept / picked == pytest.approx(0.1, abs=0.01)


def test_word_masking_random_ids_cover_the_vocabulary():
    rng = np.random.default_rng(1)
    row = np.full(64, 500)
    seen = set()
    for _ in range(3000):
        out, labels = mask_words(row, np.ones(64, dtype=bool), rng, 0.15, MASK_ID, VOCAB)
        seen |= set(out[(labels != IGNORE) & (out != MASK_ID) & (out != 500)].tolist())
    assert min(seen) < 20 and max(seen) > VOCAB - 20  # any id, special ones included


def test_object_masking_official_and_zero():
    rng = np.random.default_rng(2)
    feats = rng.random((36, 8)).astype(np.float32) + 1.0  # never zero
    replacement = np.full(8, -7.0, dtype=np.float32)
    counts = {"zero": 0, "random": 0, "kept": 0}
    picked = 0
    for _ in range(3000):
        out, fmask = mask_objects(feats, rng, 0.15, "official", lambda r: replacement)
        sel = fmask == 1.0
        assert np.array_equal(out[~sel], feats[~sel])
        picked += sel.sum()
        counts["zero"] += (out[sel] == 0).all(axis=1).sum()
        counts["random"] += (out[sel] == -7.0).all(axis=1).sum()
        counts["kept"] += (out[sel] == feats[sel]).all(axis=1).sum()
    assert picked / (3000 * 36) == pytest.approx(0.15, abs=0.005)
    assert counts["zero"] / picked == pytest.approx(0.8, abs=0.015)
    assert counts["random"] / picked == pytest.approx(0.1, abs=0.01)
    assert counts["kept"] / picked == pytest.approx(0.1, abs=0.01)
    out, fmask = mask_objects(feats, np.random.default_rng(3), 0.5, "zero")
    assert fmask.sum() > 0 and (out[fmask == 1] == 0).all()
    with pytest.raises(ValueError, match="obj_mask_mode"):
        mask_objects(feats, rng, 0.15, "blur")


def test_answer_sampling_is_proportional_to_scores():
    rng = np.random.default_rng(4)
    table = {"red": 0, "blue": 1, "green": 2}
    draws = [sample_answer({"red": 0.3, "blue": 0.9}, table, rng) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert draws.count(1) / len(draws) == pytest.approx(0.75, abs=0.03)
    assert sample_answer({"green": 0.3}, table, rng) == 2
    assert sample_answer({}, table, rng) == IGNORE
    assert sample_answer(None, table, rng) == IGNORE
    assert sample_answer({"red": 1.0}, lambda a: 7, rng) == 7
