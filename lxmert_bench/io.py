"""Atomic file writes (a reader never sees a half-written result, a crash never leaves one) and
the one safe way to read a torch file (nothing in it can run code)."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import jsonlines


class RefusedFile(ValueError):
    """A file that would run code when loaded (or is otherwise not plain data): not loaded."""


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new temporary file next to ``name``, mode 0666 & ~umask (the kernel applies the umask,
    so results are as readable as anything else the user writes; mkstemp would make 0600).
    O_EXCL: never opens a file or symlink someone else planted under that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file in the same directory, fsync, then rename it to
    ``path``: ``path`` holds the old content or the whole new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # new directories: the user's umask
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_with` (same permissions as every result)."""
    import torch

    atomic_write_with(path, lambda f: torch.save(obj, f))


def load_torch_file(path: str | os.PathLike, allow: Iterable[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain Python values only,
    plus the globals in ``allow`` (objects, or ``(object, "module.name")`` pairs for names an older
    library version wrote). A file holding anything else, e.g. a pickled callable that would run
    code, raises :class:`RefusedFile` naming the file and the global; nothing from it runs.
    Other read errors (missing, torn) propagate with the file named."""
    import pickle

    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        if found is None:  # a torn or foreign file, not a refused object
            raise RuntimeError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
        what = re.sub(r" was not an allowed global by default.*", "", found.group(1)).strip()
        raise RefusedFile(
            f"{path}: refused to load: it holds a pickled object that is not plain data ({what}). "
            "Files this tool writes never do, so it was written by something else or altered; "
            "nothing in it was run. Load it only if you trust whoever could write it, or move it "
            "away (a stage without its last.pt starts over)") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


def human_bytes(n: float) -> str:
    """'512 B', '3.2 MiB', '2.7 GiB': sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def utc_now() -> str:
    """The timestamp every record the tool writes carries (UTC, seconds, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- JSON Lines (log.jsonl, results.jsonl, submissions.jsonl): one home, through `jsonlines` ------
def jsonl_line(record: Any) -> str:
    """``record`` as one JSON Lines line (with its newline)."""
    buf = io.StringIO()
    with jsonlines.Writer(buf) as writer:  # the spacing json.dumps writes
        writer.write(record)
    return buf.getvalue()


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append ``record`` as one line, in one ``write`` to a file opened for appending, so lines
    of concurrent appenders never interleave and a crash leaves at most a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(record))


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """The whole file at once, atomically (a reader sees the old file or the new one)."""
    atomic_write_text(path, "".join(jsonl_line(r) for r in records))


def parse_jsonl(lines: Iterable[str | bytes], where: str, torn_last_ok: bool = True,
                hint: str = "") -> list[dict[str, Any]]:
    """The objects of JSON Lines ``lines`` (blank lines skipped). A bad LAST line is dropped when
    ``torn_last_ok`` (a writer killed mid-line); any other bad line or a value that is not an
    object raises ValueError naming ``where`` and the line number."""
    lines = list(lines)
    out: list[dict[str, Any]] = []
    try:
        out.extend(jsonlines.Reader(lines).iter(type=dict, skip_empty=True))
    except jsonlines.InvalidLineError as e:
        not_json = isinstance(e.__cause__, ValueError)  # a decode error, not a wrong type
        last = max((i for i, ln in enumerate(lines, 1) if ln.strip()), default=0)
        if not_json and torn_last_ok and e.lineno == last:
            return out
        if not not_json:
            raise ValueError(f"{where}:{e.lineno}: expected a JSON object per line{hint}") from None
        raise ValueError(f"{where}:{e.lineno}: invalid JSON line ({e.__cause__}){hint}") from None
    return out


def read_jsonl(path: str | os.PathLike, torn_last_ok: bool = True, hint: str = ""
               ) -> list[dict[str, Any]]:
    """:func:`parse_jsonl` of a file; [] when it does not exist (nothing logged yet)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return parse_jsonl(lines, str(path), torn_last_ok, hint)


def iter_jsonl_objects(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any]]:
    """The objects among ``lines``, skipping anything that is not one (a live log being read
    while it is written: a follower must never stop on a bad line)."""
    for value in jsonlines.Reader(list(lines)).iter(skip_empty=True, skip_invalid=True):
        if isinstance(value, dict):
            yield value
