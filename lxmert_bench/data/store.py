"""Memory-mapped feature store: obj36 TSVs converted once into ``.npy`` arrays.

The official loaders read whole TSVs into Python dicts in every process (LXMERT_FACTS §8.1: 207 GB
with 4 workers). A store is a directory of ``.npy`` files opened with ``mmap``, so opening is
constant time, rows are read on demand, and DataLoader workers share the page cache:

    index.json           format version, counts, feature dtype, sources, fingerprint
    features.npy         [N, B, D] float32 or float16
    boxes.npy            [N, B, 4] float32, normalised to [0, 1] as the official loaders do
    objects_id.npy       [N, B] int64       objects_conf.npy  [N, B] float32
    attrs_id.npy         [N, B] int64       attrs_conf.npy    [N, B] float32
    img_h.npy, img_w.npy [N] int64
    img_ids.npy          [N] bytes, row order
    sorted_ids.npy       [N] bytes, sorted (binary search), sorted_rows.npy [N] int64: their rows

The image ids live in ``.npy`` files rather than in ``index.json`` so that opening a store never
parses O(N) JSON; ``FeatureStore.img_ids`` gives them in row order.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lxmert_bench.data.features import FeatureFormatError, iter_obj_tsv_hashed
from lxmert_bench.io import atomic_write_json, read_json, utc_now
from lxmert_bench.owner import owned_temp_dir

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
BOX_TOLERANCE = 1e-5  # the official loaders assert boxes within [-1e-5, 1 + 1e-5] after scaling
# name -> (dtype, per-image shape given (num_boxes, feature_dim)); features' dtype is chosen
ROW_ARRAYS: dict[str, tuple[str, Any]] = {
    "features": ("", lambda b, d: (b, d)),
    "boxes": ("<f4", lambda b, d: (b, 4)),
    "objects_id": ("<i8", lambda b, d: (b,)),
    "objects_conf": ("<f4", lambda b, d: (b,)),
    "attrs_id": ("<i8", lambda b, d: (b,)),
    "attrs_conf": ("<f4", lambda b, d: (b,)),
    "img_h": ("<i8", lambda b, d: ()),
    "img_w": ("<i8", lambda b, d: ()),
}
FEATURE_DTYPES = {"float32": "<f4", "float16": "<f2"}
_NPY_HEADER_BYTES = 128  # fixed so the header can be rewritten in place once N is known


class StoreError(ValueError):
    """A feature store is missing, incomplete, or does not match the TSVs it should come from."""


# ---------------------------------------------------------------------------------------------
# Reading


class FeatureStore:
    """Read-only view of one store directory; arrays are memory-mapped on first use.

    Pickles by path (no array data), so a DataLoader worker reopens the same files and shares
    their pages instead of receiving a copy.
    """

    def __init__(self, path: str | os.PathLike, index: dict[str, Any]):
        self.path = Path(path)
        self.index = index
        self._arrays: dict[str, np.ndarray] = {}
        self._img_ids: list[str] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open a finished store; reads only ``index.json`` (arrays are mapped lazily)."""
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            hint = " (a directory with no index.json)" if path.is_dir() else ""
            raise FileNotFoundError(
                f"{path}: not a feature store{hint}; build one with "
                f"`lxmert-bench data convert TSV... --out {path}`"
            )
        index = read_json(index_path)
        version = index.get("format_version") if isinstance(index, dict) else None
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{index_path}: feature store format_version {version!r}, expected {FORMAT_VERSION}; "
                "convert the TSVs again"
            )
        return cls(path, index)

    # -- metadata ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index["num_images"])

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, images={len(self)}, "
                f"boxes={self.num_boxes}, dim={self.feature_dim}, dtype={self.feature_dtype})")

    @property
    def fingerprint(self) -> str:
        """sha256 of the source TSV bytes that were converted (in source order)."""
        return str(self.index["fingerprint"])

    @property
    def feature_dim(self) -> int:
        return int(self.index["feature_dim"])

    @property
    def num_boxes(self) -> int:
        return int(self.index["num_boxes"])

    @property
    def feature_dtype(self) -> str:
        return str(self.index["feature_dtype"])

    @property
    def sources(self) -> list[dict[str, Any]]:
        return list(self.index["sources"])

    def nbytes(self) -> int:
        """Size of the store's files on disk."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    # -- arrays (lazy memmaps) -------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            file = self.path / f"{name}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except FileNotFoundError:
                raise StoreError(f"{file}: missing from the feature store; convert again") from None
            except ValueError as e:
                raise StoreError(f"{file}: not a valid .npy array ({e})") from None
            if arr.shape[:1] != (len(self),):
                raise StoreError(
                    f"{file}: has {arr.shape[0] if arr.ndim else 0} rows, "
                    f"index.json says {len(self)}; the store is damaged, convert again"
                )
            self._arrays[name] = arr
        return arr

    @property
    def features(self) -> np.ndarray:
        return self._array("features")

    @property
    def boxes(self) -> np.ndarray:
        return self._array("boxes")

    @property
    def objects_id(self) -> np.ndarray:
        return self._array("objects_id")

    @property
    def objects_conf(self) -> np.ndarray:
        return self._array("objects_conf")

    @property
    def attrs_id(self) -> np.ndarray:
        return self._array("attrs_id")

    @property
    def attrs_conf(self) -> np.ndarray:
        return self._array("attrs_conf")

    @property
    def img_h(self) -> np.ndarray:
        return self._array("img_h")

    @property
    def img_w(self) -> np.ndarray:
        return self._array("img_w")

    # -- ids -----------------------------------------------------------------------------------
    @property
    def img_ids(self) -> list[str]:
        """Image ids in row order (decoded once, on first use)."""
        if self._img_ids is None:
            self._img_ids = [b.decode("utf-8") for b in self._array("img_ids").tolist()]
        return self._img_ids

    def find(self, img_id: str) -> int:
        """Row of ``img_id`` or -1, by binary search over the sorted ids (no per-process dict)."""
        key = img_id.encode("utf-8")
        sorted_ids = self._array("sorted_ids")
        if len(key) > sorted_ids.dtype.itemsize or not key or len(self) == 0:
            return -1
        i = int(np.searchsorted(sorted_ids, key))
        if i < len(self) and sorted_ids[i] == key:
            return int(self._array("sorted_rows")[i])
        return -1

    def __contains__(self, img_id: object) -> bool:
        return isinstance(img_id, str) and self.find(img_id) >= 0

    def row(self, img_id: str) -> int:
        """Row index of ``img_id``; KeyError naming the store and the id when absent."""
        r = self.find(img_id)
        if r < 0:
            raise KeyError(f"{self.path}: image {img_id!r} is not in this feature store")
        return r

    def rows(self, img_ids: Iterable[str]) -> np.ndarray:
        return np.array([self.row(i) for i in img_ids], dtype=np.int64)

    # -- rows ----------------------------------------------------------------------------------
    def get(self, img_id: str) -> dict[str, Any]:
        """One image: features as float32 [B, D], boxes [B, 4] in [0, 1], ids/confs, img_h/img_w."""
        return self.get_row(self.row(img_id))

    def get_row(self, row: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= row < n:
            raise IndexError(f"{self.path}: row {row} out of range for {n} images")
        item: dict[str, Any] = {"img_id": self._array("img_ids")[row].decode("utf-8")}
        item["features"] = _as_float32(self.features[row])
        for name in ("boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            item[name] = np.array(self._array(name)[row])
        item["img_h"] = int(self.img_h[row])
        item["img_w"] = int(self.img_w[row])
        return item

    # -- pickling (DataLoader workers) -------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["index"])


def _as_float32(arr: np.ndarray) -> np.ndarray:
    """float32 copy of one image's features (float16 widened as in :func:`_widen_rows`)."""
    if arr.dtype == np.float32:
        return np.array(arr)
    out = np.empty((1, *arr.shape), dtype=np.float32)
    _widen_rows(arr[None], [(0, 0)], out)
    return out[0]


