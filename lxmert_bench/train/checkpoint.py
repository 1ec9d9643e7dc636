"""Checkpoints and the global generators: ``last.pt`` (model, optimizer, schedule, every rank's
RNG states and the loop's bookkeeping), written atomically by rank 0 and read without running code,
and ``log.jsonl`` cut back to the checkpoint's step on resume so it never holds a step twice.
Together with the deterministic data order (train/loop.py) a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lxmert_bench.io import (
    RefusedFile,
    atomic_torch_save,
    iter_jsonl_objects,
    load_torch_file,
    write_jsonl,
)
from lxmert_bench.train.distributed import DistInfo, gather_objects

# Checkpoints hold tensors and plain Python values only and load with weights_only=True: a
# run directory on a shared filesystem may be writable by others, and a full unpickle of last.pt
# would run whatever they put there as the user who resumes.

# Checkpoints written before RNG states became tensors hold numpy's get_state() tuple, whose
# ndarray needs these globals; they only build arrays (under both numpy 1.x and 2.x names).
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
_PREVIOUS_FORMAT_GLOBALS: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))] + [
    (_reconstruct, f"{module}._reconstruct") for module in ("numpy._core.multiarray", "numpy.core.multiarray")]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """One of our checkpoints, read without running code (``weights_only=True``; previous-format
    files need only the numpy array globals above). A file holding anything else raises
    :class:`~lxmert_bench.io.RefusedFile` naming it; a torn one a RuntimeError naming it."""
    try:
        ckpt = load_torch_file(path, allow=_PREVIOUS_FORMAT_GLOBALS)
    except RefusedFile:
        raise
    except Exception as e:  # torn or foreign file: say which
        raise RuntimeError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); if it is a "
                           "stage's last.pt (torn by a crash or a full disk), move it away and "
                           "the stage restarts from the beginning") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path}: not a checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global generator's state as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}  # (int, tuple of ints, float | None)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
    else:  # a previous-format checkpoint: numpy's own tuple
        np.random.set_state(n)
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_all(seed: int) -> None:
    """Seed every global generator (model initialisation draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_last(path: Path, info: DistInfo, device: torch.device, **parts: Any) -> None:
    """``last.pt``: ``parts`` (state dicts, bookkeeping) and every rank's RNG states, gathered
    (collective under DDP: every rank calls it at the same step) and written by rank 0."""
    rngs = gather_objects(rng_state(device), info)
    if info.is_main:
        atomic_torch_save({**parts, "rng": rngs, "world_size": info.world_size}, path)


def restore_rng(ckpt: dict[str, Any], info: DistInfo, device: torch.device) -> None:
    """This rank's generators as they were at the checkpoint (rank 0's when it had fewer ranks)."""
    rngs = ckpt["rng"]
    set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0], device)


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps up to the checkpoint's (and drop a torn last line)."""
    if not path.exists():
        return
    records = iter_jsonl_objects(path.read_bytes().splitlines())
    write_jsonl(path, [r for r in records if r.get("step", 0) <= last_step])
