"""Atomic file writes (a reader never sees a half-written result, a crash never leaves one) and
the one safe way to read a torch file (nothing in it can run code)."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


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