def _widen_rows(src: np.ndarray, pairs: Iterable[tuple[int, int]], out: np.ndarray) -> None:
    """``out[dst] = src[s]`` as float32 for float16 ``src``. torch widens half floats with SIMD,
    ~9x faster than numpy's cast, which would cap a float16 store at ~2.6k images/s."""
    import torch  # only float16 stores need it; keeps opening a store light

    target = torch.from_numpy(out)
    with warnings.catch_warnings():
        # the memory map is read-only; torch only reads it here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for dst, s in pairs:
            target[dst].copy_(torch.from_numpy(src[s]))


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header padded to a fixed size so it can be rewritten in place."""
    text = repr({"descr": dtype, "fortran_order": False, "shape": shape})
    body_len = _NPY_HEADER_BYTES - 10
    if len(text) + 1 > body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {_NPY_HEADER_BYTES} bytes")
    body = (text + " " * (body_len - len(text) - 1) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body


class _ArrayWriter:
    """Appends rows to a ``.npy`` file whose row count is only known at the end."""

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, dtype, row_shape
        self.rows = 0
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.write(_npy_header(dtype, (0, *row_shape)))

    def append(self, value: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(value, dtype=self.dtype).tobytes())
        self.rows += 1

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _source_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _hash_rows(path: Path, rows: int | None) -> str:
    """sha256 of the first ``rows`` lines of ``path`` (all when None), as conversion hashes them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if rows is not None and i >= rows:
                break
            h.update(raw)
    return h.hexdigest()


