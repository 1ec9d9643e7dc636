"""Faster R-CNN obj36 features in the official LXMERT TSV format.

Fields and dtypes follow the official ``src/utils.py``: numeric arrays are base64 of raw numpy
bytes; ``boxes`` are absolute (x1, y1, x2, y2) pixels.
"""

from __future__ import annotations

import base64
import binascii
import csv
import itertools
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
]
# field -> (dtype, trailing shape); the leading dimension is num_boxes
ARRAY_FIELDS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "objects_id": (np.dtype(np.int64), ()),
    "objects_conf": (np.dtype(np.float32), ()),
    "attrs_id": (np.dtype(np.int64), ()),
    "attrs_conf": (np.dtype(np.float32), ()),
    "boxes": (np.dtype(np.float32), (4,)),
    "features": (np.dtype(np.float32), (-1,)),
}
INT_FIELDS = ("img_h", "img_w", "num_boxes")
_NEEDS_QUOTING = re.compile(r'[\t\r\n"]')

csv.field_size_limit(sys.maxsize)


class FeatureFormatError(ValueError):
    """A row of a feature file does not follow the obj36 format; the message names file and line."""


def _decode(value: str, dtype: np.dtype, shape: tuple[int, ...], where: str, field: str) -> np.ndarray:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FeatureFormatError(f"{where}: field '{field}' is not valid base64") from None
    if len(raw) % dtype.itemsize:
        raise FeatureFormatError(
            f"{where}: field '{field}' has {len(raw)} bytes, not a multiple of {dtype} ({dtype.itemsize} bytes)"
        )
    arr = np.frombuffer(raw, dtype=dtype)
    expected = int(np.prod([d for d in shape if d != -1])) if shape else 1
    if -1 not in shape and arr.size != expected:
        raise FeatureFormatError(
            f"{where}: field '{field}' has {arr.size} values of {dtype}, expected {expected} "
            f"(shape {shape})"
        )
    if -1 in shape and (arr.size == 0 or arr.size % shape[0]):
        raise FeatureFormatError(
            f"{where}: field '{field}' has {arr.size} values, not divisible into {shape[0]} boxes"
        )
    arr = arr.reshape(shape)
    arr.setflags(write=False)
    return arr


def read_obj_tsv(path: str | Path, topk: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one dict per image of an obj36 TSV, stopping after ``topk`` rows (None or -1: all).

    A malformed row raises :class:`FeatureFormatError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file not found (expected an obj36 TSV)")
    if topk is not None and topk < 0:
        topk = None
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if topk is not None and lineno > topk:
                return
            yield decode_obj_row(row, f"{path}:{lineno}")


def decode_obj_row(row: list[str] | list[bytes], where: str) -> dict[str, Any]:
    """Decode one split TSV row into an image dict; errors name ``where`` (``file:line``).

    Fields may be ``str`` or (except ``img_id``) ASCII ``bytes``."""
    if len(row) != len(FIELDNAMES):
        raise FeatureFormatError(
            f"{where}: expected {len(FIELDNAMES)} tab-separated fields "
            f"({', '.join(FIELDNAMES)}), got {len(row)}"
        )
    item: dict[str, Any] = dict(zip(FIELDNAMES, row))
    for key in INT_FIELDS:
        try:
            item[key] = int(item[key])
        except ValueError:
            raise FeatureFormatError(
                f"{where}: field '{key}' should be an integer, got {_text(item[key])[:20]!r}"
            ) from None
    n = item["num_boxes"]
    for key, (dtype, trailing) in ARRAY_FIELDS.items():
        item[key] = _decode(item[key], dtype, (n, *trailing), where, key)
    return item


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def iter_obj_tsv_hashed(
    path: str | Path, topk: int | None = None, on_line: Callable[[bytes], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like :func:`read_obj_tsv`, yielding ``(line, item)``, and passing each raw line's bytes to
    ``on_line`` (a hash, a progress bar) so one streaming pass both decodes and fingerprints a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file not found (expected an obj36 TSV)")
    if topk is not None and topk < 0:
        topk = None

    if topk == 0:
        return

    def utf8(raw: bytes, lineno: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FeatureFormatError(f"{path}:{lineno}: line is not valid UTF-8") from None

    with open(path, "rb") as f:
        raw_lines = _tapped(f, on_line)
        for lineno, raw in enumerate(raw_lines, start=1):
            if b'"' in raw:
                # a quoted field (an unusual img_id) may even span lines: let csv read the record,
                # pulling any further lines from the same iterator
                text = (utf8(b, lineno) for b in itertools.chain([raw], raw_lines))
                row: list[str] | list[bytes] = next(csv.reader(text, delimiter="\t"))
            else:
                # base64 and integers are never quoted: a plain split is ~4x faster than csv,
                # and base64/int() take the bytes as they are (no decoding of the whole line)
                row = raw.rstrip(b"\r\n").split(b"\t")
                row[0] = utf8(row[0], lineno)
            yield lineno, decode_obj_row(row, f"{path}:{lineno}")
            # stop right after row ``topk`` so that ``on_line`` sees exactly the rows read
            if topk is not None and lineno >= topk:
                return


def _tapped(lines: Iterable[bytes], on_line: Callable[[bytes], None] | None) -> Iterator[bytes]:
    for raw in lines:
        if on_line is not None:
            on_line(raw)
        yield raw


def encode_obj_row(item: dict[str, Any]) -> list[str]:
    """One TSV row (list of field strings) for an image dict with the official dtypes."""
    row = []
    for key in FIELDNAMES:
        value = item[key]
        if key in ARRAY_FIELDS:
            dtype = ARRAY_FIELDS[key][0]
            arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
            row.append(base64.b64encode(arr.tobytes()).decode("ascii"))
        else:
            row.append(str(value))
    return row


def write_obj_tsv(path: str | Path, items: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> int:
    """Write image dicts as an obj36 TSV (as the official extraction scripts do); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for item in items:
            row = encode_obj_row(item)
            # base64 and integers never need CSV quoting; joining them is ~15x faster than the csv
            # writer's per-character scan and gives the same bytes (only img_id is checked)
            if _NEEDS_QUOTING.search(row[0]):
                writer.writerow(row)
            else:
                f.write("\t".join(row) + "\n")
            n += 1
    tmp.replace(path)
    return n
