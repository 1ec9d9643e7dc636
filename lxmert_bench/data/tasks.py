"""Torch datasets over the official JSON layouts: VQA, GQA, NLVR2 and the pretraining corpus.

Each reads its split JSONs through data/layout.py, its images from memory-mapped feature stores
built once from the TSVs under ``<root>/.stores/`` (data/store.py), and keeps only the examples
whose images are loaded, as the official loaders do. ``image_limit`` is the official ``--tiny`` /
``--fast``: the first N images of each split's feature file; VQA minival and the pretraining
minival read the first 5000 images of val2014 as the official code does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lxmert_bench.data.answers import AnswerTable, load_task_answers
from lxmert_bench.data.layout import SplitFiles, split_files, store_dir
from lxmert_bench.io import read_json


# ---------------------------------------------------------------------------------------------
class ImageFeatures:
    """The images some splits read: one store per feature TSV, limited to the first ``topk`` images
    of the file where the split (or ``image_limit``) says so. Shared TSVs are opened once.
    ``feature_dtype`` "float16" halves the stores' size (features are still returned as float32).
    ``num_objects`` (``model.num_objects``): each image's first N boxes, the most confident ones
    in obj36 files (None: all of them, as the official code)."""

    def __init__(self, root: str | Path, entries: Iterable[SplitFiles], image_limit: int | None = None,
                 feature_dtype: str = "float32", num_objects: int | None = None):
        from lxmert_bench.data.store import ensure_store

        if num_objects is not None and num_objects < 1:
            raise ValueError(f"model.num_objects={num_objects}: expected at least 1")
        self.root = Path(root)
        self.num_objects = num_objects
        self._stores: dict[str, Any] = {}
        # (store, how many of its first rows are read), in the order the splits name them; an id
        # is looked up by each store's binary search (no per-process dict of every image id)
        self._reads: list[tuple[Any, int]] = []
        for entry in entries:
            limits = [k for k in (entry.topk, image_limit) if k is not None and k >= 0]
            topk = min(limits) if limits else None
            for rel in entry.tsvs:
                if rel not in self._stores:
                    self._stores[rel] = ensure_store(
                        [self.root / rel], store_dir(self.root, rel, feature_dtype),
                        feature_dtype=feature_dtype)
                store = self._stores[rel]
                if num_objects is not None and num_objects > store.num_boxes:
                    raise ValueError(f"model.num_objects={num_objects}, but {self.root / rel} has "
                                     f"{store.num_boxes} boxes per image")
                self._reads.append((store, len(store) if topk is None else min(topk, len(store))))

    def _locate(self, img_id: object) -> tuple[Any, int] | None:
        """(store, row) of the first store that reads ``img_id``, or None."""
        if not isinstance(img_id, str):
            return None
        for store, rows in self._reads:
            row = store.find(img_id)
            if 0 <= row < rows:
                return store, row
        return None

    def __contains__(self, img_id: object) -> bool:
        return self._locate(img_id) is not None

    def __len__(self) -> int:
        return len(self.img_ids)

    @property
    def img_ids(self) -> list[str]:
        """Every image read, in file order (built on demand: only the corpora sampling negatives
        need the whole list)."""
        return list(dict.fromkeys(i for store, rows in self._reads for i in store.img_ids[:rows]))

    def get(self, img_id: str) -> dict[str, np.ndarray]:
        """features float32 [N, D], boxes normalised to [0, 1] [N, 4], detector labels
        (N = ``num_objects``, else every box: 36)."""
        found = self._locate(img_id)
        if found is None:
            raise KeyError(f"image {img_id!r} is not among the loaded features "
                           f"({', '.join(self._stores)})")
        item = found[0].get_row(found[1])
        n = self.num_objects
        if n is not None:
            for key in ("features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
                item[key] = item[key][:n]
        return item


def _float(a: np.ndarray) -> torch.Tensor:
    # the store hands out fresh float32 copies; copy only what is read-only or of another dtype
    return torch.from_numpy(np.require(a, np.float32, ["W"]))


def _long(a: Sequence[int] | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64))


def load_split_json(path: Path, required: dict[str, type | tuple[type, ...]], what: str,
                    label_type: type = dict) -> list[dict[str, Any]]:
    """A split JSON (a list of records), each checked for the keys and types the loaders use;
    ``label`` is optional (test splits have none) but must have ``label_type`` when present."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what} records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
        for key, typ in required.items():
            if key not in rec:
                raise ValueError(f"{path}: record {i}: missing key {key!r} (a {what} record has "
                                 f"{', '.join(required)})")
            if not isinstance(rec[key], typ):
                names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
                raise ValueError(f"{path}: record {i}: {key!r} should be {names}, got "
                                 f"{type(rec[key]).__name__}")
        if "label" in rec and not isinstance(rec["label"], label_type):
            expected = "0 or 1" if label_type is int else "an object answer -> score"
            raise ValueError(f"{path}: record {i}: 'label' should be {expected}, got "
                             f"{rec['label']!r:.60}")
    return data


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors along a new batch dimension; everything else becomes a list."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---------------------------------------------------------------------------------------------
class _TaskDataset(Dataset):
    """A fine-tuning task's splits: their JSON records, checked for the keys the loader uses, and
    the images they read; records whose images have no features are left out."""

    task = ""
    record = ""  # what one record is, as error messages name it
    label_type: type = dict
    image_keys: tuple[str, ...] = ("img_id",)
    _required: dict[str, type | tuple[type, ...]] = {}

    def __init__(self, root: str | Path, splits: Sequence[str], tokenizer: Any,
                 image_limit: int | None = None, feature_dtype: str = "float32",
                 num_objects: int | None = None):
        if isinstance(splits, str):
            splits = splits.split(",")
        self.root, self.splits, self.tokenizer = Path(root), tuple(splits), tokenizer
        entries = [split_files(self.task, s) for s in self.splits]
        raw: list[dict[str, Any]] = []
        for entry in entries:
            raw += load_split_json(entry.json_path(self.root), self._required, self.record,
                                   label_type=self.label_type)
        self.images = ImageFeatures(self.root, entries, image_limit, feature_dtype, num_objects)
        self.examples = [d for d in raw if all(d[k] in self.images for k in self.image_keys)]
        self.num_records = len(raw)

    @property
    def raw_examples(self) -> list[dict[str, Any]]:
        """The JSON records kept (raw labels for the metrics), in dataset order."""
        return self.examples

    def __len__(self) -> int:
        return len(self.examples)


