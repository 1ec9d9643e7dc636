"""obj36 TSV codec and the memory-mapped feature store, on small generated TSVs."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lxmert_bench.data.store as store_mod
from lxmert_bench.cli import main as cli_main
from lxmert_bench.data.features import (
    FeatureFormatError,
    encode_obj_row,
    iter_obj_tsv_hashed,
    read_obj_tsv,
    write_obj_tsv,
)
from lxmert_bench.data.layout import SplitFiles
from lxmert_bench.data.store import (
    FeatureStore,
    StoreError,
    convert_tsvs,
    ensure_store,
)
from lxmert_bench.data.tasks import ImageFeatures

BOXES, DIM = 36, 8


def make_images(n: int, prefix: str = "COCO_val2014_", seed: int = 0, dim: int = DIM) -> list[dict]:
    """Images as the official extraction writes them: absolute pixel boxes inside the image."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        x1, y1 = rng.uniform(0, w - 2, BOXES), rng.uniform(0, h - 2, BOXES)
        x2, y2 = rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)
        items.append({
            "img_id": f"{prefix}{i:012d}", "img_h": h, "img_w": w,
            "objects_id": rng.integers(0, 1600, BOXES), "objects_conf": rng.random(BOXES, np.float32),
            "attrs_id": rng.integers(0, 400, BOXES), "attrs_conf": rng.random(BOXES, np.float32),
            "num_boxes": BOXES, "boxes": np.stack([x1, y1, x2, y2], 1).astype(np.float32),
            # spread over magnitudes so float16 rounding is exercised
            "features": (rng.standard_normal((BOXES, dim)) * 10).astype(np.float32),
        })
    # the exact image corner is allowed: boxes reaching (w, h) normalise to exactly 1
    items[0]["boxes"][0] = [0, 0, items[0]["img_w"], items[0]["img_h"]]
    return items


@pytest.fixture
def tsv(tmp_path: Path) -> tuple[Path, list[dict]]:
    items = make_images(12)
    path = tmp_path / "val2014_obj36.tsv"
    write_obj_tsv(path, items)
    return path, items


def sha256_of(path: Path, lines: int | None = None) -> str:
    data = path.read_bytes()
    if lines is not None:
        data = b"".join(data.splitlines(keepends=True)[:lines])
    return hashlib.sha256(data).hexdigest()


def official_boxes(item: dict) -> np.ndarray:
    boxes = item["boxes"].copy()
    boxes[:, (0, 2)] /= item["img_w"]
    boxes[:, (1, 3)] /= item["img_h"]
    return boxes


# ---------------------------------------------------------------------------------------------
# TSV codec


def test_tsv_round_trip_is_bit_exact(tsv):
    path, items = tsv
    lines = path.read_text().splitlines()
    assert len(lines) == len(items)
    assert all(len(line.split("\t")) == 10 for line in lines)
    back = list(read_obj_tsv(path))
    for a, b in zip(items, back):
        assert b["img_id"] == a["img_id"] and (b["img_h"], b["img_w"]) == (a["img_h"], a["img_w"])
        # the official dtypes (src/utils.py), whatever the writer was given (ids may be int32)
        expected = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64,
                    "attrs_conf": np.float32, "boxes": np.float32, "features": np.float32}
        for key, dtype in expected.items():
            assert b[key].dtype == np.dtype(dtype), (key, b[key].dtype)
            assert np.asarray(a[key]).astype(b[key].dtype).tobytes() == b[key].tobytes(), key
    # encoding the decoded rows again gives the same bytes
    assert ["\t".join(encode_obj_row(r)) for r in back] == lines
    assert [r["img_id"] for r in read_obj_tsv(path, topk=5)] == [i["img_id"] for i in items[:5]]


def test_streaming_reader_hashes_exactly_the_rows_it_reads(tsv):
    path, items = tsv
    h = hashlib.sha256()
    rows = list(iter_obj_tsv_hashed(path, None, h.update))
    assert [n for n, _ in rows] == list(range(1, 13))
    assert h.hexdigest() == sha256_of(path)
    h = hashlib.sha256()
    assert len(list(iter_obj_tsv_hashed(path, 4, h.update))) == 4
    assert h.hexdigest() == sha256_of(path, 4)


def test_quoted_image_ids_survive_both_readers_and_the_store(tmp_path):
    items = make_images(4)
    items[1]["img_id"] = 'odd\tid "quoted"'
    items[2]["img_id"] = "two\nlines"  # a csv record spanning two physical lines
    path = tmp_path / "odd.tsv"
    write_obj_tsv(path, items)
    ids = [i["img_id"] for i in items]
    assert [r["img_id"] for r in read_obj_tsv(path)] == ids
    h = hashlib.sha256()
    assert [(n, r["img_id"]) for n, r in iter_obj_tsv_hashed(path, None, h.update)] == [
        (1, ids[0]), (2, ids[1]), (3, ids[2]), (4, ids[3])]
    assert h.hexdigest() == sha256_of(path)
    store = convert_tsvs(path, tmp_path / "s", progress=False)
    assert store.img_ids == ids and store.row("two\nlines") == 2
    assert store.get(ids[3])["features"].tobytes() == items[3]["features"].tobytes()


