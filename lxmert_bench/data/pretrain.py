"""Pretraining examples: word masking, object masking, matching negatives and QA labels.

Follows the official ``lxmert_pretrain.py`` (LXMERT_FACTS.md §2) with every task switchable, and
with all randomness drawn from the ``rng`` the training loop derives from (seed, epoch, index),
so an example is a pure function of its coordinates.

- words: each WordPiece (never [CLS]/[SEP]/[PAD]) is picked with p=0.15; of those 80% become
  [MASK], 10% a uniformly random vocabulary id, 10% stay; labels are the original ids, -1 elsewhere;
- objects: each object is picked with p=0.15; ``official``: 80% zeroed, 10% replaced by the feature
  of a random object of a random image, 10% kept; ``zero``: all zeroed (the paper); boxes never;
- matching: with p=0.5 the sentence is replaced by one of a different image (if the task is on);
- QA: one answer sampled in proportion to its score; -1 without label or on a mismatched pair;
- object / attribute targets: the detector's labels, weighted by its confidences
  (``all_confidence``, official) or by the object mask (``masked``, the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

IGNORE = -1  # label of positions without a target (the official ignore_index)


def mask_words(
    ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator, rate: float,
    mask_id: int, vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT word masking. ``maskable`` marks real WordPieces (not CLS/SEP/PAD).

    Returns ``(masked_ids, labels)``; labels hold the original id on picked positions, -1 elsewhere.
    """
    u = rng.random(ids.shape)
    random_ids = rng.integers(0, vocab_size, size=ids.shape)
    picked = (u < rate) & maskable
    v = u / rate if rate > 0 else u  # the official re-uses the same draw: prob /= rate
    out = ids.copy()
    out[picked & (v < 0.8)] = mask_id
    to_random = picked & (v >= 0.8) & (v < 0.9)
    out[to_random] = random_ids[to_random]
    labels = np.where(picked, ids, IGNORE).astype(np.int64)
    return out, labels


def mask_objects(
    feats: np.ndarray, rng: np.random.Generator, rate: float, mode: str = "official",
    random_feature: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Object (RoI feature) masking. Returns ``(masked_feats, feat_mask)`` with feat_mask 1.0 on
    picked objects. ``random_feature(rng)`` gives one object's feature from a random image."""
    if mode not in ("official", "zero"):
        raise ValueError(f"pretrain.obj_mask_mode: expected 'official' or 'zero', got {mode!r}")
    n = feats.shape[0]
    u = rng.random(n)
    picked = u < rate
    v = u / rate if rate > 0 else u
    out = np.array(feats, dtype=np.float32, copy=True)
    if mode == "zero":
        out[picked] = 0.0
    else:
        out[picked & (v < 0.8)] = 0.0
        for i in np.flatnonzero(picked & (v >= 0.8) & (v < 0.9)):
            if random_feature is None:
                raise ValueError("mask_objects: mode 'official' needs random_feature")
            out[i] = random_feature(rng)
    return out, picked.astype(np.float32)


def sample_answer(label: Mapping[str, float] | None, ans2label: Callable[[str], int] | Mapping[str, int],
                  rng: np.random.Generator) -> int:
    """One answer id, sampled in proportion to the soft scores; -1 when there is none usable.

    ``label`` is already normalised and pruned to the answer table (answers outside it dropped).
    """
    if not label:
        return IGNORE
    answers = list(label)
    scores = np.asarray([float(label[a]) for a in answers], dtype=np.float64)
    if len(answers) == 1:
        choice = 0
    else:
        total = scores.sum()
        if total <= 0:
            return IGNORE
        choice = int(rng.choice(len(answers), p=scores / total))
    lookup = ans2label if callable(ans2label) else ans2label.__getitem__
    return int(lookup(answers[choice]))