class _QADataset(_TaskDataset):
    """VQA and GQA: one question about one image, a soft target over the task's answer table."""

    def __init__(self, root: str | Path, splits: Sequence[str], tokenizer: Any,
                 image_limit: int | None = None, feature_dtype: str = "float32",
                 num_objects: int | None = None):
        super().__init__(root, splits, tokenizer, image_limit, feature_dtype, num_objects)
        self.ans2label, self.label2ans = load_task_answers(self.root, self.task)

    @property
    def num_answers(self) -> int:
        return len(self.label2ans)

    def target(self, label: dict[str, float] | None) -> torch.Tensor:
        """Dense soft scores; answers outside the table cannot be predicted and are left out."""
        t = torch.zeros(self.num_answers)
        for ans, score in (label or {}).items():
            idx = self.ans2label.get(ans)
            if idx is not None:
                t[idx] = float(score)
        return t

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = self.examples[i]
        ids, mask = self.tokenizer.encode(d["sent"])
        img = self.images.get(d["img_id"])
        return {
            "question_id": d["question_id"], "img_id": d["img_id"],
            "input_ids": _long(ids), "attention_mask": _long(mask),
            "feats": _float(img["features"]), "boxes": _float(img["boxes"]),
            "target": self.target(d.get("label")),
            **self._extra(d),
        }

    def _extra(self, d: dict[str, Any]) -> dict[str, Any]:
        return {}


class VQADataset(_QADataset):
    """``vqa/{split}.json``: {"question_id": int, "img_id", "sent", "label": {ans: score},
    "answer_type", "question_type"}; items carry ``answer_type`` for the per-type metrics."""

    task, record = "vqa", "VQA question"
    _required = {"question_id": int, "img_id": str, "sent": str}

    def _extra(self, d: dict[str, Any]) -> dict[str, Any]:
        return {"answer_type": d.get("answer_type", "")}


class GQADataset(_QADataset):
    """``gqa/{split}.json``: {"question_id": str, "img_id", "sent", "label": {ans: 1.0}}."""

    task, record = "gqa", "GQA question"
    _required = {"question_id": str, "img_id": str, "sent": str}


