"""Run directories on disk: ``<workdir>/runs/<kind>/<hash>/``.

Files a stage writes there (all JSON written atomically):

- ``config.json``   the frozen :class:`~lxmert_bench.config.RunConfig`
- ``log.jsonl``     one JSON object per logged step / eval: {"step", "epoch", "loss", "losses", "lr", ...}
- ``result.json``   written once, at the very end: the run is done iff this file exists
- ``error.json``    written when the run failed: {"error", "type", "traceback", "time"}
- ``checkpoints/``  ``last.pt`` (resume), ``best.pt`` (fine-tuning), ``model.pt`` (final weights)
- ``predictions/``  official submission-format files of the dev split, ``dev_scores.json``

The state of a stage is read from these files alone, so any later shell can see it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lxmert_bench.config import RunConfig
from lxmert_bench.io import atomic_write_json, read_json

DONE, FAILED, RUNNING, PENDING = "done", "failed", "running", "pending"


def default_workdir() -> Path:
    return Path(os.environ.get("LXMERT_BENCH_WORKDIR", "runs"))


class RunDir:
    """One stage's directory."""

    def __init__(self, workdir: str | os.PathLike, stage_id: str):
        self.workdir = Path(workdir)
        self.stage_id = stage_id
        self.path = self.workdir / "runs" / stage_id

    @classmethod
    def for_config(cls, workdir: str | os.PathLike, config: RunConfig) -> RunDir:
        return cls(workdir, config.stage_id)

    # file paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def error_path(self) -> Path:
        return self.path / "error.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def predictions_dir(self) -> Path:
        return self.path / "predictions"

    def dependency(self, stage_id: str) -> RunDir:
        """The run directory of another stage in the same workdir (e.g. ``config.init_from``)."""
        return RunDir(self.workdir, stage_id)

    # state
    def is_done(self) -> bool:
        return self.result_path.is_file()

    def is_failed(self) -> bool:
        return self.error_path.is_file() and not self.is_done()

    def has_started(self) -> bool:
        return self.log_path.exists() or self.checkpoint_dir.exists()

    def disk_state(self) -> str:
        if self.is_done():
            return DONE
        if self.is_failed():
            return FAILED
        if self.has_started():
            return RUNNING
        return PENDING

    # reading / writing
    def write_config(self, config: RunConfig) -> None:
        """Freeze a config into the run directory; refuse to change a finished run's config."""
        if self.config_path.exists():
            existing = RunConfig.from_dict(read_json(self.config_path))
            if existing.content_hash() != config.content_hash():
                raise RuntimeError(
                    f"{self.config_path}: holds a different config (hash {existing.content_hash()}) "
                    f"than stage {self.stage_id}; refusing to overwrite it"
                )
            if existing.to_dict() == config.to_dict():
                return
            if self.is_done():
                return  # a finished run keeps the config it ran with
        atomic_write_json(self.config_path, config.to_dict())

    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(read_json(self.config_path))

    def read_result(self) -> dict[str, Any] | None:
        return read_json(self.result_path) if self.result_path.is_file() else None

    def read_error(self) -> dict[str, Any] | None:
        return read_json(self.error_path) if self.error_path.is_file() else None

    def write_result(self, result: dict[str, Any]) -> None:
        if self.is_done():
            raise RuntimeError(f"{self.result_path}: run already finished; a result is never overwritten")
        if self.error_path.exists():
            self.error_path.unlink()
        atomic_write_json(self.result_path, result)

    def write_error(self, error: dict[str, Any]) -> None:
        atomic_write_json(self.error_path, error)

    def clear_error(self) -> None:
        if self.error_path.exists():
            self.error_path.unlink()
