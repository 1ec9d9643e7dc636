"""The training machinery every stage shares.

- device and precision: bf16 autocast on CUDA, fp32 on CPU (``RunConfig.precision`` overrides);
- a deterministic data order: epoch ``e`` visits a permutation drawn from ``(seed, e)``, and any
  per-example randomness (masking, negatives) comes from a generator seeded with
  ``(seed, stream, epoch, index)`` instead of global RNG state; together with the RNG states in the
  checkpoint (train/checkpoint.py) this makes a resumed run equal an uninterrupted one;
- checkpoints ``last.pt`` every ``checkpoint_every`` steps and at each epoch end, resume from it;
- a non-finite loss stops training with :class:`FloatingPointError` naming the step and the loss;
- a tqdm bar on a terminal, plain log lines otherwise;
- DDP (train/distributed.py): every rank takes its share of the same global batch, so the
  optimisation equals one process's; only rank 0 writes files.

``train()`` runs a :class:`_Trainer`, whose methods are the loop's parts: ``step`` (one update),
``log_step``, ``checkpoint``, ``end_epoch`` (evaluation, the epoch's checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from lxmert_bench.config import OptimConfig
from lxmert_bench.io import append_jsonl
from lxmert_bench.train import distributed

# checkpoint.py and distributed.py are the homes; some names (seed_all, request_stop, ...) are
# also imported from here by the stages, the launcher and the tests: the loop's front door.
from lxmert_bench.train.checkpoint import (  # noqa: F401
    load_checkpoint,
    restore_rng,
    rng_state,
    save_last,
    seed_all,
    set_rng_state,
    truncate_log,
)
from lxmert_bench.train.compile import CompiledStep, compile_mode  # noqa: F401 (compile_mode: stages, tests)
from lxmert_bench.train.distributed import (  # noqa: F401
    DIST_TIMEOUT_ENV,
    DistInfo,
    StopRequested,
    broadcast_object,
    dist_timeout_s,
    global_label_denominators,
    request_stop,
    setup_distributed,
    shard,
    stop_agreed,
    teardown_distributed,
)
from lxmert_bench.train.optim import build_optimizer, micro_batch_size
from lxmert_bench.train.trackers import open_trackers

if TYPE_CHECKING:
    from lxmert_bench.config import RunConfig
    from lxmert_bench.store import RunDir

# Streams of per-example randomness: training examples and the fixed validation masking.
TRAIN_STREAM, VALID_STREAM = 0, 1


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------
def select_device(device: str, info: DistInfo | None = None) -> torch.device:
    """'auto' -> cuda when available (this rank's GPU under DDP), else cpu."""
    info = info or DistInfo()
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


# The tensors of a batch with one entry per word piece (their last dimension is max_seq_length).
LANGUAGE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "masked_lm_labels")


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """``data.pad_to: longest``: the language tensors cut to the batch's longest sentence (the
    attention mask's last 1); what is cut is padding the model masks out."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return batch
    longest = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
    return {k: v[:, :longest] if k in LANGUAGE_KEYS and isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class _Collate:
    """``data.collate``, then the padding policy (a class, not a closure: workers pickle it)."""

    def __init__(self, data: TrainData, pad_to: str):
        self.data, self.trim = data, pad_to == "longest"

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.data.collate(examples)
        return trim_padding(batch) if self.trim else batch


def iterate_batches(
    data: TrainData, batches: Sequence[Sequence[int]], epoch: int, seed: int,
    stream: int = TRAIN_STREAM, num_workers: int = 0, pin_memory: bool = False,
    pad_to: str = "max_length",
) -> Iterator[dict[str, Any]]:
    """Collated batches of the given example indices (``num_workers`` processes build them),
    padded as ``pad_to`` says (``data.pad_to``)."""
    keyed = [[(epoch, int(i)) for i in b] for b in batches]
    collate = _Collate(data, pad_to)
    if num_workers <= 0:
        ds = _Examples(data, seed, stream)
        for b in keyed:
            yield collate([ds[k] for k in b])
        return
    loader = torch.utils.data.DataLoader(
        _Examples(data, seed, stream), batch_sampler=keyed, collate_fn=collate,
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


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Micro-batches of ``size`` examples (the last one smaller when ``size`` does not divide the
    batch), in order: tensors and per-example lists are cut along their first dimension."""
    n = batch_size_of(batch)

    def cut(v: Any, a: int, b: int) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[a:b]
        if isinstance(v, dict):
            return {k: cut(x, a, b) for k, x in v.items()}
        if isinstance(v, tuple):
            return tuple(cut(x, a, b) for x in v)
        if isinstance(v, list) and len(v) == n:
            return v[a:b]
        return v

    return [cut(batch, a, min(a + size, n)) for a in range(0, n, size)]


