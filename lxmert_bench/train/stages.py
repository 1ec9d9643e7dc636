"""One stage end to end: ``run_stage(run_dir)`` reads ``config.json`` and runs a BERT, pretraining
or fine-tuning stage, resuming from ``checkpoints/last.pt`` when present (docs/internals.md).

A finished run (``result.json`` exists) is returned as is. A failure writes ``error.json`` and
re-raises. ``result.json`` is written atomically at the very end, by rank 0 only.

Also runnable as ``python -m lxmert_bench.train.stages RUN_DIR`` (and so under torchrun).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lxmert_bench import __version__
from lxmert_bench.config import RunConfig
from lxmert_bench.data.root import ensure_data_root
from lxmert_bench.io import utc_now
from lxmert_bench.provenance import code_provenance
from lxmert_bench.store import RunDir, StageBusy
from lxmert_bench.train.loop import (
    DistInfo,
    NonFiniteLoss,
    TrainSummary,
    setup_distributed,
    teardown_distributed,
)


class StageInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A signal ended the stage: SIGTERM (``cancel``, the scheduler, a launcher that died) or
    SIGINT (Ctrl-C). A BaseException, so no ``except Exception`` in training code swallows it."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        super().__init__(f"ended by {self.signal}")


# Signals received while this process ran a stage. An exception raised in a signal handler can
# surface as another type when it crosses C++ (e.g. a RuntimeError out of torch.save), so the stage
# is judged by this record, not by the exception's type.
_received: list[str] = []


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`StageInterrupted` while a stage runs (main thread only)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        for sig in previous:  # once: a second signal must not cut short the error record
            signal.signal(sig, signal.SIG_IGN)
        _received.append(signal.Signals(signum).name)
        raise StageInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def launch_rank() -> int:
    """This process's global rank as its launcher set it (before the process group exists)."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def run_stage(run_dir: RunDir, wait_for_lock: bool = False) -> dict[str, Any]:
    """Run (or resume) the stage in ``run_dir``; return its result (also in ``result.json``).

    Rank 0 holds the stage's execution lock throughout, so a stage never runs twice at once: when
    another process holds it, this raises :class:`~lxmert_bench.store.StageBusy`, or with
    ``wait_for_lock`` waits for it and returns that run's result if it finished.
    """
    done = run_dir.read_result()
    if done is not None:
        return done
    if not run_dir.config_path.is_file():
        raise FileNotFoundError(f"{run_dir.config_path}: no config.json; not a run directory")
    lock = run_dir.execution_lock(wait=wait_for_lock) if launch_rank() == 0 \
        else contextlib.nullcontext()
    with lock, signals_interrupt():
        done = run_dir.read_result()  # another process may have finished it while we waited
        if done is not None:
            return done
        return _execute(run_dir)


def _execute(run_dir: RunDir) -> dict[str, Any]:
    config = run_dir.read_config()
    info = DistInfo()
    try:
        info = setup_distributed(config.device)
        started = time.perf_counter()
        ensure_data_root(config.data)
        if config.kind == "bert":
            from lxmert_bench.train.bert import run_bert as run_kind
        elif config.kind == "pretrain":
            from lxmert_bench.train.pretrain import run_pretrain as run_kind
        elif config.kind == "finetune":
            from lxmert_bench.train.finetune import run_finetune as run_kind
        else:
            raise ValueError(f"{run_dir.config_path}: unknown kind {config.kind!r}; "
                             "expected 'bert', 'pretrain' or 'finetune'")
        part = run_kind(config, run_dir, info)
        result = build_result(config, part, time.perf_counter() - started)
        if info.is_main:
            run_dir.write_result(result)
        return result
    except (StageInterrupted, KeyboardInterrupt) as e:
        if info.is_main:
            sig = e.signal if isinstance(e, StageInterrupted) else "SIGINT"
            _write_interrupted(run_dir, sig)
        raise
    except Exception as e:
        if _received:  # a signal's exception converted on the way (see _received)
            if info.is_main:
                _write_interrupted(run_dir, _received[-1])
            raise StageInterrupted(getattr(signal, _received[-1])) from e
        if info.is_main:
            error: dict[str, Any] = {
                "error": str(e), "type": type(e).__name__, "traceback": traceback.format_exc(),
                "time": utc_now(), "stage_id": run_dir.stage_id,
            }
            if isinstance(e, NonFiniteLoss):
                error.update(step=e.step, losses={k: str(v) for k, v in e.losses.items()})
            run_dir.write_error(error)
        raise
    finally:
        teardown_distributed(info)


def _write_interrupted(run_dir: RunDir, sig: str) -> None:
    run_dir.write_error({"error": f"ended by {sig}", "type": "StageInterrupted", "interrupted": True,
                         "signal": sig, "time": utc_now(), "stage_id": run_dir.stage_id})


def build_result(config: RunConfig, part: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The result.json record (docs/internals.md) from a stage's own part of it."""
    summary: TrainSummary = part.pop("summary")
    on_gpu = summary.device.startswith("cuda")
    num_gpus = summary.world_size if on_gpu else 0
    # a resumed run's training/eval time includes earlier attempts (from the checkpoint)
    total_s = max(wall_s, summary.train_s + summary.eval_s)
    result: dict[str, Any] = {
        "stage_id": config.stage_id, "kind": config.kind, "config_hash": config.content_hash(),
        "seed": config.seed,
    }
    if config.kind == "finetune" and config.finetune is not None:
        result["task"] = config.finetune.task
    result.update(part)
    result.update({
        "steps": summary.steps, "samples": summary.samples,
        "samples_per_s": round(summary.samples_per_s, 3),
        "timings": {"train_s": round(summary.train_s, 3), "eval_s": round(summary.eval_s, 3),
                    "total_s": round(total_s, 3)},
        "device": summary.device.split(":")[0], "num_gpus": num_gpus,
        "gpu_hours": round(num_gpus * total_s / 3600, 6), "precision": summary.precision,
        "world_size": summary.world_size,
        "execution": summary.execution,  # compile mode, micro-batch, TF32, workers: provenance
        "versions": {"lxmert_bench": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "data_fingerprint": config.data.fingerprint, "code_version": config.code_version,
        "code": code_provenance(),
        "finished_at": utc_now(),
    })
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lxmert_bench.train.stages RUN_DIR", file=sys.stderr)
        return 2
    path = Path(args[0]).resolve()
    if not (path / "config.json").is_file():
        print(f"{path}: not a run directory (no config.json)", file=sys.stderr)
        return 2
    run_dir = RunDir(path.parents[2], f"{path.parent.name}/{path.name}")
    try:
        result = run_stage(run_dir)
    except StageBusy as e:
        print(f"lxmert-bench: {e}", file=sys.stderr)
        return 1
    print(f"{run_dir.stage_id}: done, metrics {result.get('metrics')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