class NLVR2Dataset(_TaskDataset):
    """``nlvr2/{split}.json``: a statement about two images; items hold both images stacked
    (feats [2, 36, D], boxes [2, 36, 4]) and the 0/1 label (-1 where the JSON has none)."""

    task, record, label_type = "nlvr2", "NLVR2 statement", int
    image_keys = ("img0", "img1")
    _required = {"identifier": str, "img0": str, "img1": str, "sent": str}

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = self.examples[i]
        ids, mask = self.tokenizer.encode(d["sent"])
        imgs = [self.images.get(d["img0"]), self.images.get(d["img1"])]
        return {
            "uid": d.get("uid", d["identifier"]), "identifier": d["identifier"],
            "input_ids": _long(ids), "attention_mask": _long(mask),
            "feats": _float(np.stack([im["features"] for im in imgs])),
            "boxes": _float(np.stack([im["boxes"] for im in imgs])),
            "label": torch.tensor(int(d.get("label", -1)), dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------------
class PretrainCorpus:
    """The ``lxmert/{split}.json`` corpus flattened to one entry per sentence, as the official
    ``LXMERTTorchDataset``: {"uid": "<img_id>_<source>_<idx:03d>", "img_id", "sent", "source",
    "label": {answer: score} or None}. QA answers are normalised with ``convert_ans`` and dropped
    when not in the answer table (restricted to ``qa_sets`` when given, the official --qaSets);
    ``label`` is None for captions and for questions left without answers. The masking and
    matching logic lives in data/pretrain.py."""

    def __init__(self, root: str | Path, splits: Sequence[str], image_limit: int | None = None,
                 qa_sets: Iterable[str] | None = None, feature_dtype: str = "float32",
                 num_objects: int | None = None):
        if isinstance(splits, str):
            splits = splits.split(",")
        self.root, self.splits = Path(root), tuple(splits)
        entries = [split_files("lxmert", s) for s in self.splits]
        self.answer_table = AnswerTable.from_root(self.root, dsets=qa_sets)
        data: list[dict[str, Any]] = []
        for entry in entries:
            path = entry.json_path(self.root)
            records = load_split_json(path, {"img_id": str, "sentf": dict}, "pretraining image")
            for i, rec in enumerate(records):
                self._check(rec, path, i)
            data += records
        self.images = ImageFeatures(self.root, entries, image_limit, feature_dtype, num_objects)
        self.entries: list[dict[str, Any]] = []
        for datum in data:
            img_id = datum["img_id"]
            if img_id not in self.images:
                continue
            labelf = datum.get("labelf", {})
            for source, sents in datum["sentf"].items():
                labels = labelf.get(source)
                for idx, sent in enumerate(sents):
                    label = None
                    if labels is not None:
                        label = self.answer_table.normalise_label(labels[idx]) or None
                    self.entries.append({"uid": f"{img_id}_{source}_{idx:03d}",
                                         "img_id": img_id, "sent": sent, "source": source,
                                         "label": label})
        self._img_ids = list(dict.fromkeys(e["img_id"] for e in self.entries))

    @staticmethod
    def _check(rec: dict[str, Any], path: Path, i: int) -> None:
        labelf = rec.get("labelf", {})
        if not isinstance(labelf, dict):
            raise ValueError(f"{path}: record {i}: 'labelf' should be an object source -> labels")
        for source, sents in rec["sentf"].items():
            if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                raise ValueError(f"{path}: record {i}: sentf[{source!r}] should be a list of strings")
            labels = labelf.get(source)
            if labels is None:
                continue
            if not isinstance(labels, list) or len(labels) != len(sents):
                got = len(labels) if isinstance(labels, list) else type(labels).__name__
                raise ValueError(f"{path}: record {i}: labelf[{source!r}] should be a list aligned "
                                 f"with sentf[{source!r}] ({len(sents)} sentences), got {got}")
            for j, label in enumerate(labels):
                if not isinstance(label, dict):
                    raise ValueError(f"{path}: record {i}: labelf[{source!r}][{j}] should be an "
                                     f"object answer -> score")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def img_ids(self) -> list[str]:
        """Images with at least one sentence, in corpus order."""
        return self._img_ids

    def features(self, img_id: str) -> dict[str, np.ndarray]:
        """features [36, D] float32, boxes [36, 4] in [0, 1], objects_id / objects_conf /
        attrs_id / attrs_conf (the visual pretraining targets)."""
        return self.images.get(img_id)

    def random_feature(self, rng: np.random.Generator) -> np.ndarray:
        """One object's feature from a random image of the corpus (the 10% random replacement)."""
        img = self.images.get(self._img_ids[int(rng.integers(len(self._img_ids)))])
        feats = img["features"]
        return np.array(feats[int(rng.integers(feats.shape[0]))], dtype=np.float32)
