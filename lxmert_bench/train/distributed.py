"""Distributed set-up: DDP from torchrun's or submitit's environment (gloo on CPU, nccl on CUDA),
this rank's share of a global batch, and the ranks' agreement on a requested stop (preemption).

Every rank takes its share ``batch[rank::world]`` of the same global batch, so the optimisation
equals one process's; only rank 0 writes files.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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



# Stopping at a step boundary (preemption, time limit)
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


def stop_agreed(info: DistInfo, step: int, every: int, device: torch.device) -> bool:
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


def shard(batch: np.ndarray, info: DistInfo) -> np.ndarray:
    """This rank's share of a global batch (DistributedSampler-style striding)."""
    return batch[info.rank::info.world_size]


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over the ranks, in place (a no-op alone); stays on the device (no host sync)."""
    if info.enabled:
        dist.all_reduce(values)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (collective under DDP)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (collective under DDP)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current_dist_info() -> DistInfo:
    """This process's place in an initialised process group (alone: the default)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size())


def global_label_denominators(counts: dict[str, torch.Tensor], local_n: int,
                              micro_ns: Sequence[int], info: DistInfo,
                              ) -> list[dict[str, torch.Tensor]] | None:
    """What each micro-batch (of ``micro_ns`` examples, together this rank's ``local_n``) divides
    its summed token-averaged losses (MLM over labelled words, QA over labelled answers) by, so
    that the ranks and micro-steps together equal one process on the global batch: the GLOBAL
    count of labels (``counts`` are this rank's, summed here over the ranks) times the
    micro-batch's share of the global batch (the loop backpropagates loss x share x world, and
    DDP averages). One collective under DDP. None alone and without accumulation: the local
    counts are then the global ones."""
    if not info.enabled and list(micro_ns) == [local_n]:
        return None
    names = list(counts)
    device = counts[names[0]].device
    total = torch.stack([torch.tensor(local_n, device=device)]
                        + [counts[k] for k in names]).to(torch.float64)
    all_reduce_sum(total, info)  # [global examples, global counts...]
    out = []
    for micro_n in micro_ns:
        share = micro_n / total[0]
        out.append({k: (total[i + 1].clamp(min=1) * share).float() for i, k in enumerate(names)})
    return out