def _matches(index: dict[str, Any], tsvs: list[Path], feature_dtype: str,
             topk: int | None) -> str | None:
    """None when a finished store was built from ``tsvs`` with these options, else the reason."""
    if index.get("feature_dtype") != feature_dtype:
        return f"feature dtype {index.get('feature_dtype')}, asked for {feature_dtype}"
    if index.get("topk") != topk:
        return f"topk {index.get('topk')}, asked for {topk}"
    recorded = index.get("sources", [])
    if len(recorded) != len(tsvs):
        return f"{len(recorded)} source TSVs, asked for {len(tsvs)}"
    for rec, tsv in zip(recorded, tsvs):
        now = _source_record(tsv)
        if now["size"] != rec["size"]:
            return f"{tsv} has {now['size']} bytes, the store was built from {rec['size']}"
        if now["mtime_ns"] != rec["mtime_ns"]:
            # same size but touched or copied: the content decides (one hashing pass)
            rows = rec["rows"] if topk is not None else None
            if _hash_rows(tsv, rows) != rec["sha256"]:
                return f"{tsv} changed since the store was built (content hash differs)"
    return None


def _clean_feature_dtype(feature_dtype: str) -> str:
    name = np.dtype(feature_dtype).name
    if name not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be float32 or float16, got {feature_dtype!r}")
    return name


