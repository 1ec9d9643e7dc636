"""The official LXMERT data-root layout, as data: which JSON and feature TSV(s) each split reads.

    <root>/vqa/{train,nominival,minival,test}.json      mscoco_imgfeat/{train2014,val2014,test2015}_obj36.tsv
    <root>/gqa/{train,valid,testdev,submit}.json        vg_gqa_imgfeat/{vg_gqa,gqa_testdev}_obj36.tsv
    <root>/nlvr2/{train,valid,test,test2}.json          nlvr2_imgfeat/{train,valid,test,test2}_obj36.tsv
    <root>/lxmert/{mscoco_train,mscoco_nominival,mscoco_minival,vgnococo}.json  (pretraining corpus)
    <root>/{vqa,gqa}/trainval_{ans2label,label2ans}.json, <root>/lxmert/all_ans.json, <root>/vocab.txt

``check_data_root`` names every missing file before anything runs; ``fingerprint_data_root`` gives
a run's data identity cheaply, even for the 30 GB TSVs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxmert_bench.data.answers import PRETRAIN_ANSWER_FILE, TASK_ANSWER_FILES

MINIVAL_IMAGES = 5000  # minival = the first 5000 images of val2014_obj36.tsv (official topk)
VOCAB_FILE = "vocab.txt"
STORES_DIR = ".stores"  # memory-mapped feature stores built from the TSVs, under the root

_COCO = "mscoco_imgfeat"
_VG = "vg_gqa_imgfeat"
_NLVR2 = "nlvr2_imgfeat"


@dataclass(frozen=True)
class SplitFiles:
    """One split: its JSON, the feature TSV(s) its images live in, and how many of their first
    images the official loader reads (None: all)."""

    dataset: str
    split: str
    json: str  # relative to the root
    tsvs: tuple[str, ...]
    topk: int | None = None

    def json_path(self, root: str | Path) -> Path:
        return Path(root) / self.json

    def tsv_paths(self, root: str | Path) -> list[Path]:
        return [Path(root) / t for t in self.tsvs]


def _split(dataset: str, split: str, tsv: str, topk: int | None = None) -> SplitFiles:
    return SplitFiles(dataset, split, f"{dataset}/{split}.json", (tsv,), topk)


LAYOUT: dict[tuple[str, str], SplitFiles] = {(s.dataset, s.split): s for s in [
    _split("vqa", "train", f"{_COCO}/train2014_obj36.tsv"),
    _split("vqa", "nominival", f"{_COCO}/val2014_obj36.tsv"),
    _split("vqa", "minival", f"{_COCO}/val2014_obj36.tsv", MINIVAL_IMAGES),
    _split("vqa", "test", f"{_COCO}/test2015_obj36.tsv"),
    _split("gqa", "train", f"{_VG}/vg_gqa_obj36.tsv"),
    _split("gqa", "valid", f"{_VG}/vg_gqa_obj36.tsv"),
    _split("gqa", "testdev", f"{_VG}/gqa_testdev_obj36.tsv"),
    # the challenge submission (submission_all_questions.json): the official loader reads
    # vg_gqa_obj36.tsv for it; testdev's images are searched too, so none of its questions is lost
    SplitFiles("gqa", "submit", "gqa/submit.json", (f"{_VG}/vg_gqa_obj36.tsv",
                                                    f"{_VG}/gqa_testdev_obj36.tsv")),
    _split("nlvr2", "train", f"{_NLVR2}/train_obj36.tsv"),
    _split("nlvr2", "valid", f"{_NLVR2}/valid_obj36.tsv"),
    _split("nlvr2", "test", f"{_NLVR2}/test_obj36.tsv"),  # Test-P (the release's test1.json)
    _split("nlvr2", "test2", f"{_NLVR2}/test2_obj36.tsv"),  # Test-U (the release's test2.json)
    _split("lxmert", "mscoco_train", f"{_COCO}/train2014_obj36.tsv"),
    _split("lxmert", "mscoco_nominival", f"{_COCO}/val2014_obj36.tsv"),
    # the official pretraining validates on the first 5000 images (topk=5000 for the valid split)
    _split("lxmert", "mscoco_minival", f"{_COCO}/val2014_obj36.tsv", MINIVAL_IMAGES),
    _split("lxmert", "vgnococo", f"{_VG}/vg_gqa_obj36.tsv"),
]}

# Test splits predicted after fine-tuning (leaderboard files; LXMERT_FACTS.md §5): split -> (the
# prediction file, what it is submitted to). Their files are optional: a split whose files are not
# under the data root is named as absent, and they never enter a stage's data fingerprint.
TEST_SPLITS: dict[str, dict[str, tuple[str, str]]] = {
    "vqa": {"test": ("test_predict.json", "VQA v2 test-dev / test-std (EvalAI; all test2015 "
                                          "questions in one file)")},
    "gqa": {"testdev": ("testdev_predict.json", "GQA test-dev (EvalAI)"),
            "submit": ("submit_predict.json", "GQA challenge submission (EvalAI: test-dev, test, "
                                              "challenge questions)")},
    "nlvr2": {"test": ("test_predict.csv", "NLVR2 Test-P (official metrics.py)"),
              "test2": ("test2_predict.csv", "NLVR2 Test-U (official metrics.py)")},
}

DATASET_NAMES = {
    "vqa": "VQA questions", "gqa": "GQA questions", "nlvr2": "NLVR2 statements",
    "lxmert": "LXMERT pretraining corpus",
}


def split_files(dataset: str, split: str) -> SplitFiles:
    """The layout entry of one split, or a ValueError listing the known ones."""
    try:
        return LAYOUT[(dataset, split)]
    except KeyError:
        known = sorted(s for d, s in LAYOUT if d == dataset)
        if not known:
            raise ValueError(f"unknown dataset {dataset!r}; known: "
                             f"{sorted({d for d, _ in LAYOUT})}") from None
        raise ValueError(f"unknown {dataset} split {split!r}; known: {known}") from None


def answer_files(dataset: str) -> list[str]:
    """Answer tables a dataset's loader reads (relative paths)."""
    if dataset == "lxmert":
        return [PRETRAIN_ANSWER_FILE]
    return list(TASK_ANSWER_FILES.get(dataset, ()))