def eval_batches(data: TrainData, batch_size: int, device: torch.device, seed: int = 0,
                 stream: int = VALID_STREAM) -> Iterator[dict[str, Any]]:
    """Every example once, in order, in batches of ``batch_size`` (the last one partial), on
    ``device``: what evaluation and prediction read (randomness, e.g. validation masking, from
    ``stream``: the same every epoch)."""
    n = len(data)
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    for batch in iterate_batches(data, batches, 0, seed, stream):
        yield to_device(batch, device)


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
    num_workers: int | None = 0  # None: loader_workers' default for the device
    select_metric: str | None = None  # eval metric deciding "best"
    select_mode: str = "max"  # "max" (accuracy) or "min" (loss)
    eval_split: str = "valid"  # name in the log lines
    eval_every_epoch: bool = True
    find_unused_parameters: bool = False  # DDP: heads that some steps do not use
    desc: str = "train"
    stop_check_every: int = 10  # DDP: steps between the ranks' agreements on a stop request
    compile: str = "none"  # torch.compile mode of the training forward ("auto": see compile_mode)
    tf32: bool = True  # CUDA: TF32 for fp32 matmuls
    pin_memory: bool | None = None  # None: on CUDA
    pad_to: str = "max_length"  # training batches' sentences (data.pad_to); evaluation pads fully

    @classmethod
    def from_run(cls, config: RunConfig, run_dir: RunDir, optim: OptimConfig,
                 **stage: Any) -> LoopSettings:
        """The settings of a stage from its configuration and run directory; ``stage`` holds what
        only the stage knows (``eval_split``, ``select_metric``, ``find_unused_parameters``, ...)."""
        base: dict[str, Any] = dict(
            seed=config.seed, optim=optim, checkpoint_dir=run_dir.checkpoint_dir,
            log_path=run_dir.log_path, log_every=config.log_every,
            checkpoint_every=config.checkpoint_every, device=config.device,
            precision=config.precision, num_workers=config.data.num_workers,
            eval_every_epoch=config.eval_every_epoch, desc=f"{config.kind} {config.content_hash()}",
            compile=config.compile, tf32=config.tf32, pad_to=config.data.pad_to,
        )
        return cls(**{**base, **stage})