def _as_tsv_paths(tsv_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(tsv_paths, (str, os.PathLike)):
        tsv_paths = [tsv_paths]
    paths = [Path(p) for p in tsv_paths]
    if not paths:
        raise ValueError("convert_tsvs needs at least one TSV")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: feature file not found (expected an obj36 TSV)")
    return paths


def convert_tsvs(
    tsv_paths: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    feature_dtype: str = "float32",
    topk: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> FeatureStore:
    """Convert obj36 TSVs (read once, streaming) into a store at ``out_dir``.

    ``topk`` keeps the first rows of each file, as the official ``load_obj_tsv(fname, topk)``.
    The store is written to a temporary sibling directory and renamed into place, so a crash
    leaves no half-written store. A finished store already at ``out_dir`` is reused when it was
    built from the same files with the same options; a different one is an error unless
    ``overwrite``. For several concurrent processes use :func:`ensure_store`.
    """
    tsvs = _as_tsv_paths(tsv_paths)
    feature_dtype = _clean_feature_dtype(feature_dtype)
    if topk is not None and topk < 0:
        topk = None
    out_dir = Path(out_dir)
    existing = _existing_store(out_dir, tsvs, feature_dtype, topk, overwrite)
    if existing is not None:
        return existing

    tmp = owned_temp_dir(out_dir)  # the user's umask: readable by whoever shares the data root
    try:
        index = _write_store(tsvs, tmp, feature_dtype, topk, progress)
        atomic_write_json(tmp / INDEX_FILE, index)  # written last: its presence means finished
        return _publish(tmp, out_dir, tsvs, feature_dtype, topk, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _existing_store(out_dir: Path, tsvs: list[Path], feature_dtype: str, topk: int | None,
                    overwrite: bool) -> FeatureStore | None:
    if not (out_dir / INDEX_FILE).is_file():
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise StoreError(
                f"{out_dir}: exists and is not a feature store (no {INDEX_FILE}); "
                "choose another --out or remove it"
            )
        return None
    store = FeatureStore.open(out_dir)
    reason = _matches(store.index, tsvs, feature_dtype, topk)
    if reason is None:
        return store
    if overwrite:
        return None
    raise StoreError(
        f"{out_dir}: an existing feature store does not match the request ({reason}); "
        "pass overwrite=True or remove the directory"
    )


def _publish(tmp: Path, out_dir: Path, tsvs: list[Path], feature_dtype: str, topk: int | None,
             overwrite: bool) -> FeatureStore:
    """Move the finished ``tmp`` into place; if another process got there first, use theirs."""
    if out_dir.exists() and (overwrite or not (out_dir / INDEX_FILE).is_file()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(out_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # lost a race without a lock (e.g. flock unsupported on this filesystem): keep theirs
        if (out_dir / INDEX_FILE).is_file():
            store = FeatureStore.open(out_dir)
            reason = _matches(store.index, tsvs, feature_dtype, topk)
            if reason is None:
                return store
            raise StoreError(f"{out_dir}: another process wrote a different store ({reason})") from None
        raise
    return FeatureStore.open(out_dir)


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                disable=not (enabled and sys.stderr.isatty()))


def _write_store(tsvs: list[Path], out: Path, feature_dtype: str, topk: int | None,
                 progress: bool) -> dict[str, Any]:
    fingerprint = hashlib.sha256()
    seen: dict[str, str] = {}  # img_id -> "file:line", for duplicate errors
    img_ids: list[str] = []
    writers: dict[str, _ArrayWriter] = {}
    num_boxes = feature_dim = None
    sources = []
    total = sum(p.stat().st_size for p in tsvs)
    with _progress_bar(total, progress, "convert") as bar:
        for tsv in tsvs:
            record = _source_record(tsv)
            file_hash = hashlib.sha256()

            def on_line(raw: bytes, file_hash=file_hash) -> None:
                fingerprint.update(raw)
                file_hash.update(raw)
                bar.update(len(raw))

            rows = 0
            for lineno, item in iter_obj_tsv_hashed(tsv, topk, on_line):
                where = f"{tsv}:{lineno}"
                img_id = item["img_id"]
                if img_id in seen:
                    raise StoreError(
                        f"duplicate image id {img_id!r}: at {seen[img_id]} and at {where}"
                    )
                if not img_id or "\x00" in img_id:
                    raise FeatureFormatError(f"{where}: img_id must be a non-empty string without NUL")
                seen[img_id] = where
                feats = item["features"]
                if num_boxes is None:
                    num_boxes, feature_dim = feats.shape
                    for name, (dtype, shape) in ROW_ARRAYS.items():
                        dtype = dtype or FEATURE_DTYPES[feature_dtype]
                        writers[name] = _ArrayWriter(out / f"{name}.npy", dtype,
                                                     shape(num_boxes, feature_dim))
                if feats.shape != (num_boxes, feature_dim):
                    raise FeatureFormatError(
                        f"{where}: image {img_id!r} has features {feats.shape}, expected "
                        f"({num_boxes}, {feature_dim}) like the first image (the store needs a "
                        "fixed number of boxes)"
                    )
                _append_image(writers, item, where, feature_dtype)
                img_ids.append(img_id)
                rows += 1
            sources.append({**record, "rows": rows, "sha256": file_hash.hexdigest()})
    if not img_ids:
        raise StoreError(f"no images in {', '.join(map(str, tsvs))} (topk={topk})")
    for w in writers.values():
        w.finish()
    _write_ids(out, img_ids)
    return {
        "format_version": FORMAT_VERSION,
        "num_images": len(img_ids),
        "num_boxes": int(num_boxes),
        "feature_dim": int(feature_dim),
        "feature_dtype": feature_dtype,
        "boxes": "normalised x1/img_w, y1/img_h, x2/img_w, y2/img_h",
        "topk": topk,
        "sources": sources,
        "fingerprint": fingerprint.hexdigest(),
        "arrays": {name: f"{name}.npy" for name in (*ROW_ARRAYS, "img_ids", "sorted_ids",
                                                    "sorted_rows")},
        "created_at": utc_now(),
        "built_by": f"{socket.gethostname()}:{os.getpid()}",
    }


def _append_image(writers: dict[str, _ArrayWriter], item: dict[str, Any], where: str,
                  feature_dtype: str) -> None:
    img_id, h, w = item["img_id"], item["img_h"], item["img_w"]
    if h <= 0 or w <= 0:
        raise FeatureFormatError(f"{where}: image {img_id!r} has size {h}x{w}; expected positive")
    boxes = item["boxes"].copy()
    boxes[:, (0, 2)] /= w
    boxes[:, (1, 3)] /= h
    if boxes.size and not (boxes.min() >= -BOX_TOLERANCE and boxes.max() <= 1 + BOX_TOLERANCE):
        raise FeatureFormatError(
            f"{where}: image {img_id!r}: boxes fall outside the {w}x{h} image after normalising "
            f"(range [{boxes.min():.4f}, {boxes.max():.4f}], allowed [-1e-5, 1+1e-5]); "
            "boxes should be absolute (x1, y1, x2, y2) pixels"
        )
    feats = item["features"]
    for name, values in (("features", feats), ("boxes", item["boxes"]),
                         ("objects_conf", item["objects_conf"]), ("attrs_conf", item["attrs_conf"])):
        finite = np.isfinite(np.asarray(values, dtype=np.float64))
        if not finite.all():
            bad = int(np.argwhere(~finite)[0][0]) if finite.ndim else 0
            raise FeatureFormatError(f"{where}: image {img_id!r}: {name} hold NaN or Inf "
                                     f"({int((~finite).sum())} values, first in box {bad}); "
                                     "expected finite numbers")
    if feature_dtype == "float16":
        half = feats.astype(np.float16)
        if not np.isfinite(half).all() and np.isfinite(feats).all():
            raise FeatureFormatError(
                f"{where}: image {img_id!r}: a feature overflows float16 "
                f"(max |x| = {np.abs(feats).max():.4g}); store float32 instead"
            )
        feats = half
    writers["features"].append(feats)
    writers["boxes"].append(boxes)
    for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "img_h", "img_w"):
        writers[name].append(np.asarray(item[name]))


def _write_ids(out: Path, img_ids: list[str]) -> None:
    encoded = np.array([i.encode("utf-8") for i in img_ids])  # dtype S<max len>
    order = np.argsort(encoded, kind="stable")
    np.save(out / "img_ids.npy", encoded)
    np.save(out / "sorted_ids.npy", encoded[order])
    np.save(out / "sorted_rows.npy", order.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Concurrent jobs and the command line


def ensure_store(tsv_paths: str | os.PathLike | Iterable[str | os.PathLike],
                 store_dir: str | os.PathLike, **kw: Any) -> FeatureStore:
    """The store for ``tsv_paths`` at ``store_dir``, converting once even when many jobs ask at
    the same time: an exclusive ``flock`` on ``.<name>.lock`` beside it serialises them, and the
    build-then-rename in :func:`convert_tsvs` keeps it safe where ``flock`` is not honoured."""
    store_dir = Path(store_dir)
    if (store_dir / INDEX_FILE).is_file() and not kw.get("overwrite"):
        # common case: already built; no lock needed to read a finished store
        if isinstance(tsv_paths, (str, os.PathLike)):
            tsv_paths = [tsv_paths]
        tsvs = [Path(t) for t in tsv_paths]
        store = FeatureStore.open(store_dir)
        topk = kw.get("topk")
        topk = None if topk is not None and topk < 0 else topk
        dtype = _clean_feature_dtype(kw.get("feature_dtype", "float32"))
        if not all(t.is_file() for t in tsvs):
            # the TSVs may be deleted once converted (they are large): the store, built from
            # files of the same names with the same options, is all a job needs
            built_from = [Path(src["path"]).name for src in store.sources]
            if (built_from == [t.name for t in tsvs] and store.feature_dtype == dtype
                    and store.index.get("topk") == topk):
                return store
        elif _matches(store.index, tsvs, dtype, topk) is None:
            return store
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = store_dir.with_name(f".{store_dir.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return convert_tsvs(tsv_paths, store_dir, **kw)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_stamp(path: Path) -> tuple[Any, Any] | None:
    """When and by whom the store at ``path`` was built (None: no store there)."""
    try:
        index = read_json(path / INDEX_FILE)
        return index.get("created_at"), index.get("built_by")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


__all__ = [
    "FeatureStore", "StoreError", "build_stamp", "convert_tsvs", "ensure_store",
]