def _corrupt(row: list[str], how: str) -> list[str]:
    row = list(row)
    if how == "field count":
        row = row[:-1]
    elif how == "base64":
        row[9] = row[9][:-4] + "!!!!"
    elif how == "byte length":
        row[8] = base64.b64encode(np.zeros(35 * 4, np.float32).tobytes()).decode()
    elif how == "height":
        row[1] = "4x0"
    return row


@pytest.mark.parametrize("how, message", [
    ("field count", "expected 10 tab-separated fields"),
    ("base64", "field 'features' is not valid base64"),
    ("byte length", "field 'boxes' has 140 values"),
    ("height", "field 'img_h' should be an integer"),
])
def test_malformed_row_names_file_and_line(tmp_path, how, message):
    items = make_images(4)
    rows = [encode_obj_row(i) for i in items]
    rows[2] = _corrupt(rows[2], how)
    path = tmp_path / "bad.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(FeatureFormatError, match=rf"{path}:3: {message}"):
        list(read_obj_tsv(path))
    out = tmp_path / "store"
    with pytest.raises(FeatureFormatError, match=rf"{path}:3: {message}"):
        convert_tsvs([path], out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv"]  # no temporary left over


def test_missing_files_give_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: feature file not found"):
        list(read_obj_tsv(missing))
    with pytest.raises(FileNotFoundError, match=rf"{missing}: feature file not found"):
        convert_tsvs([missing], tmp_path / "s", progress=False)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'empty'}: not a feature store"):
        FeatureStore.open(tmp_path / "empty")
    assert cli_main(["data", "convert", str(missing), "--out", str(tmp_path / "s")]) == 2
    assert f"{missing}: feature file not found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# Store contents


def test_store_float32_is_exact_and_boxes_normalised(tsv, tmp_path):
    path, items = tsv
    store = convert_tsvs([path], tmp_path / "store", progress=False)
    assert len(store) == 12 and store.feature_dim == DIM and store.num_boxes == BOXES
    assert store.img_ids == [i["img_id"] for i in items]
    assert store.fingerprint == sha256_of(path)
    assert store.features.dtype == np.float32 and store.features.shape == (12, BOXES, DIM)
    for r, item in enumerate(items):
        got = store.get(item["img_id"])
        assert store.row(item["img_id"]) == r and got["img_id"] == item["img_id"]
        assert got["features"].tobytes() == item["features"].tobytes()
        assert got["boxes"].tobytes() == official_boxes(item).tobytes()
        assert got["boxes"].min() >= 0 and got["boxes"].max() <= 1
        np.testing.assert_array_equal(got["objects_id"], item["objects_id"])
        np.testing.assert_array_equal(got["attrs_conf"], item["attrs_conf"])
        assert (got["img_h"], got["img_w"]) == (item["img_h"], item["img_w"])
    assert store.get(items[0]["img_id"])["boxes"][0].tolist() == [0, 0, 1, 1]
    # the files are plain .npy arrays any numpy can map
    feats = np.load(store.path / "features.npy", mmap_mode="r")
    assert feats.shape == (12, BOXES, DIM) and feats[3].tobytes() == items[3]["features"].tobytes()


def test_store_float16_within_half_precision(tsv, tmp_path):
    path, items = tsv
    store = convert_tsvs([path], tmp_path / "half", feature_dtype="float16", progress=False)
    assert store.features.dtype == np.float16 and store.feature_dtype == "float16"
    got = np.stack([store.get_row(i)["features"] for i in range(12)])
    assert got.dtype == np.float32
    want = np.stack([i["features"] for i in items])
    np.testing.assert_allclose(got, want, rtol=2**-11, atol=1e-6)
    assert not np.array_equal(got, want)  # really rounded, not a float32 copy
    assert got.tobytes() == want.astype(np.float16).astype(np.float32).tobytes()  # exact widening
    assert store.get(items[5]["img_id"])["features"].tobytes() == got[5].tobytes()
    half = store.features[[5, 1]]  # the stored half floats, as the memory map holds them
    assert half.dtype == np.float16 and half.tobytes() == want[[5, 1]].astype(np.float16).tobytes()
    assert store.features.nbytes == want.nbytes // 2