# DataLoader workers per process on CUDA when data.num_workers is not set. Measured on this
# project's 2-core VM (benchmarks/train_step.py loader, base pretraining batch of 256 from the
# memory-mapped store): 1,191 examples/s in-process, 653 from one worker (the 75 MB batch crosses
# processes); 4 workers are sized to stay above the 1,369 samples/s of an eager bf16 H100 step
# (not measured on a GPU node: README, Performance).
DEFAULT_CUDA_WORKERS = 4


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """Worker processes building batches: as set, else DEFAULT_CUDA_WORKERS on CUDA and none on
    a CPU (there they would compete with the step for the same cores)."""
    if num_workers is not None:
        return num_workers
    return min(DEFAULT_CUDA_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0


def start_stage(config: RunConfig, info: DistInfo) -> tuple[torch.device, str]:
    """What every stage does first: seed the global generators (model initialisation draws from
    them) and choose its device and precision."""
    seed_all(config.seed)
    device = select_device(config.device, info)
    return device, select_precision(config.precision, device)



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
    # how it ran, where that does not change the result: compile mode (and recompiles, a
    # fallback's cause), micro-batch size, TF32, loader workers
    execution: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s if self.train_s > 0 else 0.0


# step_fn(model, batch, epoch) -> {"loss": scalar tensor, "losses": {name: scalar tensor}};
# with ``label_counts`` given, step_fn(model, batch, epoch, denominators) (see train()).
StepFn = Callable[..., dict[str, Any]]
CountFn = Callable[[dict[str, Any]], dict[str, torch.Tensor]]
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
    log_acc_wait_s: float = 0.0  # waiting for data
    done: bool = False

def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


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


class _LossSums:
    """The loss values of the steps since the last check, kept on the device (no host sync per
    step); ``fold_into`` checks them in one transfer, stops on a non-finite one naming its step,
    and adds them to the log sums in step order (the sums a per-step ``.item()`` would give)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, int, float, list[str], torch.Tensor]] = []

    def add(self, step: int, epoch: int, lr: float, names: list[str], values: torch.Tensor) -> None:
        self.pending.append((step, epoch, lr, names, values))

    def fold_into(self, state: _State) -> None:
        if not self.pending:
            return
        host = torch.cat([v for *_, v in self.pending]).cpu().tolist()  # the one sync
        pending, self.pending = self.pending, []
        at = 0
        rows = []
        for step, epoch, lr, names, _values in pending:
            rows.append((step, epoch, lr, dict(zip(names, host[at:at + len(names)]))))
            at += len(names)
        for step, epoch, lr, named in rows:  # the first non-finite step, before any is summed
            if not all(math.isfinite(v) for v in named.values()):
                bad = [n for n, v in named.items() if not math.isfinite(v)]
                detail = ", ".join(f"{n}={v}" for n, v in named.items())
                raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch + 1}, "
                                    f"lr {lr:.3e}): {', '.join(bad)} ({detail}); stopping",
                                    step=step, losses=named)
        for *_, named in rows:
            for n, v in named.items():
                state.log_acc[n] = state.log_acc.get(n, 0.0) + v


def train(
    model: nn.Module,
    data: TrainData,
    step_fn: StepFn,
    settings: LoopSettings,
    evaluate: EvalFn | None = None,
    on_best: BestFn | None = None,
    dist_info: DistInfo | None = None,
    label_counts: CountFn | None = None,
) -> TrainSummary:
    """Train ``model`` on ``data`` for ``optim.epochs`` epochs (or ``optim.max_steps`` steps),
    resuming from ``checkpoint_dir/last.pt`` when it exists. Returns what happened, summed over
    every run that contributed (a resumed run counts the steps done before it too).

    ``optim.micro_batch_size`` (examples per forward pass on one rank; None: the rank's whole
    share) accumulates gradients over micro-batches: the same update as the whole batch at once.
    ``label_counts(batch)`` (token-averaged losses): the counts their means divide by, e.g.
    ``{"mlm": labelled words}``; the loop then hands ``step_fn`` the ``denominators`` that make
    every micro-batch on every rank normalise by the global batch's counts (None when the
    batch's own counts are those: one process, no accumulation).
    """
    trainer = _Trainer(model, data, step_fn, settings, evaluate, on_best, dist_info or DistInfo(),
                       label_counts)
    return trainer.run()


class _Trainer:
    """One training run; ``run()`` reads top-down: epochs of steps, each followed by
    ``after_step`` (log, stop, checkpoint) and each epoch by ``end_epoch``."""

    def __init__(self, model: nn.Module, data: TrainData, step_fn: StepFn, settings: LoopSettings,
                 evaluate: EvalFn | None, on_best: BestFn | None, info: DistInfo,
                 label_counts: CountFn | None = None):
        self.model, self.data, self.step_fn, self.settings = model, data, step_fn, settings
        self.evaluate, self.on_best, self.info = evaluate, on_best, info
        self.label_counts = label_counts
        self.device = select_device(settings.device, info)
        self.precision = select_precision(settings.precision, self.device)
        optim = settings.optim
        if info.enabled and optim.batch_size % info.world_size:
            raise ValueError(f"optim.batch_size={optim.batch_size} is not divisible by the "
                             f"{info.world_size} processes (the global batch is split evenly)")
        self.micro_batch_size = micro_batch_size(optim, info.world_size)
        self.steps_per_epoch = steps_per_epoch(len(data), optim.batch_size)
        planned = optim.epochs * self.steps_per_epoch
        self.total_steps = min(planned, optim.max_steps) if optim.max_steps else planned
        if self.total_steps <= 0:
            raise ValueError(f"nothing to train: epochs={optim.epochs}, max_steps={optim.max_steps}")
        if self.device.type == "cuda":  # fp32 matmuls on TF32 tensor cores (bf16 autocast aside)
            torch.backends.cuda.matmul.allow_tf32 = settings.tf32
            torch.backends.cudnn.allow_tf32 = settings.tf32
        model.to(self.device)
        self.optimizer, self.schedule = build_optimizer(model.parameters(), optim, self.total_steps)
        self.last_path = settings.checkpoint_dir / "last.pt"
        self.state = self._resume()
        self.train_model: nn.Module = model
        if info.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=settings.find_unused_parameters,
            )
        self.progress = _Progress(self.total_steps, self.state.global_step, settings.desc,
                                  info.is_main)
        if self.state.global_step:  # a requeued or re-run stage: say where it picks up
            self.progress.write(f"[{settings.desc}] resumed from last.pt at step "
                                f"{self.state.global_step}/{self.total_steps}")
        mode = compile_mode(settings.compile, self.device)
        if mode and hasattr(model, "sparse_mlm"):
            model.sparse_mlm = False  # the MLM decoder on every word: static shapes, same loss
        self.compiled = CompiledStep(self.train_model, mode, self.device, self.progress.write,
                                     settings.desc)
        self.trackers = open_trackers(settings.log_path, info.is_main)  # run.tensorboard / wandb
        self.losses = _LossSums()
        self.lr, self.data_wait = 0.0, 0.0

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        self.model.train()
        try:
            while not self.state.done:
                for batch, global_n in self._epoch_batches():
                    self.step(batch, global_n)
                    if self.after_step():
                        break
                self.end_epoch()
        finally:
            self.progress.close()
            self.trackers.close()
        return self._summary()

    def _epoch_batches(self) -> Iterator[tuple[dict[str, Any], int]]:
        """This rank's share of each global batch left in the epoch, on the device, with the
        global size; ``data_wait``: the seconds the step waited for it."""
        state, s = self.state, self.settings
        batches = epoch_batches(len(self.data), s.optim.batch_size, s.seed, state.epoch)
        todo = batches[state.step_in_epoch:]
        on_cuda = self.device.type == "cuda"
        local = iter(iterate_batches(
            self.data, [shard(b, self.info) for b in todo], state.epoch, s.seed, TRAIN_STREAM,
            loader_workers(s.num_workers, self.device),
            on_cuda if s.pin_memory is None else s.pin_memory, s.pad_to))
        self.tick = time.perf_counter()
        for b in todo:
            t0 = time.perf_counter()
            batch = to_device(next(local), self.device)
            self.data_wait = time.perf_counter() - t0
            yield batch, len(b)

    def step(self, batch: dict[str, Any], global_n: int) -> None:
        """One update on this rank's share of a global batch of ``global_n`` examples, in
        micro-batches when ``optim.micro_batch_size`` asks for them. No host sync: the losses stay
        on the device until a log step (``_LossSums``)."""
        state, optim = self.state, self.settings.optim
        self.lr = self.schedule.step()
        values, names = self.compiled.run(lambda forward: self._accumulate(forward, batch, global_n),
                                          self.optimizer)
        distributed.all_reduce_sum(values, self.info)
        self.losses.add(state.global_step + 1, state.epoch, self.lr, ["loss", *names], values)
        if optim.grad_clip and optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.grad_clip,
                                           foreach=True if self.device.type == "cuda" else None)
        self.optimizer.step()

        state.global_step += 1
        state.step_in_epoch += 1
        state.samples += global_n
        now = time.perf_counter()
        state.train_s += now - self.tick
        state.log_acc_s += now - self.tick
        state.log_acc_wait_s += self.data_wait
        self.tick = now
        state.log_acc_steps += 1
        state.log_acc_samples += global_n

    def _accumulate(self, forward: nn.Module, batch: dict[str, Any],
                    global_n: int) -> tuple[torch.Tensor, list[str]]:
        """Forward and backward over the micro-batches of ``batch``: the gradient of the global
        batch's mean loss, and this rank's part of the loss values (each micro-batch's mean
        weighted by its share of the global batch)."""
        info = self.info
        local_n = batch_size_of(batch)
        micros = split_batch(batch, self.micro_batch_size or local_n)
        micro_ns = [batch_size_of(m) for m in micros]
        denominators: list[Any] = [None] * len(micros)
        if self.label_counts is not None:
            found = global_label_denominators(self.label_counts(batch), local_n, micro_ns, info)
            denominators = found or denominators
        self.optimizer.zero_grad(set_to_none=True)
        values: torch.Tensor | None = None
        names: list[str] = []
        for i, (micro, micro_n, denom) in enumerate(zip(micros, micro_ns, denominators)):
            share = micro_n / global_n
            extra = () if self.label_counts is None else (denom,)
            # DDP all-reduces the gradients on the last micro-step only
            with self._sync_gradients(i == len(micros) - 1), autocast(self.device, self.precision):
                out = self.step_fn(forward, micro, self.state.epoch, *extra)
                loss = out["loss"]
                names = sorted(out.get("losses", {}))
                part = torch.stack([loss.detach().float()]
                                   + [out["losses"][k].detach().float() for k in names]) * share
                values = part if values is None else values + part
                # DDP averages gradients over ranks; scaling by share*world makes that the
                # gradient of the global-batch mean even when shards differ in size
                (loss * (share * info.world_size)).backward()
        assert values is not None
        return values, names

    def after_step(self) -> bool:
        """Log, stop on request, checkpoint; True when the epoch (or training) ends here."""
        state, s = self.state, self.settings
        self.log_step()
        finished = state.global_step >= self.total_steps
        # before the epoch-end break, or checks on multiples of an epoch never happen; a resume
        # at step_in_epoch == steps_per_epoch goes straight to the epoch's end (eval, save)
        if not finished and stop_agreed(self.info, state.global_step, s.stop_check_every,
                                        self.device):
            self.checkpoint()  # collective: every rank is here, at the same step
            signum = distributed._stop_signal
            name = signal.Signals(signum).name if signum else "another rank"
            self.progress.write(f"[{s.desc}] stop requested ({name}): last.pt written at step "
                                f"{state.global_step}")
            raise StopRequested(state.global_step, signum)
        if finished or state.step_in_epoch == self.steps_per_epoch:
            return True
        if state.global_step % max(1, s.checkpoint_every) == 0:
            self.checkpoint()
            self.tick = time.perf_counter()  # checkpoint time is not training time
        return False

    def log_step(self) -> None:
        """On log steps (the only host syncs of training): stop on a non-finite loss, naming the
        step it first appeared at (at most ``log_every`` steps ago), and write the means."""
        state = self.state
        record = None
        if state.global_step % max(1, self.settings.log_every) == 0 or state.global_step == self.total_steps:
            self.losses.fold_into(state)
            record = _log_record(state, state.epoch, self.lr, self.total_steps)
            if self.compiled.mode:
                record["compile"] = self.compiled.describe()
            self._log(record)
        self.progress.update(state.global_step, record)

    def end_epoch(self) -> None:
        """The end of an epoch (or of training when max_steps cuts it short): evaluate, move on,
        checkpoint."""
        state = self.state
        finished = state.global_step >= self.total_steps
        if self.settings.eval_every_epoch or finished:
            self._evaluate(state.epoch + 1)
        if finished:
            state.done = True
        else:
            state.epoch += 1
            state.step_in_epoch = 0
        self.checkpoint()

    def checkpoint(self) -> None:
        """``last.pt`` (collective under DDP: every rank calls it at the same step); never of
        weights a non-finite loss has touched."""
        self.losses.fold_into(self.state)
        save_last(self.last_path, self.info, self.device, model=self.model.state_dict(),
                  optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
                  state=vars(self.state).copy())

    # --- parts ----------------------------------------------------------------------------------
    def _sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` on all but the last micro-step: gradients accumulate locally and are
        all-reduced once per update."""
        if sync or not isinstance(self.train_model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def _resume(self) -> _State:
        s, info = self.settings, self.info
        if not self.last_path.exists():
            if info.is_main and s.log_path.exists():
                s.log_path.unlink()  # a previous attempt died before its first checkpoint
            # dropout stream: per rank, independent of how many draws model initialisation took
            torch.manual_seed(int(np.random.default_rng([s.seed, 0xD0, info.rank]).integers(2**62)))
            return _State()
        ckpt = load_checkpoint(self.last_path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        restore_rng(ckpt, info, self.device)
        state = _State(**ckpt["state"])
        if info.is_main:
            truncate_log(s.log_path, state.global_step)
        return state

    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            append_jsonl(self.settings.log_path, record)
            self.trackers.log(record)

    def _evaluate(self, epoch_1: int) -> None:
        if self.evaluate is None:
            return
        state, s = self.state, self.settings
        t0 = time.perf_counter()
        record = None
        if self.info.is_main:
            result = self.evaluate(self.model, epoch_1)
            self.model.train()
            state.history.append({"epoch": epoch_1, "metrics": result.metrics})
            self._log({"step": state.global_step, "epoch": epoch_1, "split": s.eval_split,
                       "metrics": result.metrics})
            self.progress.write(f"[{s.desc}] epoch {epoch_1} {s.eval_split}: "
                                + " ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
            self._select_best(epoch_1, result)
            record = (state.history, state.best_value, state.best_epoch, state.best_metrics)
        # every rank keeps the same bookkeeping (it is checkpointed by rank 0)
        record = broadcast_object(record, self.info)
        state.history, state.best_value, state.best_epoch, state.best_metrics = record
        state.eval_s += time.perf_counter() - t0

    def _select_best(self, epoch_1: int, result: EvalResult) -> None:
        state, key = self.state, self.settings.select_metric
        if key is None:
            return
        if key not in result.metrics:
            raise KeyError(f"evaluation returned no {key!r} metric (got {sorted(result.metrics)})")
        if _is_better(result.metrics[key], state.best_value, self.settings.select_mode):
            state.best_value = float(result.metrics[key])
            state.best_epoch = epoch_1
            state.best_metrics = dict(result.metrics)
            if self.on_best is not None:
                self.on_best(self.model, epoch_1, result)

    def _summary(self) -> TrainSummary:
        state = self.state
        return TrainSummary(
            steps=state.global_step, samples=state.samples, train_s=state.train_s,
            eval_s=state.eval_s, history=state.history, best_epoch=state.best_epoch,
            best_metrics=state.best_metrics,
            last_metrics=state.history[-1]["metrics"] if state.history else None,
            device=str(self.device), precision=self.precision, world_size=self.info.world_size,
            execution={"compile": self.compiled.describe(), "micro_batch_size": self.micro_batch_size,
                       "tf32": self.settings.tf32 if self.device.type == "cuda" else None,
                       "num_workers": loader_workers(self.settings.num_workers, self.device)},
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
        # per step: the time the step waited for its batch (workers too slow when it grows)
        "data_wait_s": round(state.log_acc_wait_s / steps, 6),
    }
    state.log_acc, state.log_acc_steps, state.log_acc_samples, state.log_acc_s = {}, 0, 0, 0.0
    state.log_acc_wait_s = 0.0
    return record
