"""The training machinery every stage shares.

- device and precision: bf16 autocast on CUDA, fp32 on CPU (``RunConfig.precision`` overrides);
- a deterministic data order: epoch ``e`` visits a permutation drawn from ``(seed, e)``, and any
  per-example randomness (masking, negatives) comes from a generator seeded with
  ``(seed, stream, epoch, index)`` instead of global RNG state; together with the RNG states in the
  checkpoint this makes a resumed run equal an uninterrupted one;
- checkpoints ``last.pt`` every ``checkpoint_every`` steps and at each epoch end (written atomically),
  resume from it, and ``log.jsonl`` rewritten on resume so it never holds a step twice;
- a non-finite loss stops training with :class:`FloatingPointError` naming the step and the loss;
- a tqdm bar on a terminal, plain log lines otherwise;
- DDP from torchrun's or submitit's environment (gloo on CPU, nccl on CUDA): every rank takes its
  share ``batch[rank::world]`` of the same global batch, so the optimisation equals one process's;
  only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lxmert_bench.config import OptimConfig
from lxmert_bench.io import RefusedFile, atomic_torch_save, atomic_write_text, load_torch_file
from lxmert_bench.train.optim import build_optimizer

# Streams of per-example randomness: training examples and the fixed validation masking.
TRAIN_STREAM, VALID_STREAM = 0, 1


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (and so tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DIST_TIMEOUT_ENV = "LXMERT_BENCH_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 1800.0  # torch's own default; must outlast rank 0's evaluation


def dist_timeout_s() -> float:
    """Seconds a collective (or the rendezvous) waits for a peer before it raises, from
    ``$LXMERT_BENCH_DIST_TIMEOUT_S``: a dead peer ends the run with an error instead of a hang.
    Not part of any stage's identity (it never changes a result)."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"${DIST_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment, if any.

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. In a submitit Slurm
    job with more than one task, submitit's ``TorchDistributedEnvironment`` sets them from Slurm's
    variables: MASTER_ADDR is the job's first node (``SLURM_JOB_NODELIST``), the port a function of
    the job id. They overwrite any inherited from the submitting shell (sbatch exports its
    environment, so a submitter running under torchrun would otherwise hand its own rank down).
    """
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    in_submitit_slurm = "SLURM_JOB_ID" in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    if in_submitit_slurm and slurm_tasks > 1:
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment()
        env.export(set_cuda_visible_devices=False, overwrite=True)
    elif "SLURM_JOB_ID" in os.environ and slurm_tasks > 1 and "RANK" not in os.environ:
        import submitit  # srun without submitit: the same variables

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"distributed run: WORLD_SIZE={world} but ${var} is not set "
                               "(start with torchrun or under Slurm with submitit)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(rank, world, local_rank, owns_group=False)
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout_s = dist_timeout_s()
    backend = "nccl" if use_cuda else "gloo"
    # where each rank is and whom it joins: the first thing to read when a multi-node run fails
    master = os.environ["MASTER_ADDR"]
    try:
        master_ip = socket.gethostbyname(master)
    except OSError:
        master_ip = "unresolved"
    print(f"[distributed] rank {rank}/{world} (local {local_rank}) on {socket.gethostname()}: "
          f"{backend}, MASTER_ADDR={master} ({master_ip}):{os.environ['MASTER_PORT']}, "
          f"timeout {timeout_s:g} s", file=sys.stderr, flush=True)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, owns_group=True)


# ---------------------------------------------------------------------------------------------
# Stopping at a step boundary (preemption, time limit)
# ---------------------------------------------------------------------------------------------
_stop_signal: int | None = None  # set by request_stop (a signal handler), read by train()


class StopRequested(BaseException):  # noqa: N818 - control flow like SystemExit, not an error
    """Training stopped at a step boundary because a stop was requested (the preemption signal):
    every rank has written its part of ``last.pt`` at ``step``, so the run resumes from there.
    A BaseException, so ``except Exception`` (error.json, "failed") does not take it for a failure.
    """

    def __init__(self, step: int, signum: int | None):
        self.step, self.signum = step, signum
        name = signal.Signals(signum).name if signum else "a stop request"
        super().__init__(f"stopped by {name} after step {step} (last.pt written)")


def request_stop(signum: int, _frame: Any = None) -> None:
    """Signal handler (any rank): ask train() to write ``last.pt`` and raise
    :class:`StopRequested` at its next step boundary where the ranks agree on it."""
    global _stop_signal
    _stop_signal = signum


def _stop_agreed(info: DistInfo, step: int, every: int, device: torch.device) -> bool:
    """True when any rank has a stop request. Alone: checked every step (a Python flag). Under
    DDP: one int all-reduced every ``every`` steps, the same steps on every rank (no per-step sync)."""
    if not info.enabled:
        return _stop_signal is not None
    if step % max(1, every):
        return False
    flag = torch.tensor([int(_stop_signal is not None)], device=device)  # nccl: a device tensor
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def select_device(device: str, info: DistInfo = DistInfo()) -> torch.device:
    """'auto' -> cuda when available (this rank's GPU under DDP), else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def select_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# Deterministic order and per-example randomness
# ---------------------------------------------------------------------------------------------
def example_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example's randomness: a function of its coordinates only."""
    return np.random.default_rng([seed, stream, epoch, index])


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches only (the last partial one is dropped, as the official loaders do), but at
    least one batch when there are fewer examples than one batch."""
    if num_examples <= 0:
        raise ValueError("training data is empty")
    return max(1, num_examples // batch_size)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch, in order."""
    order = epoch_order(num_examples, seed, epoch)
    return [order[i * batch_size:(i + 1) * batch_size]
            for i in range(steps_per_epoch(num_examples, batch_size))]


def shard(batch: np.ndarray, info: DistInfo) -> np.ndarray:
    """This rank's share of a global batch (DistributedSampler-style striding)."""
    return batch[info.rank::info.world_size]


class TrainData(Protocol):
    """What the loop needs from a training set."""

    def __len__(self) -> int: ...

    def example(self, index: int, epoch: int, rng: np.random.Generator) -> Any: ...

    def collate(self, examples: list[Any]) -> dict[str, Any]: ...


class _Examples(torch.utils.data.Dataset):
    """Maps (epoch, index) to an example, with randomness from its coordinates (worker-safe)."""

    def __init__(self, data: TrainData, seed: int, stream: int):
        self.data, self.seed, self.stream = data, seed, stream

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return self.data.example(index, epoch, example_rng(self.seed, self.stream, epoch, index))


def iterate_batches(
    data: TrainData, batches: Sequence[Sequence[int]], epoch: int, seed: int,
    stream: int = TRAIN_STREAM, num_workers: int = 0, pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Collated batches of the given example indices (``num_workers`` processes build them)."""
    keyed = [[(epoch, int(i)) for i in b] for b in batches]
    if num_workers <= 0:
        ds = _Examples(data, seed, stream)
        for b in keyed:
            yield data.collate([ds[k] for k in b])
        return
    loader = torch.utils.data.DataLoader(
        _Examples(data, seed, stream), batch_sampler=keyed, collate_fn=data.collate,
        num_workers=num_workers, pin_memory=pin_memory,
    )
    yield from loader


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("batch has no tensor to count examples from")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
# Checkpoints hold tensors and plain Python values only and load with weights_only=True: a
# run directory on a shared filesystem may be writable by others, and a full unpickle of last.pt
# would run whatever they put there as the user who resumes. (atomic_torch_save lives in io.py.)

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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class NonFiniteLoss(FloatingPointError):
    """A NaN / inf loss: training stops; ``step`` (1-based) and ``losses`` say where and which."""

    def __init__(self, message: str, step: int, losses: dict[str, float]):
        super().__init__(message)
        self.step, self.losses = step, losses


@dataclass
class LoopSettings:
    seed: int
    optim: OptimConfig
    checkpoint_dir: Path
    log_path: Path
    log_every: int = 50
    checkpoint_every: int = 1000
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    select_metric: str | None = None  # eval metric deciding "best"
    select_mode: str = "max"  # "max" (accuracy) or "min" (loss)
    eval_split: str = "valid"  # name in the log lines
    eval_every_epoch: bool = True
    find_unused_parameters: bool = False  # DDP: heads that some steps do not use
    desc: str = "train"
    stop_check_every: int = 10  # DDP: steps between the ranks' agreements on a stop request


@dataclass
class EvalResult:
    metrics: dict[str, float]
    payload: Any = None  # e.g. predictions, for on_best


@dataclass
class TrainSummary:
    steps: int
    samples: int
    train_s: float
    eval_s: float
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metrics: dict[str, float] | None
    last_metrics: dict[str, float] | None
    device: str
    precision: str
    world_size: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s if self.train_s > 0 else 0.0


# step_fn(model, batch, epoch) -> {"loss": scalar tensor, "losses": {name: scalar tensor}}
StepFn = Callable[[nn.Module, dict[str, Any], int], dict[str, Any]]
EvalFn = Callable[[nn.Module, int], EvalResult]  # (unwrapped model, 1-based epoch)
BestFn = Callable[[nn.Module, int, EvalResult], None]


@dataclass
class _State:
    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0
    samples: int = 0
    train_s: float = 0.0
    eval_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] | None = None
    log_acc: dict[str, float] = field(default_factory=dict)  # sums since the last log line
    log_acc_steps: int = 0
    log_acc_samples: int = 0
    log_acc_s: float = 0.0
    done: bool = False


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps up to the checkpoint's (and drop a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{ln}\n" for ln in kept))


class _Progress:
    """tqdm on a terminal; otherwise one plain line per log step on stderr."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
        self.total, self.desc = total, desc

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif record is not None:
            print(f"[{self.desc}] step {step}/{self.total} epoch {record['epoch']} "
                  f"loss {record['loss']:.4f} lr {record['lr']:.3e} "
                  f"{record['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    model: nn.Module,
    data: TrainData,
    step_fn: StepFn,
    settings: LoopSettings,
    evaluate: EvalFn | None = None,
    on_best: BestFn | None = None,
    dist_info: DistInfo | None = None,
) -> TrainSummary:
    """Train ``model`` on ``data`` for ``optim.epochs`` epochs (or ``optim.max_steps`` steps),
    resuming from ``checkpoint_dir/last.pt`` when it exists. Returns what happened, summed over
    every run that contributed (a resumed run counts the steps done before it too).
    """
    info = dist_info or DistInfo()
    device = select_device(settings.device, info)
    precision = select_precision(settings.precision, device)
    optim = settings.optim
    batch_size = optim.batch_size
    if info.enabled and batch_size % info.world_size:
        raise ValueError(f"optim.batch_size={batch_size} is not divisible by the "
                         f"{info.world_size} processes (the global batch is split evenly)")
    spe = steps_per_epoch(len(data), batch_size)
    planned = optim.epochs * spe
    total_steps = min(planned, optim.max_steps) if optim.max_steps else planned
    if total_steps <= 0:
        raise ValueError(f"nothing to train: epochs={optim.epochs}, max_steps={optim.max_steps}")

    model.to(device)
    optimizer, schedule = build_optimizer(model.parameters(), optim, total_steps)
    state = _State()
    last_path = settings.checkpoint_dir / "last.pt"
    if last_path.exists():
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        state = _State(**ckpt["state"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0], device)
        if info.is_main:
            _truncate_log(settings.log_path, state.global_step)
    else:
        if info.is_main and settings.log_path.exists():
            settings.log_path.unlink()  # a previous attempt died before its first checkpoint
        # dropout stream: per rank, independent of how many draws model initialisation took
        torch.manual_seed(int(np.random.default_rng([settings.seed, 0xD0, info.rank]).integers(2**62)))

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=settings.find_unused_parameters,
        )

    def save_last() -> None:
        rngs = [rng_state(device)]
        if info.enabled:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if info.is_main:
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": rngs, "state": vars(state).copy(),
                "world_size": info.world_size,
            }, last_path)

    def log(record: dict[str, Any]) -> None:
        if info.is_main:
            settings.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(settings.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(epoch_1: int) -> None:
        if evaluate is None:
            return
        t0 = time.perf_counter()
        record = None
        if info.is_main:
            result = evaluate(model, epoch_1)
            model.train()
            state.history.append({"epoch": epoch_1, "metrics": result.metrics})
            log({"step": state.global_step, "epoch": epoch_1, "split": settings.eval_split,
                 "metrics": result.metrics})
            progress.write(f"[{settings.desc}] epoch {epoch_1} {settings.eval_split}: "
                           + " ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
            key = settings.select_metric
            if key is not None:
                if key not in result.metrics:
                    raise KeyError(f"evaluation returned no {key!r} metric (got {sorted(result.metrics)})")
                if _is_better(result.metrics[key], state.best_value, settings.select_mode):
                    state.best_value = float(result.metrics[key])
                    state.best_epoch = epoch_1
                    state.best_metrics = dict(result.metrics)
                    if on_best is not None:
                        on_best(model, epoch_1, result)
            record = (state.history, state.best_value, state.best_epoch, state.best_metrics)
        if info.enabled:  # every rank keeps the same bookkeeping (it is checkpointed by rank 0)
            box = [record]
            dist.broadcast_object_list(box, src=0)
            state.history, state.best_value, state.best_epoch, state.best_metrics = box[0]
        state.eval_s += time.perf_counter() - t0

    progress = _Progress(total_steps, state.global_step, settings.desc, info.is_main)
    model.train()
    try:
        while not state.done:
            epoch = state.epoch
            batches = epoch_batches(len(data), batch_size, settings.seed, epoch)
            todo = [shard(b, info) for b in batches[state.step_in_epoch:]]
            global_sizes = [len(b) for b in batches[state.step_in_epoch:]]
            tick = time.perf_counter()
            for local_batch, global_n in zip(
                iterate_batches(data, todo, epoch, settings.seed, TRAIN_STREAM,
                                settings.num_workers, device.type == "cuda"),
                global_sizes,
            ):
                local_batch = to_device(local_batch, device)
                local_n = batch_size_of(local_batch)
                lr = schedule.step()
                with autocast(device, precision):
                    out = step_fn(train_model, local_batch, epoch)
                loss = out["loss"]
                names = sorted(out.get("losses", {}))
                # global means of the loss values: each rank's mean weighted by its share
                share = local_n / global_n
                values = torch.stack([loss.detach().float()]
                                     + [out["losses"][k].detach().float() for k in names]) * share
                if info.enabled:
                    dist.all_reduce(values)
                values = values.cpu()
                if not bool(torch.isfinite(values).all()):
                    named = dict(zip(["loss", *names], values.tolist()))
                    bad = [n for n, v in named.items() if not math.isfinite(v)]
                    detail = ", ".join(f"{n}={v}" for n, v in named.items())
                    raise NonFiniteLoss(
                        f"non-finite loss at step {state.global_step + 1} (epoch {epoch + 1}, "
                        f"lr {lr:.3e}): {', '.join(bad)} ({detail}); stopping",
                        step=state.global_step + 1, losses=named,
                    )
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks; scaling by share*world makes that the
                # gradient of the global-batch mean even when shards differ in size
                (loss * (share * info.world_size)).backward()
                if optim.grad_clip and optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                optimizer.step()

                state.global_step += 1
                state.step_in_epoch += 1
                state.samples += global_n
                now = time.perf_counter()
                state.train_s += now - tick
                state.log_acc_s += now - tick
                tick = now
                for n, v in zip(["loss", *names], values.tolist()):
                    state.log_acc[n] = state.log_acc.get(n, 0.0) + v
                state.log_acc_steps += 1
                state.log_acc_samples += global_n

                record = None
                if state.global_step % max(1, settings.log_every) == 0 or state.global_step == total_steps:
                    record = _log_record(state, epoch, lr, total_steps)
                    log(record)
                progress.update(state.global_step, record)

                last_of_epoch = state.step_in_epoch == spe
                finished = state.global_step >= total_steps
                # before the epoch-end break, or checks on multiples of an epoch never happen; a
                # resume at step_in_epoch == spe goes straight to the epoch's end (eval, save)
                if not finished and _stop_agreed(info, state.global_step,
                                                 settings.stop_check_every, device):
                    save_last()  # collective: every rank is here, at the same step
                    name = signal.Signals(_stop_signal).name if _stop_signal else "another rank"
                    progress.write(f"[{settings.desc}] stop requested ({name}): last.pt written "
                                   f"at step {state.global_step}")
                    raise StopRequested(state.global_step, _stop_signal)
                if finished or last_of_epoch:
                    break
                if state.global_step % max(1, settings.checkpoint_every) == 0:
                    save_last()
                    tick = time.perf_counter()  # checkpoint time is not training time
            # end of the epoch (or of training when max_steps cuts it short)
            finished = state.global_step >= total_steps
            if settings.eval_every_epoch or finished:
                run_eval(epoch + 1)
            if finished:
                state.done = True
            else:
                state.epoch += 1
                state.step_in_epoch = 0
            save_last()
    finally:
        progress.close()

    return TrainSummary(
        steps=state.global_step, samples=state.samples, train_s=state.train_s, eval_s=state.eval_s,
        history=state.history, best_epoch=state.best_epoch, best_metrics=state.best_metrics,
        last_metrics=state.history[-1]["metrics"] if state.history else None,
        device=str(device), precision=precision, world_size=info.world_size,
    )


def _log_record(state: _State, epoch: int, lr: float, total_steps: int) -> dict[str, Any]:
    """Means over the steps since the last log line; samples/s over their training time."""
    steps = max(1, state.log_acc_steps)
    acc = state.log_acc
    record = {
        "step": state.global_step, "total_steps": total_steps, "epoch": epoch + 1, "lr": lr,
        "loss": acc.get("loss", float("nan")) / steps,
        "losses": {k: v / steps for k, v in acc.items() if k != "loss"},
        "samples_per_s": state.log_acc_samples / state.log_acc_s if state.log_acc_s > 0 else 0.0,
        "time": round(state.train_s, 3),
    }
    state.log_acc, state.log_acc_steps, state.log_acc_samples, state.log_acc_s = {}, 0, 0, 0.0
    return record


def state_bytes(obj: Any) -> bytes:
    """Serialised bytes of a state dict (tests compare runs with it)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