def test_get_row_reads_any_row_in_any_order(tsv, tmp_path):
    path, items = tsv
    store = convert_tsvs([path], tmp_path / "store", progress=False)
    for r in [7, 2, 11, 2, 0]:
        item = store.get_row(r)
        assert item["features"].shape == (BOXES, DIM)
        assert item["features"].tobytes() == items[r]["features"].tobytes()
        assert item["boxes"].tobytes() == official_boxes(items[r]).tobytes()
        assert item["img_w"] == items[r]["img_w"]
    with pytest.raises(IndexError, match="row 12 out of range for 12 images"):
        store.get_row(12)


def test_unknown_image_names_store_and_id(tsv, tmp_path):
    path, _ = tsv
    store = convert_tsvs([path], tmp_path / "store", progress=False)
    with pytest.raises(KeyError, match=rf"{tmp_path / 'store'}: image 'COCO_val2014_9' is not in"):
        store.row("COCO_val2014_9")
    assert "COCO_val2014_000000000003" in store and "x" * 300 not in store


def test_topk_keeps_the_first_rows_of_each_file(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_obj_tsv(a, make_images(6, "a"))
    write_obj_tsv(b, make_images(5, "b", seed=1))
    store = convert_tsvs([a, b], tmp_path / "s", topk=3, progress=False)
    assert store.img_ids == [f"a{i:012d}" for i in range(3)] + [f"b{i:012d}" for i in range(3)]
    whole = hashlib.sha256()
    for p in (a, b):
        whole.update(b"".join(p.read_bytes().splitlines(keepends=True)[:3]))
    assert store.fingerprint == whole.hexdigest()
    assert [s["rows"] for s in store.sources] == [3, 3]


def test_duplicate_ids_across_tsvs_name_both_files(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_obj_tsv(a, make_images(3))
    write_obj_tsv(b, make_images(5, seed=1)[2:])  # ids 2..4: id 2 is in both
    with pytest.raises(StoreError, match=rf"'COCO_val2014_000000000002': at {a}:3 and at {b}:1"):
        convert_tsvs([a, b], tmp_path / "s", progress=False)


def test_box_outside_image_names_the_image(tmp_path):
    items = make_images(3)
    items[1]["boxes"][5, 2] = items[1]["img_w"] + 5
    path = tmp_path / "x.tsv"
    write_obj_tsv(path, items)
    with pytest.raises(FeatureFormatError, match=rf"{path}:2: image 'COCO_val2014_000000000001': "
                                                 "boxes fall outside"):
        convert_tsvs([path], tmp_path / "s", progress=False)


def test_image_features_read_several_stores_by_binary_search(tmp_path):
    """A split's images over several TSVs (e.g. GQA's), each limited to its first topk rows as the
    official loader does; lookups go through each store's sorted ids, with no dict of all ids."""
    (tmp_path / "f").mkdir()
    ia, ib = make_images(4, "vg"), make_images(3, "n", seed=2)
    write_obj_tsv(tmp_path / "f" / "a.tsv", ia)
    write_obj_tsv(tmp_path / "f" / "b.tsv", ib)
    both = SplitFiles("gqa", "x", "gqa/x.json", ("f/a.tsv", "f/b.tsv"))
    images = ImageFeatures(tmp_path, [both])
    assert len(images) == 7 and images.img_ids[4:] == [i["img_id"] for i in ib]
    assert images.get(ib[1]["img_id"])["features"].tobytes() == ib[1]["features"].tobytes()
    assert images.get(ia[0]["img_id"])["boxes"].tobytes() == official_boxes(ia[0]).tobytes()
    assert not any(isinstance(v, dict) and len(v) >= 7 for v in vars(images).values())
    with pytest.raises(KeyError, match="'zzz' is not among the loaded features"):
        images.get("zzz")
    # topk: the first 2 images of each file; the others are not read
    first_two = ImageFeatures(tmp_path, [SplitFiles("gqa", "x", "gqa/x.json", both.tsvs, 2)])
    assert first_two.img_ids == [ia[0]["img_id"], ia[1]["img_id"], ib[0]["img_id"], ib[1]["img_id"]]
    assert ia[2]["img_id"] not in first_two and ib[1]["img_id"] in first_two and 5 not in first_two


# ---------------------------------------------------------------------------------------------
# Laziness, reuse, crashes, concurrency, workers


def test_open_is_lazy(tsv, tmp_path):
    path, items = tsv
    built = convert_tsvs([path], tmp_path / "store", progress=False)
    (built.path / "features.npy").unlink()  # open must not touch the arrays
    store = FeatureStore.open(built.path)
    assert store._arrays == {} and len(store) == 12 and store.feature_dim == DIM
    assert store.row(items[4]["img_id"]) == 4  # ids come from their own small files
    assert "features" not in store._arrays
    with pytest.raises(StoreError, match=rf"{built.path / 'features.npy'}: missing"):
        store.get(items[4]["img_id"])


def test_existing_store_is_reused_checked_and_overwritten(tsv, tmp_path):
    path, items = tsv
    out = tmp_path / "store"
    first = convert_tsvs([path], out, progress=False)
    stamp = (first.index["created_at"], first.index["built_by"])
    again = convert_tsvs([path], out, progress=False)
    assert (again.index["created_at"], again.index["built_by"]) == stamp
    # touched but identical content: still reused (decided by the content hash)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert convert_tsvs([path], out, progress=False).index["built_by"] == stamp[1]
    with pytest.raises(StoreError, match="feature dtype float32, asked for float16"):
        convert_tsvs([path], out, feature_dtype="float16", progress=False)
    items[3]["features"] = items[3]["features"] + 1  # same size, different content
    write_obj_tsv(path, items)
    with pytest.raises(StoreError, match=rf"{out}: an existing feature store does not match.*"
                                         "content hash differs"):
        convert_tsvs([path], out, progress=False)
    fresh = convert_tsvs([path], out, progress=False, overwrite=True)
    assert fresh.fingerprint == sha256_of(path) != first.fingerprint
    assert fresh.get_row(3)["features"].tobytes() == items[3]["features"].tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "val2014_obj36.tsv"]


def test_crash_during_conversion_leaves_nothing(tsv, tmp_path, monkeypatch):
    path, _ = tsv
    calls = []
    real = store_mod._append_image

    def dies_on_fifth(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(store_mod, "_append_image", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        convert_tsvs([path], tmp_path / "store", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2014_obj36.tsv"]


def _ensure_in_child(tsv_path: str, out: str, queue) -> None:
    store = ensure_store([tsv_path], out, progress=False)
    queue.put((store.index["built_by"], store.fingerprint, len(store)))


def test_concurrent_ensure_store_builds_one_store(tsv, tmp_path):
    path, _ = tsv
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    out = tmp_path / "shared" / "store"
    procs = [ctx.Process(target=_ensure_in_child, args=(str(path), str(out), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]  # both opened the store one of them built
    assert results[0][1] == sha256_of(path) and results[0][2] == 12
    builder_pid = int(results[0][0].rsplit(":", 1)[1])
    assert builder_pid in {p.pid for p in procs}
    assert sorted(p.name for p in out.parent.iterdir()) == [".store.lock", "store"]


def test_ensure_store_works_after_the_tsvs_are_deleted(tsv, tmp_path):
    path, items = tsv
    out = tmp_path / "stores" / "val2014"
    built = ensure_store([path], out, progress=False)
    path.unlink()  # TSVs are large; a converted store is all that jobs need
    again = ensure_store([path], out, progress=False)
    assert again.index["built_by"] == built.index["built_by"] and len(again) == 12
    with pytest.raises(FileNotFoundError, match=rf"{path}: feature file not found"):
        ensure_store([path], out, feature_dtype="float16", progress=False)  # would need a rebuild
    with pytest.raises(FileNotFoundError, match="other.tsv: feature file not found"):
        ensure_store([tmp_path / "other.tsv"], out, progress=False)


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore, img_ids: list[str]):
        self.store, self.img_ids = store, img_ids

    def __len__(self) -> int:
        return len(self.img_ids)

    def __getitem__(self, i: int):
        item = self.store.get(self.img_ids[i])
        return i, torch.from_numpy(item["features"]), torch.from_numpy(item["boxes"])


def test_dataloader_workers_read_correct_rows(tsv, tmp_path):
    path, items = tsv
    store = FeatureStore.open(convert_tsvs([path], tmp_path / "store", progress=False).path)
    store.get(items[0]["img_id"])  # maps arrays in the parent: pickling must still be by path
    state = pickle.dumps(store)
    assert len(state) < 4096  # no array data travels to the workers
    assert pickle.loads(state)._arrays == {}
    order = [5, 0, 11, 3, 8, 1, 9, 2, 7, 4, 10, 6]
    ds = _StoreDataset(store, [items[r]["img_id"] for r in order])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    seen = 0
    for idx, feats, boxes in loader:
        for k, i in enumerate(idx.tolist()):
            item = items[order[i]]
            assert feats[k].numpy().tobytes() == item["features"].tobytes()
            assert boxes[k].numpy().tobytes() == official_boxes(item).tobytes()
            seen += 1
    assert seen == 12


def test_data_convert_prints_summary(tsv, tmp_path, capsys):
    path, _ = tsv
    out = tmp_path / "cli"
    convert = ["data", "convert", str(path), "--out", str(out)]
    assert cli_main([*convert, "--fp16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: 12 images x 36 boxes x 8 float16") and "on disk" in line
    assert FeatureStore.open(out).fingerprint[:16] in line and "converted" in line
    assert cli_main([*convert, "--fp16"]) == 0
    assert "(reused)" in capsys.readouterr().out
    assert cli_main(convert) == 2  # exists with another dtype
    assert "does not match" in capsys.readouterr().err
