"""Task datasets and the data-root layout, on a small synthetic benchmark."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lxmert_bench.data.answers import convert_ans
from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.layout import (
    LAYOUT,
    STORES_DIR,
    check_data_root,
    fingerprint_data_root,
    split_files,
    store_dir,
)
from lxmert_bench.data.synthetic import MIN_IMAGES, generate_synthetic
from lxmert_bench.data.tasks import (
    GQADataset,
    NLVR2Dataset,
    PretrainCorpus,
    VQADataset,
    collate,
)
from lxmert_bench.data.text import Tokenizer

DIM = 16
L = 20


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench")
    generate_synthetic(path, images=MIN_IMAGES, seed=0, feature_dim=DIM, progress=False)
    return path


@pytest.fixture(scope="module")
def tok(root):
    return Tokenizer.from_vocab(root / "vocab.txt", max_length=L)


def _json(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _tsv_ids(root: Path, rel: str, topk: int | None = None) -> list[str]:
    return [r["img_id"] for r in read_obj_tsv(root / rel, topk=topk)]


def test_every_synthetic_sentence_tokenizes_without_unknowns_or_truncation(root, tok) -> None:
    sents = [d["sent"] for rel in ("vqa/train.json", "gqa/valid.json", "nlvr2/train.json")
             for d in _json(root, rel)]
    sents += [s for d in _json(root, "lxmert/vgnococo.json") for v in d["sentf"].values() for s in v]
    sents += [a for d in _json(root, "lxmert/vgnococo.json") for labels in d["labelf"].values()
              for label in labels for a in label]
    unk = tok.token_to_id("[UNK]")
    for sent in sents:
        ids, mask = tok.encode(sent)
        assert unk not in ids, sent
        assert sum(mask) < L, sent  # ends with [SEP] before the limit: nothing was cut


# --- VQA / GQA / NLVR2 ------------------------------------------------------------------------
def test_vqa_items_and_batches(root, tok) -> None:
    ds = VQADataset(root, ["train", "nominival"], tok)
    raw = _json(root, "vqa/train.json") + _json(root, "vqa/nominival.json")
    assert len(ds) == len(raw) and ds.raw_examples == raw
    a2l = _json(root, "vqa/trainval_ans2label.json")
    assert ds.num_answers == len(a2l)
    item = ds[3]
    d = raw[3]
    assert item["question_id"] == d["question_id"] and item["img_id"] == d["img_id"]
    assert item["answer_type"] == d["answer_type"]
    assert item["input_ids"].shape == item["attention_mask"].shape == (L,)
    assert item["input_ids"].dtype == item["attention_mask"].dtype == torch.long
    assert item["feats"].shape == (36, DIM) and item["feats"].dtype == torch.float32
    assert item["boxes"].shape == (36, 4) and 0 <= item["boxes"].min() <= item["boxes"].max() <= 1
    expected = torch.zeros(len(a2l))
    for ans, score in d["label"].items():
        expected[a2l[ans]] = score
    assert torch.equal(item["target"], expected)
    # the features are the TSV's for that image
    row = next(r for r in read_obj_tsv(root / "mscoco_imgfeat/train2014_obj36.tsv")
               if r["img_id"] == d["img_id"])
    assert np.allclose(item["feats"].numpy(), row["features"])
    assert np.allclose(item["boxes"][:, 2].numpy(), row["boxes"][:, 2] / row["img_w"], atol=1e-6)

    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate)))
    assert batch["feats"].shape == (5, 36, DIM) and batch["target"].shape == (5, len(a2l))
    assert batch["input_ids"].shape == (5, L)
    assert batch["question_id"] == [d["question_id"] for d in raw[:5]]
    assert batch["answer_type"] == [d["answer_type"] for d in raw[:5]]


def test_minival_and_image_limit_read_the_first_images_of_the_feature_file(root, tok) -> None:
    assert split_files("vqa", "minival").topk == 5000
    minival = _json(root, "vqa/minival.json")
    assert len(VQADataset(root, ["minival"], tok)) == len(minival)
    first = set(_tsv_ids(root, "mscoco_imgfeat/val2014_obj36.tsv", topk=3))
    ds = VQADataset(root, ["minival"], tok, image_limit=3)
    assert {d["img_id"] for d in ds.raw_examples} == first  # only questions on loaded images
    assert len(ds) == sum(d["img_id"] in first for d in minival)
    # the limit applies per feature file, as the official --tiny: nominival's first val2014 images
    # are minival's, so none of its questions survive
    ds = VQADataset(root, "train,nominival", tok, image_limit=2)
    assert {d["img_id"] for d in ds.raw_examples} == set(
        _tsv_ids(root, "mscoco_imgfeat/train2014_obj36.tsv", topk=2))


def test_gqa_and_nlvr2_items(root, tok) -> None:
    gqa = GQADataset(root, ["train", "valid"], tok)
    assert len(gqa) == len(_json(root, "gqa/train.json")) + len(_json(root, "gqa/valid.json"))
    item = gqa[0]
    assert isinstance(item["question_id"], str) and "answer_type" not in item
    label = gqa.raw_examples[0]["label"]
    assert item["target"].sum() == 1.0
    assert gqa.label2ans[int(item["target"].argmax())] == next(iter(label))
    assert len(GQADataset(root, ["testdev"], tok)) == len(_json(root, "gqa/testdev.json"))

    nlvr2 = NLVR2Dataset(root, ["valid"], tok)
    raw = _json(root, "nlvr2/valid.json")
    assert len(nlvr2) == len(raw) and nlvr2.raw_examples == raw
    item = nlvr2[1]
    assert item["feats"].shape == (2, 36, DIM) and item["boxes"].shape == (2, 36, 4)
    assert item["label"].dtype == torch.long and int(item["label"]) == raw[1]["label"]
    assert item["identifier"] == raw[1]["identifier"] and item["uid"] == raw[1]["uid"]
    other = nlvr2.images.get(raw[1]["img1"])
    assert np.allclose(item["feats"][1].numpy(), other["features"])
    batch = collate([nlvr2[i] for i in range(4)])
    assert batch["feats"].shape == (4, 2, 36, DIM) and batch["label"].shape == (4,)
    assert batch["identifier"] == [d["identifier"] for d in raw[:4]]


def test_feature_stores_are_built_once_under_the_root(root, tok) -> None:
    VQADataset(root, ["train"], tok)
    store = store_dir(root, "mscoco_imgfeat/train2014_obj36.tsv")
    assert store == root / STORES_DIR / "mscoco_imgfeat" / "train2014_obj36"
    assert store.is_dir()
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert before
    VQADataset(root, ["train"], tok)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before


def test_half_precision_stores_live_beside_the_float32_ones(root, tok) -> None:
    full = NLVR2Dataset(root, ["valid"], tok)
    half = NLVR2Dataset(root, ["valid"], tok, feature_dtype="float16")
    assert store_dir(root, "nlvr2_imgfeat/valid_obj36.tsv", "float16").is_dir()
    assert store_dir(root, "nlvr2_imgfeat/valid_obj36.tsv").is_dir()
    a, b = full[0]["feats"], half[0]["feats"]
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


# --- pretraining corpus ---------------------------------------------------------------------
def test_pretrain_corpus_flattens_sentences_with_normalised_labels(root) -> None:
    splits = ["mscoco_train", "vgnococo"]
    corpus = PretrainCorpus(root, splits)
    data = [d for s in splits for d in _json(root, f"lxmert/{s}.json")]
    assert len(corpus) == sum(len(v) for d in data for v in d["sentf"].values())
    assert corpus.img_ids == [d["img_id"] for d in data if any(d["sentf"].values())]
    table = _json(root, "lxmert/all_ans.json")
    assert len(corpus.answer_table) == len(table)
    by_uid = {e["uid"]: e for e in corpus.entries}
    assert len(by_uid) == len(corpus)
    for d in data:
        for source, sents in d["sentf"].items():
            for i, sent in enumerate(sents):
                e = by_uid[f"{d['img_id']}_{source}_{i:03d}"]
                assert (e["img_id"], e["sent"], e["source"]) == (d["img_id"], sent, source)
                if source not in d["labelf"]:
                    assert e["label"] is None
                else:
                    raw = d["labelf"][source][i]
                    assert e["label"] == {convert_ans(a): s for a, s in raw.items()}
    v7w = [e for e in corpus.entries if e["source"] == "visual7w"]
    assert v7w and all(set(e["label"]) <= set(corpus.answer_table.answers) for e in v7w)

    feats = corpus.features(corpus.img_ids[0])
    assert feats["features"].shape == (36, DIM) and feats["boxes"].shape == (36, 4)
    assert {"objects_id", "objects_conf", "attrs_id", "attrs_conf"} <= set(feats)
    a = corpus.random_feature(np.random.default_rng(7))
    b = corpus.random_feature(np.random.default_rng(7))
    assert a.shape == (DIM,) and a.dtype == np.float32 and np.array_equal(a, b)
    draws = {corpus.random_feature(np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(draws) > 10


def test_pretrain_corpus_qa_sets_and_image_limit(root) -> None:
    gqa_only = PretrainCorpus(root, ["vgnococo"], qa_sets=["gqa"])
    tags = {e["ans"]: e["dsets"] for e in _json(root, "lxmert/all_ans.json")}
    assert set(gqa_only.answer_table.answers) == {a for a, d in tags.items() if "gqa" in d}
    for e in gqa_only.entries:
        if e["label"] is not None:
            assert set(e["label"]) <= set(gqa_only.answer_table.answers)
    limited = PretrainCorpus(root, ["mscoco_minival"], image_limit=4)
    assert set(limited.img_ids) == set(_tsv_ids(root, "mscoco_imgfeat/val2014_obj36.tsv", topk=4))
    with pytest.raises(KeyError, match="not among the loaded features"):
        limited.features("COCO_val2014_999999999999")


# --- errors ---------------------------------------------------------------------------------
@pytest.fixture()
def copy_root(root, tmp_path) -> Path:
    """A private copy of the JSONs, sharing the (read-only) feature files and stores."""
    for rel in ("vqa", "gqa", "nlvr2", "lxmert"):
        shutil.copytree(root / rel, tmp_path / rel)  # with gqa/questions/
    for rel in ("mscoco_imgfeat", "vg_gqa_imgfeat", "nlvr2_imgfeat", STORES_DIR, "vocab.txt"):
        os.symlink(root / rel, tmp_path / rel)
    return tmp_path


def test_bad_json_records_name_the_file_and_record(copy_root, tok) -> None:
    path = copy_root / "vqa" / "train.json"
    data = json.loads(path.read_text())
    del data[2]["img_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path}: record 2: missing key 'img_id'"):
        VQADataset(copy_root, ["train"], tok)
    path.write_text('[{"img_id": "x",')
    with pytest.raises(ValueError, match=rf"{path}:1:\d+: invalid JSON"):
        VQADataset(copy_root, ["train"], tok)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        VQADataset(copy_root, ["train"], tok)

    path = copy_root / "nlvr2" / "valid.json"
    data = json.loads(path.read_text())
    data[5]["label"] = "True"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path}: record 5: 'label' should be 0 or 1"):
        NLVR2Dataset(copy_root, ["valid"], tok)

    path = copy_root / "lxmert" / "vgnococo.json"
    data = json.loads(path.read_text())
    data[1]["labelf"]["gqa"] = data[1]["labelf"]["gqa"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path}: record 1: labelf\['gqa'\] should be a list "
                                         r"aligned with sentf\['gqa'\]"):
        PretrainCorpus(copy_root, ["vgnococo"])
    with pytest.raises(ValueError, match="unknown vqa split 'valid'; known: "):
        VQADataset(copy_root, ["valid"], tok)


# --- layout ---------------------------------------------------------------------------------
NEEDS = [("lxmert", "mscoco_train"), ("lxmert", "mscoco_minival"), ("vqa", "train"),
         ("vqa", "minival"), ("gqa", "testdev"), ("nlvr2", "valid")]


def test_check_data_root_names_each_missing_file(root, tmp_path) -> None:
    assert check_data_root(root, NEEDS) == []
    problems = check_data_root(tmp_path, NEEDS + [("vqa", "valid"), ("coco", "train")])
    text = "\n".join(problems)
    for rel in ("lxmert/mscoco_train.json", "lxmert/all_ans.json", "vqa/trainval_ans2label.json",
                "mscoco_imgfeat/train2014_obj36.tsv", "mscoco_imgfeat/val2014_obj36.tsv",
                "vg_gqa_imgfeat/gqa_testdev_obj36.tsv", "nlvr2/valid.json"):
        assert f"{tmp_path / rel}: missing" in text, rel
    assert "obj36 feature TSV" in text and "VQA questions, split 'minival'" in text
    assert "unknown vqa split 'valid'" in text and "unknown dataset 'coco'" in text
    assert sum("val2014_obj36.tsv" in p for p in problems) == 1  # named once, though shared
    assert check_data_root(tmp_path / "nope", NEEDS) == [f"{tmp_path / 'nope'}: data root directory not found"]


def test_check_data_root_looks_at_the_tsv_format(copy_root, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(copy_root / "vqa", bad / "vqa")
    (bad / "mscoco_imgfeat").mkdir()
    (bad / "mscoco_imgfeat" / "train2014_obj36.tsv").write_text("COCO_1\t480\t640\n")
    (bad / "mscoco_imgfeat" / "val2014_obj36.tsv").write_text("")
    problems = check_data_root(bad, [("vqa", "train"), ("vqa", "minival")])
    assert problems == [
        f"{bad}/mscoco_imgfeat/train2014_obj36.tsv:1: 3 tab-separated fields, expected 10 "
        "(img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, "
        "boxes, features)",
        f"{bad}/mscoco_imgfeat/val2014_obj36.tsv: empty file (obj36 feature TSV (Faster R-CNN "
        "features of its images))",
    ]


def test_fingerprint_follows_content_and_stays_fast_on_huge_files(copy_root, tmp_path) -> None:
    needs = [("vqa", "train"), ("nlvr2", "valid")]
    first = fingerprint_data_root(copy_root, needs)
    assert first == fingerprint_data_root(copy_root, needs)
    assert first != fingerprint_data_root(copy_root, needs + [("gqa", "train")])
    path = copy_root / "vqa" / "train.json"
    data = json.loads(path.read_text())
    data[-1]["label"] = {"yes": 1}
    path.write_text(json.dumps(data))
    second = fingerprint_data_root(copy_root, needs)
    assert second != first
    (copy_root / "vocab.txt").unlink()  # a symlink; the vocabulary is part of the identity too
    assert fingerprint_data_root(copy_root, needs) != second
    # a 6 GB (sparse) feature file: only its size and both ends are read
    huge = tmp_path / "huge"
    (huge / "nlvr2_imgfeat").mkdir(parents=True)
    with open(huge / "nlvr2_imgfeat" / "valid_obj36.tsv", "wb") as f:
        f.truncate(6 << 30)
    start = time.perf_counter()
    a = fingerprint_data_root(huge, [("nlvr2", "valid")])
    assert time.perf_counter() - start < 2
    with open(huge / "nlvr2_imgfeat" / "valid_obj36.tsv", "r+b") as f:
        f.seek((6 << 30) - 10)
        f.write(b"x")
    b = fingerprint_data_root(huge, [("nlvr2", "valid")])
    assert a != b and len(a) == 64
    assert fingerprint_data_root(tmp_path / "empty", [("nlvr2", "valid")]) != a  # missing: defined


def test_layout_maps_splits_to_the_official_feature_files() -> None:
    tsv = {k: v.tsvs for k, v in LAYOUT.items()}
    assert tsv[("vqa", "train")] == ("mscoco_imgfeat/train2014_obj36.tsv",)
    assert tsv[("vqa", "nominival")] == tsv[("vqa", "minival")] == ("mscoco_imgfeat/val2014_obj36.tsv",)
    assert tsv[("vqa", "test")] == ("mscoco_imgfeat/test2015_obj36.tsv",)
    assert tsv[("gqa", "train")] == tsv[("gqa", "valid")] == ("vg_gqa_imgfeat/vg_gqa_obj36.tsv",)
    assert tsv[("gqa", "testdev")] == ("vg_gqa_imgfeat/gqa_testdev_obj36.tsv",)
    for split in ("train", "valid", "test"):
        assert tsv[("nlvr2", split)] == (f"nlvr2_imgfeat/{split}_obj36.tsv",)
    assert tsv[("lxmert", "mscoco_train")] == tsv[("vqa", "train")]
    assert tsv[("lxmert", "mscoco_minival")] == tsv[("lxmert", "mscoco_nominival")] == tsv[("vqa", "minival")]
    assert tsv[("lxmert", "vgnococo")] == tsv[("gqa", "train")]
    assert all(v.json == f"{d}/{s}.json" for (d, s), v in LAYOUT.items())