def needed_files(needs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Relative path -> what it is, for every file the (dataset, split) pairs read, in order."""
    files: dict[str, str] = {}
    for dataset, split in needs:
        entry = split_files(dataset, split)
        files.setdefault(entry.json, f"{DATASET_NAMES[dataset]}, split {split!r} (a JSON list)")
        for tsv in entry.tsvs:
            files.setdefault(tsv, "obj36 feature TSV (Faster R-CNN features of its images)")
        for table in answer_files(dataset):
            files.setdefault(table, f"{dataset} answer table (JSON)")
    return files


def _first_line_problem(path: Path) -> str | None:
    """A quick look at a TSV's first row: the obj36 format has 10 tab-separated fields."""
    with open(path, "rb") as f:
        head = f.readline(64 << 20)
    if not head.strip():
        return f"{path}: empty (expected an obj36 feature TSV)"
    fields = head.rstrip(b"\r\n").count(b"\t") + 1
    if fields != 10:
        return (f"{path}:1: {fields} tab-separated fields, expected 10 (img_id, img_h, img_w, "
                f"objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features)")
    return None


def check_data_root(root: str | Path, needs: list[tuple[str, str]]) -> list[str]:
    """Problems that would stop loading ``needs`` (pairs of dataset, split) from ``root``:
    unknown splits, missing or empty files (each named with its full path and what it is), and
    feature TSVs whose first row is not in the obj36 format. Empty list: all there."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: data root directory not found"]
    problems: list[str] = []
    known: list[tuple[str, str]] = []
    for dataset, split in needs:
        try:
            split_files(dataset, split)
            known.append((dataset, split))
        except ValueError as e:
            problems.append(str(e))
    for rel, what in needed_files(known).items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing ({what})")
        elif path.stat().st_size == 0:
            problems.append(f"{path}: empty file ({what})")
        elif path.suffix == ".tsv":
            problem = _first_line_problem(path)
            if problem:
                problems.append(problem)
        elif path.suffix == ".json":
            problem = _json_problem(path, what)
            if problem:
                problems.append(problem)
    from lxmert_bench.data.gqa_questions import gqa_eval_problems  # optional evaluation files

    for dataset, split in known:
        if dataset == "gqa" and not problems:
            problems += gqa_eval_problems(root, split, split_files(dataset, split).json_path(root))
    return problems


def _json_problem(path: Path, what: str) -> str | None:
    """Whether a JSON file parses, checked before any stage starts rather than hours into one."""
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except json.JSONDecodeError as e:
        return f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}; {what})"
    except UnicodeDecodeError as e:
        return f"{path}: not UTF-8 text at byte {e.start} ({what})"
    return None


_EDGE = 1 << 20  # bytes hashed at each end of a large file


def _hash_file(h: Any, path: Path, whole: bool) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if whole or size <= 2 * _EDGE:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return
        h.update(f.read(_EDGE))
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))


def fingerprint_data_root(root: str | Path, needs: list[tuple[str, str]]) -> str:
    """sha256 (hex) of the files ``needs`` read plus ``vocab.txt`` when present: JSONs and tables
    by full content, feature TSVs by size and their first and last MB (fast on 30 GB files).
    Missing files enter as 'missing' so the value is defined before check_data_root complains."""
    root = Path(root)
    files = sorted(needed_files(needs))
    if (root / VOCAB_FILE).is_file():
        files.append(VOCAB_FILE)
    h = hashlib.sha256()
    for rel in files:
        path = root / rel
        h.update(f"{rel}\0".encode())
        if not path.is_file():
            h.update(b"missing\0")
            continue
        _hash_file(h, path, whole=not rel.endswith(".tsv"))
    return h.hexdigest()


def store_dir(root: str | Path, tsv: str | os.PathLike, feature_dtype: str = "float32") -> Path:
    """Where the memory-mapped store of a feature TSV lives: ``<root>/.stores/<dir>/<name>``
    (``<name>.float16`` for half-precision features, so both can exist side by side)."""
    rel = Path(tsv)
    if rel.is_absolute():
        rel = rel.relative_to(Path(root))
    suffix = "" if feature_dtype == "float32" else f".{feature_dtype}"
    return Path(root) / STORES_DIR / rel.parent / f"{rel.stem}{suffix}"
