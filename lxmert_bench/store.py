"""Run directories on disk: ``<workdir>/runs/<kind>/<hash>/``.

Files a stage writes there (all JSON written atomically):

- ``config.json``   the frozen :class:`~lxmert_bench.config.RunConfig`
- ``log.jsonl``     one JSON object per logged step / eval: {"step", "epoch", "loss", "losses", "lr", ...}
- ``result.json``   written once, at the very end: the run is done iff this file exists
- ``error.json``    written when the run failed: {"error", "type", "traceback", "time"}
- ``checkpoints/``  ``last.pt`` (resume), ``best.pt`` (fine-tuning), ``model.pt`` (final weights)
- ``predictions/``  official submission-format files of the dev split, ``dev_scores.json``
- ``stage.lock``    held (``flock``) by the one process executing the stage; says its host and pid

The state of a stage is read from these files (and, for Slurm jobs, the scheduler), so any later
shell can see it. The states, and who moves a stage between them:

- ``to run``       nothing started (the launcher moves it to queued/running)
- ``queued``       submitted, waiting for the scheduler (the launcher; the scheduler starts it)
- ``running``      its lock is held by a live process (only the executing process takes the lock)
- ``done``         ``result.json`` exists (written last, by the stage itself); final
- ``interrupted``  started, then ended without a result by a signal, a kill, a crash, a preemption
                   or ``cancel``; a plain re-run resumes it from its last checkpoint
- ``failed``       the stage raised (``error.json``); waits for ``run --retry-failed``
- ``orphaned``     a dependency failed; re-planned once the dependency is done
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lxmert_bench.config import RunConfig
from lxmert_bench.io import atomic_write_json, read_json, utc_now
from lxmert_bench.owner import HOST

# The one vocabulary of stage states (module docstring).
TO_RUN, QUEUED, RUNNING, DONE = "to run", "queued", "running", "done"
INTERRUPTED, FAILED, ORPHANED = "interrupted", "failed", "orphaned"
PENDING = TO_RUN  # on disk: configured, never started
ACTIVE = (QUEUED, RUNNING)
STATES = (TO_RUN, QUEUED, RUNNING, DONE, INTERRUPTED, FAILED, ORPHANED)
NOT_DONE_WORST_FIRST = (FAILED, ORPHANED, INTERRUPTED, RUNNING, QUEUED, TO_RUN)  # for summaries


class StageBusy(RuntimeError):
    """The stage is being executed by another process (its lock is held)."""

    def __init__(self, run_dir: RunDir, holder: dict[str, Any]):
        self.holder = holder
        super().__init__(f"{run_dir.stage_id}: already running ({describe_holder(holder)}); "
                         "a stage never runs twice at once")


def describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def default_workdir() -> Path:
    return Path(os.environ.get("LXMERT_BENCH_WORKDIR", "runs"))


class RunDir:
    """One stage's directory."""

    def __init__(self, workdir: str | os.PathLike, stage_id: str):
        self.workdir = Path(workdir)
        self.stage_id = stage_id
        self.path = self.workdir / "runs" / stage_id

    @classmethod
    def at(cls, path: str | os.PathLike) -> RunDir:
        """The run directory at ``path`` (normally ``<workdir>/runs/<kind>/<hash>``)."""
        path = Path(path)
        run_dir = cls(path.parent.parent.parent, f"{path.parent.name}/{path.name}")
        run_dir.path = path  # kept as given, wherever it is
        return run_dir

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

    @property
    def lock_path(self) -> Path:
        return self.path / "stage.lock"

    def dependency(self, stage_id: str) -> RunDir:
        """The run directory of another stage in the same workdir (e.g. ``config.init_from``)."""
        return RunDir(self.workdir, stage_id)

    # state
    def is_done(self) -> bool:
        """``result.json`` exists and is a result (a torn or foreign file is not)."""
        return self.result_path.is_file() and self.result_problem() is None

    def result_problem(self) -> str | None:
        """Why an existing ``result.json`` is not a result, or None."""
        try:
            self.read_result()
        except ValueError as e:
            return str(e)
        return None

    def is_failed(self) -> bool:
        """Raised an error, or left a result.json that is not one (a stage ended by a signal or
        a kill is interrupted, not failed)."""
        if self.result_path.is_file():
            return self.result_problem() is not None
        err = self.error_record()
        return err is not None and not err.get("interrupted")

    def has_started(self) -> bool:
        return self.log_path.exists() or self.checkpoint_dir.exists()

    def error_record(self) -> dict[str, Any] | None:
        try:
            err = self.read_error()
        except ValueError:  # a torn or hand-edited error.json still says the stage ended badly
            return {"error": f"{self.error_path}: unreadable"}
        return err if isinstance(err, dict) or err is None else {"error": str(err)}

    def disk_state(self) -> str:
        """The state as the run directory alone tells it (no scheduler)."""
        if self.is_done():
            return DONE
        if self.lock_holder() is not None:
            return RUNNING
        if self.is_failed():
            return FAILED
        if self.has_started() or self.error_path.is_file():
            return INTERRUPTED
        return TO_RUN

    # the execution lock ------------------------------------------------------------------------
    def lock_holder(self) -> dict[str, Any] | None:
        """Who executes the stage now ({"host", "pid", "since"}), or None when no process does.

        The lock is an ``flock`` the kernel drops when its process dies, so a killed stage never
        looks running. (On a cluster filesystem whose locks are not shared between nodes, this sees
        only holders on this node; Slurm stages are also judged by the scheduler's state.)
        """
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                try:
                    holder = json.loads(raw)
                except ValueError:
                    holder = {}
                return holder if isinstance(holder, dict) else {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def execution_lock(self, wait: bool = False, poll_s: float = 2.0) -> Iterator[None]:
        """Hold the stage's lock while executing it; raises :class:`StageBusy` when another process
        holds it (or, with ``wait``, blocks until it is free)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if not wait:
                        raise StageBusy(self, self.lock_holder() or {}) from None
                    time.sleep(poll_s)
            me = json.dumps({"host": HOST, "pid": os.getpid(),
                             "since": utc_now()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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
        """The result, None when there is none yet; ValueError naming the file for one that is
        not a result (nothing else the tool reads is trusted to be what it says)."""
        if not self.result_path.is_file():
            return None
        result = read_json(self.result_path)
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict) \
                or result.get("stage_id") != self.stage_id:
            raise ValueError(f"{self.result_path}: not a result of stage {self.stage_id} (expected "
                             "a JSON object with its stage_id and metrics); move it away to run "
                             "the stage again")
        return result

    def read_error(self) -> dict[str, Any] | None:
        return read_json(self.error_path) if self.error_path.is_file() else None

    def write_result(self, result: dict[str, Any]) -> None:
        if self.result_path.exists():
            raise RuntimeError(f"{self.result_path}: run already finished; a result is never overwritten")
        if self.error_path.exists():
            self.error_path.unlink()
        atomic_write_json(self.result_path, result)

    def write_error(self, error: dict[str, Any]) -> None:
        atomic_write_json(self.error_path, error)

    def archive(self) -> Path:
        """Move this run directory to ``<workdir>/archive/<kind>/<hash>-<UTC time>/`` (never
        deleted) so the stage is planned anew; refused while a process executes it."""
        with self.execution_lock():  # raises StageBusy while it runs; held during the move
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            kind, digest = self.stage_id.split("/")
            dest = self.workdir / "archive" / kind / f"{digest}-{stamp}"
            n = 1
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{digest}-{stamp}-{n}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.path, dest)
        return dest

    def clear_error(self) -> None:
        if self.error_path.exists():
            self.error_path.unlink()


# Finished runs planned before the code version was declared carry a hash of the sources
# ("0.1.0+1a2b3c4d"): any edit gave every stage a new hash. They are adopted once under the declared
# version (renamed to their new hash, config and result updated, ``adopted.json`` saying from what),
# so no finished work becomes "to run" because of the new scheme.
LEGACY_CODE_VERSION = re.compile(r"\d+\.\d+\.\d+\+[0-9a-f]{8}")
KIND_ORDER = ("bert", "pretrain", "finetune")  # parents before the stages started from them


def adopt_legacy_runs(workdir: str | os.PathLike, version: str) -> dict[str, str]:
    """Adopt finished legacy runs of ``workdir`` under ``version``; returns {old id: new id}.
    Unfinished ones stay where they are (a queued job may still run them); nothing is deleted."""
    runs = Path(workdir) / "runs"
    adopted: dict[str, str] = {}
    for kind in KIND_ORDER:
        if not (runs / kind).is_dir():
            continue
        for path in sorted((runs / kind).iterdir()):
            if path.is_symlink():  # the forwarding name of a run adopted before
                continue
            old = RunDir(workdir, f"{kind}/{path.name}")
            new_id = _adopt(old, version, adopted)
            if new_id:
                adopted[old.stage_id] = new_id
    return adopted


def _adopt(old: RunDir, version: str, adopted: dict[str, str]) -> str | None:
    try:
        raw = read_json(old.config_path) if old.config_path.is_file() else None
        result = read_json(old.result_path) if old.result_path.is_file() else None
    except ValueError:
        return None
    if not (isinstance(raw, dict) and isinstance(result, dict)) or old.lock_holder() is not None:
        return None
    legacy = str(raw.get("code_version", ""))
    if not LEGACY_CODE_VERSION.fullmatch(legacy) or result.get("stage_id") != old.stage_id:
        return None
    parent = raw.get("init_from")
    if parent:
        parent_path = old.dependency(parent).path
        if parent in adopted:
            raw = {**raw, "init_from": adopted[parent]}
        elif parent_path.is_symlink():  # adopted by an earlier call
            raw = {**raw, "init_from": f"{parent.split('/')[0]}/{parent_path.resolve().name}"}
        elif LEGACY_CODE_VERSION.fullmatch(
                str((_read_config(old.dependency(parent)) or {}).get("code_version", ""))):
            return None  # its parent was not adopted (unfinished): it stays with it
    config = RunConfig.from_dict({**raw, "code_version": version})
    new = RunDir(old.workdir, config.stage_id)
    if new.path.exists():
        return None
    os.rename(old.path, new.path)
    os.symlink(new.path.name, old.path)  # queued legacy jobs started from it still find it
    atomic_write_json(new.config_path, config.to_dict())
    atomic_write_json(new.result_path, {**result, "stage_id": new.stage_id,
                                        "config_hash": config.content_hash(), "code_version": version,
                                        "adopted_from": old.stage_id})
    atomic_write_json(new.path / "adopted.json", {
        "from": old.stage_id, "legacy_code_version": legacy, "code_version": version,
        "init_from": raw.get("init_from"),
        "time": utc_now()})
    return new.stage_id


def _read_config(run: RunDir) -> dict[str, Any] | None:
    try:
        return read_json(run.config_path) if run.config_path.is_file() else None
    except ValueError:
        return None
