"""Optional experiment trackers fed from the same records as ``log.jsonl``.

- ``run.tensorboard: true``: TensorBoard event files in ``<run dir>/tensorboard/`` (one folder per
  stage, so ``tensorboard --logdir <workdir>/runs`` shows every stage); needs the optional
  ``tensorboard`` package (``pip install 'lxmert-bench[tensorboard]'``).
- ``run.wandb: true``: a Weights & Biases run per stage when ``wandb`` is installed (its own
  settings apply: ``WANDB_MODE=offline`` writes locally, with no network); without the package it
  says so once and the stage trains on.

Both are provenance (config.py): they never change a result or a stage's hash. The training loop
calls :func:`open_trackers` with the stage's log path and then ``log(record)`` for every record
it writes; the flags are read from the ``config.json`` beside that log, so the loop needs no
knowledge of them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) pairs of one log.jsonl record: ``train/loss``, ``train/loss/<task>``,
    ``train/lr`` for a training step; ``<split>/<metric>`` for an evaluation."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(record.get("metrics"), dict) and "split" in record:
        for name, value in record["metrics"].items():
            if number(value):
                yield f"{record['split']}/{name}", float(value)
        return
    for key in ("loss", "lr"):
        if number(record.get(key)):
            yield f"train/{key}", float(record[key])
    for name, value in (record.get("losses") or {}).items():
        if number(value):
            yield f"train/loss/{name}", float(value)


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "run.tensorboard: true needs the tensorboard package: pip install "
                "'lxmert-bench[tensorboard]' (or set run.tensorboard: false)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a stage can be killed at any time: what was logged is on disk

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="lxmert-bench", name=run_dir.name, dir=str(run_dir),
                              group=run_dir.parent.name, config=config, reinit=True,
                              resume="allow", id=f"{run_dir.parent.name}-{run_dir.name}")

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        values = dict(scalars(record))
        if values and isinstance(step, int):
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker a stage asked for; ``log`` and ``close`` go to each."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(log_path: str | Path, is_main: bool = True) -> Trackers:
    """The trackers the stage whose log is ``log_path`` enables in its ``config.json``
    (``tensorboard``, ``wandb``); none for other ranks, a missing config or none enabled."""
    run_dir = Path(log_path).parent
    if not is_main:
        return Trackers([])
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Trackers([])
    if not isinstance(config, dict):
        return Trackers([])
    out: list[Tracker] = []
    if config.get("tensorboard"):
        out.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR))
    if config.get("wandb"):
        try:
            out.append(WandbTracker(run_dir, config))
        except ImportError:
            print(f"lxmert-bench: run.wandb is set but wandb is not installed; {run_dir.name} "
                  "trains without it (pip install wandb)", file=sys.stderr, flush=True)
    return Trackers(out)
