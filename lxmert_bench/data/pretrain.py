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
from typing import Any

import numpy as np
import torch

from lxmert_bench.model.heads import IGNORE, VISUAL_LOSSES


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


def non_maskable_ids(tokenizer: Any) -> set[int]:
    """[CLS], [SEP] and [PAD]: never masked (the official masks before adding them)."""
    return {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id}


# ---------------------------------------------------------------------------------------------
class PretrainExamples:
    """Pretraining examples from a :class:`~lxmert_bench.data.tasks.PretrainCorpus` (the loop's
    ``TrainData``): ``example(index, epoch, rng)`` builds one masked, possibly mismatched pair.

    ``mask_inactive="official"`` (default): words and objects are masked even when the MLM task or
    every visual loss is off, as the official code does; such a task only gets no targets (no
    loss). ``"none"``: a task that is off leaves its inputs as they are. Without the matching task
    every pair is matched.
    ``qa_from_epoch``: first 0-based epoch whose examples carry QA labels (None: never).
    """

    def __init__(self, corpus, tokenizer, *, mask_lm: bool = True, matched: bool = True,
                 visual_losses: tuple[str, ...] = VISUAL_LOSSES, qa: bool = True,
                 qa_from_epoch: int | None = 0, word_mask_rate: float = 0.15,
                 obj_mask_rate: float = 0.15, obj_mask_mode: str = "official",
                 label_targets: str = "all_confidence", mask_inactive: str = "official"):
        unknown = sorted(set(visual_losses) - set(VISUAL_LOSSES))
        if unknown:
            raise ValueError(f"pretrain.visual_losses: unknown {unknown}; expected a subset of "
                             f"{list(VISUAL_LOSSES)}")
        if label_targets not in ("all_confidence", "masked"):
            raise ValueError(f"pretrain.label_targets: expected 'all_confidence' or 'masked', "
                             f"got {label_targets!r}")
        if obj_mask_mode not in ("official", "zero"):
            raise ValueError(f"pretrain.obj_mask_mode: expected 'official' or 'zero', got {obj_mask_mode!r}")
        if mask_inactive not in ("official", "none"):
            raise ValueError(f"pretrain.mask_inactive: expected 'official' or 'none', got {mask_inactive!r}")
        self.mask_words = mask_lm or mask_inactive == "official"
        self.mask_objects = bool(visual_losses) or mask_inactive == "official"
        self.corpus, self.tokenizer = corpus, tokenizer
        self.mask_lm, self.matched, self.qa = mask_lm, matched, qa
        self.visual_losses = tuple(visual_losses)
        self.qa_from_epoch = qa_from_epoch if qa else None
        self.word_mask_rate, self.obj_mask_rate = word_mask_rate, obj_mask_rate
        self.obj_mask_mode, self.label_targets = obj_mask_mode, label_targets
        self.ans2label = corpus.answer_table.ans2label
        if matched and len(corpus.img_ids) < 2:
            raise ValueError("pretraining with the matching task needs sentences of at least two "
                             f"images; the corpus ({', '.join(corpus.splits)}) has "
                             f"{len(corpus.img_ids)}")
        self._specials = np.asarray(sorted(non_maskable_ids(tokenizer)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.corpus)

    def _other_sentence(self, img_id: str, rng: np.random.Generator) -> str:
        """A sentence of a different image (resampled until the image differs, as official)."""
        entries = self.corpus.entries
        while True:
            other = entries[int(rng.integers(len(entries)))]
            if other["img_id"] != img_id:
                return other["sent"]

    def example(self, index: int, epoch: int, rng: np.random.Generator) -> dict[str, Any]:
        entry = self.corpus.entries[index]
        sent, is_matched = entry["sent"], 1
        if self.matched and rng.random() < 0.5:
            sent, is_matched = self._other_sentence(entry["img_id"], rng), 0
        ids, attention = (np.asarray(a, dtype=np.int64) for a in self.tokenizer.encode(sent))
        lm_labels = np.full_like(ids, IGNORE)
        if self.mask_words:
            maskable = (attention == 1) & ~np.isin(ids, self._specials)
            ids, lm_labels = mask_words(ids, maskable, rng, self.word_mask_rate,
                                        self.tokenizer.mask_id, self.tokenizer.vocab_size)
            if not self.mask_lm:  # masked input, no MLM target
                lm_labels = np.full_like(ids, IGNORE)
        img = self.corpus.features(entry["img_id"])
        original = np.asarray(img["features"], dtype=np.float32)
        feats, feat_mask = original, np.zeros(original.shape[0], dtype=np.float32)
        if self.mask_objects:
            feats, feat_mask = mask_objects(original, rng, self.obj_mask_rate, self.obj_mask_mode,
                                            self.corpus.random_feature)
        ans = IGNORE
        if self.qa_from_epoch is not None and epoch >= self.qa_from_epoch and is_matched:
            ans = sample_answer(entry["label"], self.ans2label, rng)
        out: dict[str, Any] = {
            "input_ids": ids, "attention_mask": attention, "feats": feats,
            "boxes": np.asarray(img["boxes"], dtype=np.float32),
            "masked_lm_labels": lm_labels, "matched_label": np.int64(is_matched),
            "ans": np.int64(ans), "feat_mask": feat_mask,
        }
        if "obj" in self.visual_losses:
            out["obj_labels"] = np.asarray(img["objects_id"], dtype=np.int64)
            out["obj_weights"] = self._weights(img["objects_conf"], feat_mask)
        if "attr" in self.visual_losses:
            out["attr_labels"] = np.asarray(img["attrs_id"], dtype=np.int64)
            out["attr_weights"] = self._weights(img["attrs_conf"], feat_mask)
        if "feat" in self.visual_losses:
            out["feat_labels"] = original
        return out

    def _weights(self, confidences: np.ndarray, feat_mask: np.ndarray) -> np.ndarray:
        if self.label_targets == "all_confidence":  # official: every box, by detector confidence
            return np.asarray(confidences, dtype=np.float32)
        return feat_mask  # the paper: masked boxes only

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
