"""Plan -> jobs through submitit (Slurm, local subprocesses, or in-process debug), and their state.

A manifest on disk (``job.json`` in each stage's run directory, plus an append-only
``<workdir>/submissions.jsonl`` journal) maps stage hashes to job ids, so ``status``, ``cancel``,
``report`` and re-runs work from any later shell; no live process holds state.

Slurm: one job array per (stage level, parent job) through ``executor.batch()``; fine-tuning arrays
depend ``afterok`` on their pretraining job (an array shares one dependency, so grouping by parent
keeps one failed pretraining from blocking the others' fine-tunings). Arrays are split above the
cluster's MaxArraySize and throttled with ``array_parallelism``.
Local/debug: the same stages run as subprocesses (or in-process) with at most ``parallelism`` at
once, in dependency order, with a progress bar.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from lxmert_bench.config import accumulation_problem
from lxmert_bench.io import append_jsonl, atomic_write_json, read_json, utc_now
from lxmert_bench.owner import HOST, process_start_time, publish_directory, same_process
from lxmert_bench.plan import Plan, Stage
from lxmert_bench.progress import StageProgress, stage_label
from lxmert_bench.store import (
    ACTIVE,
    DONE,
    FAILED,
    INTERRUPTED,
    ORPHANED,
    QUEUED,
    RUNNING,
    TO_RUN,
    RunDir,
    describe_holder,
)

SLURM_RESOURCE_KEYS = {
    "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node",
    "partition", "account", "qos", "constraint", "signal_delay_s", "max_num_timeout",
    "additional_parameters", "setup",
    # first-class sbatch options (as Hydra's submitit launcher has them)
    "gres", "mem_per_gpu", "exclude", "requeue", "mail_type", "mail_user",
}
MAIL_TYPES = {"NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
              "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS"}
SLURM_TOP_KEYS = {"name", "description", "array_parallelism", "max_array_size", "bert", "pretrain",
                  "finetune", "local_parallelism", "throughput"}
REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(RuntimeError):
    """A launch cannot proceed (bad resource profile, Slurm refused a job, ...)."""


class ResourceError(LaunchError):
    """A resource request that is invalid, or that the cluster can never satisfy: bad input,
    found before anything is submitted (the CLI exits 2)."""


# ---------------------------------------------------------------------------------------------
# The job a scheduler runs
# ---------------------------------------------------------------------------------------------
class StageJob(submitit.helpers.Checkpointable):
    """Runs one stage from its run directory. Small to pickle: a workdir and a stage id.

    Preemption or timeout (USR2 on every rank, ``slurm_signal_delay_s`` before the limit, or
    ``scancel --signal=USR2``): submitit's own handler would requeue at once on rank 0 while the
    other ranks train on, with nothing saved. Instead every rank's USR2 only sets a flag
    (``train.loop.request_stop``); the ranks agree on it at a step boundary, write ``last.pt``
    together and raise ``StopRequested``; then submitit's handler runs as it would have (rank 0:
    :meth:`checkpoint`, ``scontrol requeue``, exit; its timeout count included), and the requeued
    job resumes from that checkpoint.
    """

    def __init__(self, workdir: str, stage_id: str, threads: int | None = None,
                 launcher: tuple[int, int | None] | None = None):
        self.workdir = str(workdir)
        self.stage_id = stage_id
        self.threads = threads
        self.launcher = launcher  # local runs: (pid, start time) of the `run` that started it

    def __call__(self) -> dict[str, Any]:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.launcher:
            watch_launcher(*self.launcher)
        # multi-task Slurm jobs: train.loop.setup_distributed exports submitit's torch environment
        from lxmert_bench.train.loop import StopRequested
        from lxmert_bench.train.stages import run_stage

        requeue = self._defer_preemption_signal()
        try:
            result = run_stage(RunDir(self.workdir, self.stage_id), wait_for_lock=True)
        except StopRequested as stop:
            if requeue is None:
                raise
            requeue(stop.signum or signal.SIGUSR2)  # rank 0: requeues and exits; others return
            sys.exit(0)  # other ranks: the requeue ends this step on every node
        if requeue is not None:
            # done (result.json written): a late USR2 must neither requeue nor kill the process
            # while submitit saves the result or Python exits (which resets handlers, not
            # SIG_IGN, to the default action: death by signal 12, job FAILED, dependents stuck)
            signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)
        if os.environ.get("SUBMITIT_EXECUTOR") in ("local", "slurm"):  # a process of its own
            # which exits next: its interpreter's last garbage collection walks every object torch
            # and the stage made (0.6 s a stage here), and the next stage waits for that exit
            gc.freeze()
        return {"stage_id": self.stage_id, "metrics": result.get("metrics", {})}

    @staticmethod
    def _defer_preemption_signal() -> Callable[[int], None] | None:
        """In a submitit Slurm job: make the preemption signal a stop request for the training
        loop and return submitit's handler (to call once ``last.pt`` is written); else None."""
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return None
        from submitit.core.job_environment import JobEnvironment, SignalHandler

        from lxmert_bench.train.loop import request_stop

        sig = JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(sig)
        if not isinstance(getattr(submitit_handler, "__self__", None), SignalHandler):
            return None  # not installed by submitit's process_job: leave the signal alone
        signal.signal(sig, request_stop)
        return submitit_handler  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"StageJob({self.stage_id})"


def watch_launcher(pid: int, start_time: int | None, poll_s: float = 1.0) -> None:
    """End this local stage (SIGTERM: interrupted, resumable) when the `run` that started it is
    gone, e.g. after ``kill -9``: a local stage never outlives its launcher."""
    import threading

    def watch() -> None:
        while same_process(pid, start_time):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# Resource profiles (slurm/profiles/*.yaml)
# ---------------------------------------------------------------------------------------------
@dataclass
class ResourceProfile:
    name: str
    kinds: dict[str, dict[str, Any]]
    array_parallelism: int = 256
    max_array_size: int = 1000
    local_parallelism: int | None = None
    path: str = ""
    # measured samples/s per GPU by stage kind, with the GPU type (plan's GPU-hour estimates)
    throughput: dict[str, Any] = field(default_factory=dict)

    def for_kind(self, kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        res = dict(self.kinds.get(kind, {}))
        res.update(overrides or {})
        return res


def user_profile_dir() -> Path:
    """Per-user resource profiles: ``$XDG_CONFIG_HOME/lxmert-bench/slurm`` (~/.config by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lxmert-bench" / "slurm"


def profile_search_path() -> list[Path]:
    """Where ``--slurm-profile NAME`` is looked for, in order: the project's, the user's, shipped."""
    return [Path.cwd() / "slurm" / "profiles", user_profile_dir(), REPO_ROOT / "slurm" / "profiles"]


def _profile_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    folders = profile_search_path()
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ResourceError(f"slurm profile {name!r}: not found in {', '.join(map(str, folders))} "
                        "(or give a path to a .yaml)")


def load_resource_profile(name: str) -> ResourceProfile:
    path = _profile_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ResourceError(f"{path}: invalid YAML: {e}") from None
    problems = [f"{path}: {k}: unknown key (known: {sorted(SLURM_TOP_KEYS)})"
                for k in data if k not in SLURM_TOP_KEYS]
    kinds: dict[str, dict[str, Any]] = {}
    for kind in ("bert", "pretrain", "finetune"):
        res = data.get(kind) or {}
        if not isinstance(res, dict):
            problems.append(f"{path}: {kind}: expected a mapping of resources")
            continue
        problems += [f"{path}: {kind}.{k}: unknown resource (known: {sorted(SLURM_RESOURCE_KEYS)})"
                     for k in res if k not in SLURM_RESOURCE_KEYS]
        problems += [f"{path}: {kind}.{p}" for p in resource_problems(res)]
        kinds[kind] = res
    if "throughput" in data:
        from lxmert_bench.plan import throughput_problems

        problems += [f"{path}: {p}" for p in throughput_problems(data["throughput"])]
    if problems:
        raise ResourceError("\n".join(problems))
    return ResourceProfile(
        name=str(data.get("name", path.stem)), kinds=kinds,
        array_parallelism=int(data.get("array_parallelism", 256)),
        max_array_size=int(data.get("max_array_size", 1000)),
        local_parallelism=data.get("local_parallelism"), path=str(path),
        throughput=data.get("throughput") or {},
    )


def parse_gpus(value: Any) -> tuple[str | None, int]:
    """``gpus_per_node``: ``4`` or ``"4"`` -> (None, 4); a typed count ``"a100:4"`` -> ("a100", 4).
    ValueError with what was expected otherwise."""
    if value is None or value is False:
        return None, 0
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(f"expected a GPU count or TYPE:COUNT (e.g. 4 or a100:4), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a GPU count >= 0, got {value}")
        return None, value
    text = str(value).strip()
    kind, sep, count = text.rpartition(":")
    if not count.isdigit() or (sep and not kind) or ":" in kind:
        raise ValueError(f"expected a GPU count or TYPE:COUNT (e.g. 4 or a100:4), got {value!r}")
    return (kind or None), int(count)


def gpu_count(resources: dict[str, Any]) -> int:
    """GPUs per node a resource request asks for, from ``gpus_per_node`` or a ``gpu`` gres."""
    _, n = parse_gpus(resources.get("gpus_per_node"))
    for item in str(resources.get("gres") or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            n = max(n, int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1)
    return n


def _positive_int(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def resource_problems(res: dict[str, Any]) -> list[str]:
    """What is wrong with one stage kind's resources (each "key: why"), without asking Slurm."""
    out: list[str] = []
    try:
        gpu_type, _ = parse_gpus(res.get("gpus_per_node"))
    except ValueError as e:
        out.append(f"gpus_per_node: {e}")
        gpu_type = None
    for key, minimum in (("nodes", 1), ("tasks_per_node", 1), ("cpus_per_task", 1),
                         ("timeout_min", 1), ("signal_delay_s", 0), ("max_num_timeout", 0)):
        if res.get(key) is not None and not _positive_int(res[key], minimum):
            out.append(f"{key}: expected an integer >= {minimum}, got {res[key]!r}")
    gres = res.get("gres")
    if gres is not None:
        items = str(gres).split(",") if isinstance(gres, str) else [None]
        if not all(i and i.strip() and all(p.strip() for p in i.split(":")) for i in items):
            out.append(f"gres: expected NAME[:TYPE][:COUNT][,...] (e.g. gpu:a100:4), got {gres!r}")
        elif res.get("gpus_per_node") and any(i.strip().startswith("gpu") for i in items):
            out.append("gres: asks for GPUs and so does gpus_per_node; give one of the two")
    if gpu_type and gres:
        out.append("gpus_per_node: a typed count becomes the gres; drop gres or give a plain count")
    mpg = res.get("mem_per_gpu")
    if mpg is not None:
        if not (_positive_int(mpg) or (isinstance(mpg, str) and mpg[:-1].isdigit()
                                       and mpg[-1].upper() in "KMGT")):
            out.append(f"mem_per_gpu: expected GB as an integer or a size like 16G, got {mpg!r}")
        if res.get("mem_gb"):
            out.append("mem_per_gpu: Slurm refuses it together with mem_gb; give one of the two")
    exclude = res.get("exclude")
    if exclude is not None and not (
            (isinstance(exclude, str) and exclude.strip())
            or (isinstance(exclude, list) and exclude and all(isinstance(x, str) and x for x in exclude))):
        out.append(f"exclude: expected a node list (a string like n[1-3] or a list), got {exclude!r}")
    if res.get("requeue") is not None and not isinstance(res["requeue"], bool):
        out.append(f"requeue: expected true or false, got {res['requeue']!r}")
    mail_type = res.get("mail_type")
    if mail_type is not None:
        names = [m.strip().upper() for m in str(mail_type).split(",")]
        bad = [m for m in names if m not in MAIL_TYPES]
        if bad or not isinstance(mail_type, str):
            out.append(f"mail_type: {', '.join(bad) or repr(mail_type)}: not a Slurm mail type "
                       f"(known: {', '.join(sorted(MAIL_TYPES))})")
    mail_user = res.get("mail_user")
    if mail_user is not None and not (isinstance(mail_user, str) and mail_user.strip()
                                      and not any(c.isspace() for c in mail_user)):
        out.append(f"mail_user: expected an address or user name, got {mail_user!r}")
    if mail_user and not mail_type:
        out.append("mail_user: without mail_type Slurm sends nothing; set mail_type (e.g. FAIL)")
    return out


def submitit_parameters(resources: dict[str, Any], cluster: str) -> dict[str, Any]:
    """Our resource keys -> AutoExecutor.update_parameters keywords (``resource_problems`` has
    checked them)."""
    generic = {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node"}
    params: dict[str, Any] = {}
    extra: dict[str, Any] = dict(resources.get("additional_parameters") or {})
    for k, v in resources.items():
        if v is None or k in ("max_num_timeout", "additional_parameters"):
            continue  # max_num_timeout: see _executor
        if k == "gpus_per_node":
            gpu_type, n = parse_gpus(v)
            if gpu_type and cluster == "slurm":
                params["slurm_gres"] = f"gpu:{gpu_type}:{n}"  # typed: as a gres, not a count
            else:
                params["gpus_per_node"] = n
        elif k in generic:
            params[k] = v
        elif cluster != "slurm":
            continue
        elif k == "requeue":
            extra["requeue" if v else "no_requeue"] = True  # submitit has no parameter for it
        elif k == "mem_per_gpu":
            params["slurm_mem_per_gpu"] = f"{v}G" if isinstance(v, int) else str(v)
        elif k == "exclude":
            params["slurm_exclude"] = ",".join(v) if isinstance(v, list) else str(v)
        elif k == "mail_type":
            params["slurm_mail_type"] = ",".join(m.strip().upper() for m in str(v).split(","))
        else:
            params[f"slurm_{k}"] = v
    if extra and cluster == "slurm":
        params["slurm_additional_parameters"] = extra
    if cluster != "slurm":
        params.pop("nodes", None)
        params.pop("tasks_per_node", None)
        params["gpus_per_node"] = 0 if not _cuda_count() else params.get("gpus_per_node", 0)
    return params


def ranks(resources: dict[str, Any]) -> int:
    """DDP ranks of a Slurm job with these resources: nodes x tasks per node."""
    return int(resources.get("nodes") or 1) * int(resources.get("tasks_per_node") or 1)


_PARTITIONS: dict[str, dict[str, str]] | None = None


def partitions() -> dict[str, dict[str, str]]:
    """``scontrol show partition`` once per process: name -> its fields ({} without Slurm)."""
    global _PARTITIONS
    if _PARTITIONS is None:
        _PARTITIONS = {}
        if shutil.which("scontrol") and shutil.which("sbatch"):
            proc = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True,
                                  text=True)
            for line in proc.stdout.splitlines():
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                if fields.get("PartitionName"):
                    _PARTITIONS[fields["PartitionName"]] = fields
    return _PARTITIONS


def check_resources(plan: Plan, resources: ResourceProfile, overrides: dict[str, Any] | None = None,
                    cluster: str = "slurm") -> list[str]:
    """Requests Slurm could never run, found before submitting: a global batch the ranks cannot
    split evenly, more nodes than the partition has (or allows), an unknown partition."""
    out: list[str] = []
    said: set[str] = set()
    for st in plan.ordered():  # micro-batches that do not make up the batch (any executor)
        optim = getattr(getattr(st.config, st.kind, None), "optim", None)
        n = ranks(resources.for_kind(st.kind, overrides)) if cluster == "slurm" else 1
        problem = optim and accumulation_problem(optim.batch_size, optim.micro_batch_size, n,
                                                 f"{st.kind}.optim.micro_batch_size")
        if problem and problem not in said:
            said.add(problem)
            out.append(f"{problem}, e.g. stage {st.stage_id}")
    if cluster != "slurm":
        return out
    where = resources.path or resources.name
    seen: set[tuple[str, int]] = set()
    for st in plan.ordered():
        res = resources.for_kind(st.kind, overrides)
        n = ranks(res)
        sub = getattr(st.config, st.kind, None)
        batch = getattr(getattr(sub, "optim", None), "batch_size", None)
        if batch and n > 1 and batch % n and (st.kind, batch) not in seen:
            seen.add((st.kind, batch))
            out.append(f"{st.kind}.optim.batch_size={batch} is not divisible by the {n} ranks of "
                       f"{where} {st.kind} (nodes {res.get('nodes') or 1} x tasks_per_node "
                       f"{res.get('tasks_per_node') or 1}), e.g. stage {st.stage_id}; change the "
                       "batch or the resources")
    parts = partitions()
    if not parts:
        return out
    for kind in sorted({st.kind for st in plan.stages.values()}):
        res = resources.for_kind(kind, overrides)
        name = res.get("partition") or next(
            (p for p, f in parts.items() if f.get("Default") == "YES"), None)
        if name is None:
            continue
        if name not in parts:
            out.append(f"{where}: {kind}.partition: {name!r} is not a partition of this cluster "
                       f"(it has: {', '.join(sorted(parts))})")
            continue
        total = parts[name].get("TotalNodes", "")
        most = parts[name].get("MaxNodes", "UNLIMITED")
        limit = min(int(x) for x in (total, most) if x.isdigit()) if any(
            x.isdigit() for x in (total, most)) else None
        nodes = int(res.get("nodes") or 1)
        if limit is not None and nodes > limit:
            out.append(f"{where}: {kind}.nodes={nodes}: partition {name} has {total} node(s)"
                       + (f" and allows {most} per job" if most.isdigit() else "")
                       + "; Slurm would keep the job pending forever (PartitionNodeLimit)")
    return out


def gpu_device_nodes() -> bool:
    """Whether this machine shows a GPU to processes (NVIDIA's or ROCm's device files, or
    nvidia-smi), without importing torch: 1.5 s off the start of every local run without one."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
                or shutil.which("nvidia-smi"))


def _cuda_count() -> int:
    if not gpu_device_nodes():
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver both mean no GPU
        return 0


def resolve_executor(name: str) -> str:
    if name == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if name == "slurm" and not shutil.which("sbatch"):
        raise LaunchError("--executor slurm: 'sbatch' is not on the PATH (no Slurm client here); "
                          "use --executor local, or start the test cluster with slurm/start.sh")
    return name


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
def job_record_path(workdir: str | Path, stage_id: str) -> Path:
    return RunDir(workdir, stage_id).path / "job.json"


def read_job(workdir: str | Path, stage_id: str) -> dict[str, Any] | None:
    p = job_record_path(workdir, stage_id)
    return read_json(p) if p.is_file() else None


def write_job(workdir: str | Path, stage_id: str, record: dict[str, Any]) -> None:
    atomic_write_json(job_record_path(workdir, stage_id), record)
    append_jsonl(Path(workdir) / "submissions.jsonl", {"stage_id": stage_id, **record})


@contextlib.contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
    """One launcher at a time per workdir, so two shells never submit the same stage twice."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(Path(workdir) / ".launch.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
@dataclass
class StageStatus:
    stage_id: str
    state: str
    job_id: str | None = None
    executor: str | None = None
    reason: str = ""
    error_tail: str = ""
    slurm_reason: str = ""  # Slurm's pending reason, as squeue gives it (e.g. DependencyNeverSatisfied)


SLURM_QUERY_CHUNK = 500  # ids per squeue/sacct/scancel call: far below the kernel's argument limit


def _chunks(items: list[str], size: int = SLURM_QUERY_CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def array_base(job_id: str) -> str:
    """``'37_4'`` -> ``'37'`` (the array job id); a plain job id is its own."""
    return str(job_id).split("_", 1)[0]


def expand_job_record(job_id: str) -> list[str]:
    """The job ids one squeue/sacct record stands for: ``'37_[0-3,7%2]'`` -> 37_0..37_3, 37_7
    (a pending array, e.g. cancelled before its elements started, has only this record);
    ``'37_4'`` -> ``['37_4']``; ``'37'`` -> ``['37']``."""
    job_id = job_id.strip()
    if "_[" not in job_id or not job_id.endswith("]"):
        return [job_id]
    base, spec = job_id[:-1].split("_[", 1)
    spec = spec.split("%", 1)[0]  # the throttle (%N) is not an element
    out: list[str] = []
    try:
        for part in filter(None, spec.split(",")):
            lo, _, rest = part.partition("-")
            if not rest:
                out.append(f"{base}_{int(lo)}")
                continue
            hi, _, step = rest.partition(":")
            out += [f"{base}_{i}" for i in range(int(lo), int(hi) + 1, int(step or 1))]
    except ValueError:  # a form this parser does not know: keep the record as it is
        return [job_id]
    return out


def compress_job_ids(job_ids: list[str]) -> list[str]:
    """Element ids -> one expression per array (``37_[0-3,7]``) plus the plain ids, as scancel
    takes them: cancelling 2,000 stages is a handful of ids, not 2,000 calls."""
    elements: dict[str, list[int]] = {}
    plain: list[str] = []
    for j in dict.fromkeys(map(str, job_ids)):
        base, sep, idx = j.partition("_")
        if sep and idx.isdigit():
            elements.setdefault(base, []).append(int(idx))
        else:
            plain.append(j)
    out = list(plain)
    for base, idxs in elements.items():
        idxs.sort()
        ranges: list[str] = []
        lo = prev = idxs[0]
        for i in [*idxs[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            ranges.append(f"{lo}" if lo == prev else f"{lo}-{prev}")
            if i is not None:
                lo = prev = i
        out.append(f"{base}_[{','.join(ranges)}]")
    return out


def scancel(job_ids: list[str]) -> int:
    """Cancel these jobs / array elements with as few scancel calls as possible; returns how many."""
    calls = 0
    for chunk in _chunks(compress_job_ids(job_ids), 200):
        subprocess.run(["scancel", *chunk], capture_output=True)
        calls += 1
    return calls


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (Slurm state, pending reason), asked by array job id in chunks (one squeue and one
    sacct call per ~500 arrays or plain jobs, so 10,000 stages never overflow an argument list).
    sacct's records of pending arrays (``37_[0-1%2]``) are expanded to their elements."""
    out: dict[str, tuple[str, str]] = {}
    if not job_ids or not shutil.which("squeue"):
        return out
    wanted = set(map(str, job_ids))
    bases = sorted({array_base(j) for j in wanted})
    for chunk in _chunks(bases):
        sq = subprocess.run(["squeue", "-r", "-h", "-o", "%i|%T|%r", "-j", ",".join(chunk)],
                            capture_output=True, text=True)
        for line in sq.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in wanted:
                out[parts[0]] = (parts[1], parts[2])
    if shutil.which("sacct"):
        for chunk in _chunks(bases):
            sa = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(chunk)],
                                capture_output=True, text=True)
            for line in sa.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) != 2 or not parts[1].strip():
                    continue
                for jid in expand_job_record(parts[0]):
                    if jid in wanted and jid not in out:
                        out[jid] = (parts[1].split()[0], "")
    return out


# Slurm's job states -> ours. Ended without a result by the machine, the scheduler or a person:
# interrupted (a plain re-run resumes it); ended by the program itself: failed (the user must act).
SLURM_QUEUED = ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING")
SLURM_RUNNING = ("RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING")
SLURM_INTERRUPTED = ("CANCELLED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "TIMEOUT", "DEADLINE")
SLURM_FAILED = ("FAILED", "OUT_OF_MEMORY", "COMPLETED")  # COMPLETED without result.json
# Pending reasons Slurm never lifts by itself: the job waits forever unless someone acts.
NEVER_STARTS = {
    "DependencyNeverSatisfied": "its dependency ended without success (`run` cancels it and "
                                "resubmits it against the finished dependency)",
    "PartitionNodeLimit": "it asks more nodes than the partition has or allows",
    "PartitionTimeLimit": "it asks more time than the partition allows",
    "PartitionConfig": "the partition cannot satisfy its request",
    "BadConstraints": "no node has the features/resources it asks for",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "AssocMaxNodesPerJobLimit": "it asks more nodes than the account's limit",
    "AssocMaxWallDurationPerJobLimit": "it asks more time than the account's limit",
    "QOSMaxNodePerJobLimit": "it asks more nodes than the QOS allows",
    "QOSMaxWallDurationPerJobLimit": "it asks more time than the QOS allows",
    "QOSMaxGRESPerJob": "it asks more GPUs than the QOS allows",
}


def never_starts(reason: str, known_nodes: set[str] | None = None) -> str:
    """Why a job pending for this Slurm reason will never start, or '' when it may.
    ``ReqNodeNotAvail`` (nodes down or drained) usually passes; it never does when a node it
    waits for is not a node of the cluster (``known_nodes``, from sinfo)."""
    head = reason.split(",")[0].strip()
    if head == "ReqNodeNotAvail" and known_nodes:
        missing = [n for n in unavailable_nodes(reason) if n not in known_nodes]
        if missing:
            return f"it asks for node(s) {', '.join(missing)}, which the cluster does not have"
    return NEVER_STARTS.get(head, "")


def unavailable_nodes(reason: str) -> list[str]:
    """``'ReqNodeNotAvail, UnavailableNodes:gpu[1-2],cpu7'`` -> gpu1, gpu2, cpu7."""
    _, sep, nodes = reason.partition("UnavailableNodes:")
    return expand_hostlist(nodes.strip()) if sep else []


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist notation: ``'n[1-3,7],login'`` -> n1, n2, n3, n7, login (zero padding
    kept: ``n[01-02]`` -> n01, n02)."""
    out: list[str] = []
    depth, start = 0, 0
    parts: list[str] = []
    for i, c in enumerate(text + ","):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    for part in filter(None, (p.strip() for p in parts)):
        prefix, sep, rest = part.partition("[")
        if not sep or not rest.endswith("]"):
            out.append(part)
            continue
        for item in rest[:-1].split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                out.append(part)
                break
            out += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def cluster_nodes() -> set[str]:
    """The node names of the cluster (sinfo), or an empty set without Slurm."""
    if not shutil.which("sinfo"):
        return set()
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    return {n.strip() for n in proc.stdout.split() if n.strip()}


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _error_tail(workdir: Path, stage_id: str, record: dict[str, Any] | None) -> str:
    try:
        err = RunDir(workdir, stage_id).read_error()
    except ValueError as e:
        return str(e)
    if isinstance(err, dict):
        tb = str(err.get("traceback", "")).strip().splitlines()
        return "\n".join([f"{err.get('type', 'Error')}: {err.get('error', '')}", *tb[-6:]])
    if record and record.get("folder") and record.get("job_id"):
        for name in (f"{record['job_id']}_0_log.err", f"{record['job_id']}_log.err"):
            p = Path(record["folder"]) / name
            if p.is_file():
                return _tail(p)
    return ""


def launcher_alive(record: dict[str, Any] | None) -> bool:
    """Whether the local `run` that queued this stage is still the same live process."""
    launcher = (record or {}).get("launcher")
    if not launcher or launcher.get("host") != HOST:
        return False
    return same_process(int(launcher.get("pid", 0)), launcher.get("start_time"))


def stage_statuses(plan: Plan, workdir: str | Path, query_scheduler: bool = True) -> dict[str, StageStatus]:
    """The state of every stage, from disk and (forced) one query of the scheduler."""
    workdir = Path(workdir)
    records = {sid: read_job(workdir, sid) for sid in plan.stages}
    slurm_ids = [r["job_id"] for r in records.values()
                 if r and r.get("executor") == "slurm" and r.get("job_id")]
    sstates = slurm_states(slurm_ids) if query_scheduler and slurm_ids else {}
    out: dict[str, StageStatus] = {}
    current: str | None = None  # this checkout's sources hash, computed once when needed
    nodes: set[str] | None = None  # the cluster's node names, asked once when needed
    for sid in plan.stages:
        rec = records[sid]
        st = StageStatus(sid, TO_RUN, rec.get("job_id") if rec else None,
                         rec.get("executor") if rec else None)
        st.state, st.reason = _state(RunDir(workdir, sid), rec, sstates)
        if st.state == QUEUED and st.executor == "slurm" and st.job_id:
            st.slurm_reason = sstates.get(str(st.job_id), ("", ""))[1]
            if st.slurm_reason.startswith("ReqNodeNotAvail"):
                nodes = cluster_nodes() if nodes is None else nodes
                never = never_starts(st.slurm_reason, nodes)
                if never:
                    st.reason += f"; will never start: {never}"
        planned_with = ((rec or {}).get("code") or {}).get("source_hash")
        if st.state in ACTIVE and planned_with:
            if current is None:
                from lxmert_bench.provenance import source_hash

                current = source_hash()
            if planned_with != current:
                st.reason = (f"{st.reason}; " if st.reason else "") + (
                    f"the code changed since it was submitted: it runs its snapshot {planned_with}")
        if st.state in (FAILED, INTERRUPTED, ORPHANED):
            st.error_tail = _error_tail(workdir, sid, rec)
        out[sid] = st
    return out


def _state(run: RunDir, rec: dict[str, Any] | None, sstates: dict[str, tuple[str, str]]
           ) -> tuple[str, str]:
    """(state, reason) of one stage: its files first, then the scheduler or the local launcher."""
    disk = run.disk_state()
    if disk == DONE:
        return DONE, ""
    if disk == RUNNING:
        return RUNNING, describe_holder(run.lock_holder() or {})
    if disk == FAILED:
        return FAILED, run.result_problem() or "raised an error (re-run with --retry-failed)"
    rec = rec or {}
    if rec.get("state") == ORPHANED:
        return ORPHANED, rec.get("reason", "")
    if rec.get("executor") == "slurm" and rec.get("job_id"):
        job = str(rec["job_id"])
        state, reason = sstates.get(job, ("", ""))
        if state in SLURM_QUEUED:
            never = never_starts(reason)
            return QUEUED, f"Slurm {state}" + (f" ({reason})" if reason and reason != "None" else "") \
                + (f"; will never start: {never}" if never else "")
        if state in SLURM_RUNNING:
            return RUNNING, f"Slurm job {job} {state}"
        if state in SLURM_INTERRUPTED:
            return INTERRUPTED, f"Slurm job {job} {state}"
        if state in SLURM_FAILED:
            why = " (out of memory: ask for more with mem_gb)" if state == "OUT_OF_MEMORY" else ""
            return FAILED, f"Slurm job {job} {state} without a result{why}"
        if rec.get("state") == INTERRUPTED:
            return INTERRUPTED, rec.get("reason", "")
        if not sstates and not shutil.which("squeue"):
            return disk, f"Slurm job {job}: no squeue here to ask"
        return INTERRUPTED, f"Slurm job {job} not found in squeue or sacct"
    if rec.get("state") == INTERRUPTED:
        return INTERRUPTED, rec.get("reason", "")
    if launcher_alive(rec):
        pid = rec["launcher"]["pid"]
        return QUEUED, f"waiting in a local run (pid {pid} on {HOST})"
    if disk == INTERRUPTED:
        err = run.error_record() or {}
        return INTERRUPTED, f"ended by {err['signal']}" if err.get("signal") else "ended without a result"
    return TO_RUN, ""


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------
@dataclass
class LaunchReport:
    submitted: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_active: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # stage -> why it was not submitted
    completed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    orphaned: dict[str, str] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.interrupted or self.orphaned or self.blocked)


def select_stages(plan: Plan, statuses: dict[str, StageStatus], retry_failed: bool,
                  report: LaunchReport) -> list[Stage]:
    """Which stages to submit now: not done, not queued/running; interrupted and orphaned ones
    resume; failed ones (they raised) only with ``retry_failed``."""
    todo: list[Stage] = []
    broken: set[str] = set()
    for st in plan.ordered():
        s = statuses[st.stage_id]
        if s.state == DONE:
            report.skipped_done.append(st.stage_id)
            continue
        if s.state in ACTIVE:
            report.skipped_active.append(st.stage_id)
            continue
        if s.state == FAILED and not retry_failed:
            report.blocked[st.stage_id] = f"{s.state} (re-run with --retry-failed)"
            broken.add(st.stage_id)
            continue
        bad = [d for d in st.deps if d in broken]
        if bad:
            report.blocked[st.stage_id] = f"depends on {bad[0]}, which is not done"
            broken.add(st.stage_id)
            continue
        todo.append(st)
    return todo


def _freeze(stages: list[Stage], workdir: Path) -> None:
    for st in stages:
        run = RunDir(workdir, st.stage_id)
        run.write_config(st.config)
        if run.is_failed():
            run.clear_error()  # --retry-failed; an interrupted stage's record stays until its result


def launcher_identity() -> dict[str, Any]:
    """This process as the launcher of local stages: host, pid and start time (a reused pid is
    not mistaken for it)."""
    return {"host": HOST, "pid": os.getpid(), "start_time": process_start_time(os.getpid())}


def launch(
    plan: Plan, workdir: str | Path, executor: str = "auto", *, resources: ResourceProfile,
    resource_overrides: dict[str, Any] | None = None, retry_failed: bool = False,
    parallelism: int | None = None, progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> LaunchReport:
    """Submit what the plan still needs. Local/debug executors run it to the end before returning.

    Selection and the job records are written under the workdir's launcher lock, so two shells
    never pick the same stage; local stages queued by another live ``run`` are waited for, not run
    again (and each stage's own execution lock makes that hold whatever happens).
    """
    workdir = Path(workdir).resolve()
    cluster = resolve_executor(executor)
    problems = check_resources(plan, resources, resource_overrides, cluster)
    if problems:  # before anything is written or submitted
        raise ResourceError("\n".join(problems))
    report = LaunchReport()
    say = on_event or (lambda msg: print(msg, file=sys.stderr))
    with workdir_lock(workdir):
        statuses = stage_statuses(plan, workdir)
        if cluster == "slurm":  # stages pending forever become orphaned, so they are re-planned
            cancel_orphans(plan, workdir, statuses)
        todo = select_stages(plan, statuses, retry_failed, report)
        if not todo:
            return report
        _freeze(todo, workdir)
        prepare_data(todo)
        if cluster == "slurm":
            _submit_slurm(plan, todo, workdir, statuses, resources, resource_overrides or {}, report, say)
            return report
        me = launcher_identity()
        for st in todo:
            write_job(workdir, st.stage_id, {"executor": cluster, "launcher": me,
                                             "queued_at": utc_now()})
    _run_local(plan, todo, workdir, cluster, resources, resource_overrides or {}, parallelism,
               progress, report, say)
    return report


def prepare_data(stages: list[Stage]) -> None:
    """Generate each synthetic benchmark a plan needs once, here, rather than in every job."""
    from lxmert_bench.data.root import ensure_data_root

    for data in {st.config.data.root: st.config.data for st in stages
                 if st.config.data.synthetic}.values():
        ensure_data_root(data)


def snapshot_code(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A content-addressed copy of the package under ``<workdir>/code/<sources hash>/`` that
    submitted jobs import from (it goes first on their PYTHONPATH), so a queued job runs the code
    it was planned with whatever is edited meanwhile. Made once per distinct source tree."""
    from lxmert_bench.provenance import PACKAGE, SNAPSHOT_RECORD, code_provenance, source_files

    prov = {k: v for k, v in code_provenance().items() if k != "path"}
    target = workdir / "code" / str(prov["source_hash"])
    if not (target / "lxmert_bench" / SNAPSHOT_RECORD).is_file():
        def fill(tmp: Path) -> None:
            for f in source_files():
                dest = tmp / "lxmert_bench" / f.relative_to(PACKAGE)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
            atomic_write_json(tmp / "lxmert_bench" / SNAPSHOT_RECORD, prov)

        publish_directory(target, fill)  # False: the same sources, published by another launcher
    return target, prov


@contextlib.contextmanager
def _importing_from(snapshot: Path) -> Iterator[None]:
    """Processes started inside import lxmert_bench from ``snapshot`` (local jobs). PYTHONSAFEPATH
    (Python 3.11+) keeps ``python -m`` from putting the current directory, perhaps a checkout
    being edited, before it."""
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYTHONSAFEPATH")}
    os.environ["PYTHONPATH"] = str(snapshot) + (os.pathsep + old["PYTHONPATH"]
                                                if old["PYTHONPATH"] else "")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _executor(workdir: Path, cluster: str, resources: dict[str, Any] | None = None
              ) -> submitit.AutoExecutor:
    kwargs: dict[str, Any] = {}
    if cluster == "slurm" and (resources or {}).get("max_num_timeout") is not None:
        # submitit takes this one in the constructor only, not in update_parameters()
        kwargs["slurm_max_num_timeout"] = int(resources["max_num_timeout"])
    return submitit.AutoExecutor(folder=workdir / "submitit" / "%j", cluster=cluster, **kwargs)


def _submit_slurm(plan: Plan, todo: list[Stage], workdir: Path, statuses: dict[str, StageStatus],
                  resources: ResourceProfile, overrides: dict[str, Any], report: LaunchReport,
                  say: Callable[[str], None]) -> None:
    job_of: dict[str, str] = {sid: s.job_id for sid, s in statuses.items()
                              if s.state in ACTIVE and s.job_id}
    snapshot, code = snapshot_code(workdir)
    for level in sorted({st.level for st in todo}):
        groups: dict[tuple[str, str | None], list[Stage]] = {}
        for st in (s for s in todo if s.level == level):
            parent = next((job_of[d] for d in st.deps if d in job_of), None)
            groups.setdefault((st.kind, parent), []).append(st)
        for (kind, parent_job), stages in groups.items():
            res = resources.for_kind(kind, overrides)
            params = submitit_parameters(res, "slurm")
            params["slurm_array_parallelism"] = resources.array_parallelism
            params["name"] = f"lxmert-{kind}"
            params["slurm_setup"] = [*(params.get("slurm_setup") or []),
                                     f"export PYTHONPATH={shlex.quote(str(snapshot))}"
                                     "${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1"]
            if parent_job:
                params["slurm_dependency"] = f"afterok:{parent_job}"
            threads = res.get("cpus_per_task")
            size = max(1, resources.max_array_size)
            for start in range(0, len(stages), size):
                chunk = stages[start:start + size]
                ex = _executor(workdir, "slurm", res)
                ex.update_parameters(**params)
                try:
                    with ex.batch():
                        jobs = [ex.submit(StageJob(str(workdir), st.stage_id, threads)) for st in chunk]
                except Exception as e:  # noqa: BLE001 - sbatch's own message is the useful part
                    raise LaunchError(f"sbatch refused the {kind} array: {e}") from e
                for st, job in zip(chunk, jobs):
                    job_of[st.stage_id] = job.job_id
                    report.submitted.append(st.stage_id)
                    report.job_ids[st.stage_id] = job.job_id
                    write_job(workdir, st.stage_id, {
                        "executor": "slurm", "job_id": job.job_id, "folder": str(job.paths.folder),
                        "submitted_at": utc_now(), "dependency": params.get("slurm_dependency"),
                        "resources": res, "code": {**code, "snapshot": str(snapshot)},
                    })
                say(f"submitted {len(chunk)} {kind} job(s) as array {jobs[0].job_id.split('_')[0]}"
                    + (f" (afterok:{parent_job})" if parent_job else ""))


class LaunchCancelled(KeyboardInterrupt):
    """SIGTERM reached a local ``run`` (``lxmert-bench cancel``): stop like Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_stops_launcher() -> Iterator[None]:
    def handler(_signum: int, _frame: Any) -> None:
        raise LaunchCancelled()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _active_elsewhere(workdir: Path, sid: str, me: dict[str, Any]) -> bool:
    """Executed, or queued by a live launcher, in another process than this one."""
    if RunDir(workdir, sid).lock_holder() is not None:
        return True
    rec = read_job(workdir, sid)
    return launcher_alive(rec) and (rec or {}).get("launcher", {}).get("pid") != me["pid"]


def _run_local(plan: Plan, todo: list[Stage], workdir: Path, cluster: str,
               resources: ResourceProfile, overrides: dict[str, Any], parallelism: int | None,
               progress: bool, report: LaunchReport, say: Callable[[str], None]) -> None:
    """Run stages as local subprocesses (or in-process for debug), dependencies first.

    A stage another process executes (or another live ``run`` has queued) is waited for, never
    started a second time; one whose executor died meanwhile is taken over and resumed.
    """
    from tqdm import tqdm

    snapshot, code = snapshot_code(workdir)
    cpus = os.cpu_count() or 1
    per_job = max(1, int(resources.for_kind("finetune", overrides).get("cpus_per_task") or 1))
    limit = 1 if cluster == "debug" else (
        parallelism or resources.local_parallelism or max(1, cpus // per_job))
    me = launcher_identity()
    pending = list(todo)
    running: dict[str, submitit.Job] = {}
    ended: dict[str, str] = {}  # stage -> state, for stages that ended without a result
    bar = tqdm(total=len(todo), desc="stages", unit="stage",
               disable=not (progress and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True)
    watch = StageProgress(progress and cluster != "debug")
    try:
        with _sigterm_stops_launcher():
            while pending or running:
                watch.poll()
                for sid, job in list(running.items()):
                    if cluster == "debug" or job.done():
                        watch.stop(sid)
                        del running[sid]
                        _finish_local(workdir, sid, job, report, ended, say)
                        bar.update(1)
                        if bar.disable and progress:  # a log, not a terminal: plain lines
                            finished = len(todo) - len(pending) - len(running)
                            say(f"[{finished}/{len(todo)} stages] {sid}: {ended.get(sid, DONE)}")
                waiting = False
                for st in list(pending):
                    run = RunDir(workdir, st.stage_id)
                    if run.is_done():  # finished by another process meanwhile
                        pending.remove(st)
                        report.skipped_done.append(st.stage_id)
                        bar.update(1)
                        continue
                    bad = next((d for d in st.deps if d in ended), None)
                    if bad:
                        pending.remove(st)
                        why = f"dependency {bad} {ended[bad]}"
                        ended[st.stage_id] = ORPHANED
                        report.orphaned[st.stage_id] = why
                        write_job(workdir, st.stage_id, {"executor": cluster, "state": ORPHANED,
                                                         "reason": why, "time": utc_now()})
                        bar.update(1)
                        continue
                    unfinished = [d for d in st.deps if not RunDir(workdir, d).is_done()]
                    if run.lock_holder() is not None or any(
                            d not in running and _active_elsewhere(workdir, d, me)
                            for d in unfinished):
                        waiting = True  # another process is on it, or on what it needs
                        continue
                    if unfinished or len(running) >= limit:
                        continue
                    res = resources.for_kind(st.kind, overrides)
                    threads = max(1, cpus // limit)  # share the machine's cores among running stages
                    ex = _executor(workdir, cluster)
                    ex.update_parameters(**submitit_parameters(res, cluster))
                    launcher = None if cluster == "debug" else (me["pid"], me["start_time"])
                    with _sigint_ignored(cluster == "local"), _importing_from(snapshot):
                        job = ex.submit(StageJob(str(workdir), st.stage_id, threads, launcher))
                    pending.remove(st)
                    running[st.stage_id] = job
                    report.submitted.append(st.stage_id)
                    report.job_ids[st.stage_id] = str(job.job_id)
                    write_job(workdir, st.stage_id, {
                        "executor": cluster, "job_id": str(job.job_id), "launcher": me,
                        "folder": str(job.paths.folder), "submitted_at": utc_now(),
                        "code": {**code, "snapshot": str(snapshot)}})
                    watch.start(st.stage_id, stage_label(
                        list(dict.fromkeys(u[1] for u in st.users)), st.describe()), run.log_path)
                    if cluster == "debug":
                        break
                if not running and pending and not waiting:
                    started = {s.stage_id for s in pending}
                    for st in pending:  # nothing can start: they wait on stages no one runs
                        missing = next((d for d in st.deps if not RunDir(workdir, d).is_done()
                                        and d not in started), None) or st.deps[0]
                        report.blocked[st.stage_id] = f"depends on {missing}, which is not done"
                    break
                if (running or waiting) and cluster != "debug":
                    _sleep_until_one_ends(running, 0.5)
    except KeyboardInterrupt:
        _stop_local(workdir, running)
        raise
    finally:
        watch.close()
        bar.close()


def _sleep_until_one_ends(running: dict[str, submitit.Job], limit_s: float) -> None:
    """Sleep up to ``limit_s``, returning early when a running job ends, so the next stage
    starts at once (a local job's ``done()`` polls its process)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(job.done() for job in running.values()):
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _sigint_ignored(active: bool) -> Iterator[None]:
    """Start submitit's local controller with SIGINT ignored (inherited through exec), so Ctrl-C
    in the terminal reaches the stage through its own handler (it records SIGINT and stays
    resumable) rather than killing the controller mid-wait with a traceback."""
    if not active:
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_local(workdir: Path, running: dict[str, submitit.Job], grace_s: float = 10.0) -> None:
    """Interrupt the running local stages (SIGTERM, which submitit's controller forwards to its
    tasks: each records the signal and stays resumable) and wait for their locks."""
    for job in running.values():
        pid = str(job.job_id)
        if pid.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(RunDir(workdir, sid).lock_holder() for sid in running):
        time.sleep(0.2)


def _finish_local(workdir: Path, sid: str, job: submitit.Job, report: LaunchReport,
                  ended: dict[str, str], say: Callable[[str], None]) -> None:
    try:
        job.result()
        report.completed.append(sid)
        return
    except Exception as e:  # noqa: BLE001 - the stage's own error is in error.json
        run = RunDir(workdir, sid)
        state = run.disk_state()
        if state == DONE:  # its result is there (e.g. written just before a late signal)
            report.completed.append(sid)
            return
        err = run.error_record()
        if state == FAILED:
            report.failed.append(sid)
        else:
            state = INTERRUPTED
            report.interrupted.append(sid)
        ended[sid] = state
        msg = f"{err.get('type')}: {err.get('error')}" if err else \
            (str(e).strip().splitlines() or [""])[-1]
        say(f"stage {sid} {state}: {msg}")
        if state == INTERRUPTED and err and err.get("signal") == "SIGINT":
            # Ctrl-C: the stages got it, but this launcher can miss it (SIGINT is ignored here
            # while a local controller starts, _sigint_ignored); stop the run as Ctrl-C does
            raise KeyboardInterrupt from None


# ---------------------------------------------------------------------------------------------
# Following, orphans, cancelling
# ---------------------------------------------------------------------------------------------
def cancel_orphans(plan: Plan, workdir: str | Path, statuses: dict[str, StageStatus]) -> dict[str, str]:
    """Cancel queued Slurm stages that can never start (Slurm would keep them pending forever):
    a dependency ended without a result, or Slurm says ``DependencyNeverSatisfied`` (also when the
    dependency's stage is done after all: its job ended FAILED after writing result.json). The
    next ``run`` re-plans them, against the finished dependency or its new job."""
    workdir = Path(workdir)
    orphans: dict[str, str] = {}
    jobs: list[str] = []
    for sid, st in statuses.items():
        if st.state != QUEUED or st.executor != "slurm":
            continue
        deps = plan.stages[sid].deps
        bad = [d for d in deps if statuses[d].state in (FAILED, INTERRUPTED, ORPHANED)]
        if bad:
            why = f"dependency {bad[0]} {statuses[bad[0]].state}"
        elif st.slurm_reason.startswith("DependencyNeverSatisfied"):
            dep = (deps or ["?"])[0]
            why = (f"Slurm DependencyNeverSatisfied (dependency {dep} "
                   f"{statuses[dep].state if dep in statuses else 'unknown'}); cancelled, "
                   "`run` resubmits it")
        else:
            continue
        if st.job_id:
            jobs.append(str(st.job_id))
        rec = read_job(workdir, sid) or {}
        write_job(workdir, sid, {**rec, "state": ORPHANED, "reason": why, "time": utc_now()})
        st.state, st.reason = ORPHANED, why
        orphans[sid] = why
    if jobs:
        scancel(jobs)
    return orphans


def wait(plan: Plan, workdir: str | Path, poll_s: float = 5.0, progress: bool = True,
         timeout_s: float | None = None, max_poll_s: float = 60.0) -> dict[str, StageStatus]:
    """Follow submitted Slurm jobs until no stage is queued or running. Polls every ``poll_s``,
    backing off to ``max_poll_s`` while nothing changes (as submitit's own watcher does)."""
    from tqdm import tqdm

    start = time.time()
    bar = tqdm(total=len(plan.stages), desc="stages done", unit="stage", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    delay, last = poll_s, None
    try:
        while True:
            statuses = stage_statuses(plan, workdir)
            cancel_orphans(plan, workdir, statuses)
            counts: dict[str, int] = {}
            for s in statuses.values():
                counts[s.state] = counts.get(s.state, 0) + 1
            bar.n = counts.get(DONE, 0)
            bar.set_postfix_str(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
            bar.refresh()
            if not any(s.state in ACTIVE for s in statuses.values()):
                return statuses
            if timeout_s is not None and time.time() - start > timeout_s:
                raise TimeoutError(f"stages still active after {timeout_s:.0f} s")
            delay = poll_s if counts != last else min(max_poll_s, delay * 1.5)
            last = counts
            time.sleep(delay)
    finally:
        bar.close()


def cancel(plan: Plan, workdir: str | Path, grace_s: float = 15.0) -> list[str]:
    """Cancel every queued or running stage of the plan; returns their ids.

    Slurm jobs are scancelled; local stages get SIGTERM (they record it and stay resumable), and
    so do the local ``run`` processes that queued them, so nothing new starts. Waits up to
    ``grace_s`` for the local stages to let go of their locks.
    """
    workdir = Path(workdir)
    statuses = stage_statuses(plan, workdir)
    cancelled: list[str] = []
    launchers: dict[int, dict[str, Any]] = {}
    holders: list[int] = []
    slurm_jobs: list[str] = []
    for sid, st in statuses.items():
        if st.state not in ACTIVE:
            continue
        rec = read_job(workdir, sid) or {}
        if st.executor == "slurm" and st.job_id:
            slurm_jobs.append(str(st.job_id))
        else:
            if launcher_alive(rec):
                launchers[int(rec["launcher"]["pid"])] = rec["launcher"]
            holder = RunDir(workdir, sid).lock_holder() or {}
            if holder.get("host") == HOST and holder.get("pid"):
                holders.append(int(holder["pid"]))
        write_job(workdir, sid, {**rec, "state": INTERRUPTED, "reason": "cancelled by the user",
                                 "time": utc_now()})
        cancelled.append(sid)
    if slurm_jobs:
        scancel(slurm_jobs)  # one call per 200 arrays / plain jobs, not one per stage
    for pid in [*launchers, *holders]:  # launchers first: they must not start the next stage
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(RunDir(workdir, sid).lock_holder() for sid in cancelled):
        time.sleep(0.2)
    return cancelled


def sbatch_test_only(resources: ResourceProfile, kinds: list[str],
                     overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Ask Slurm whether each stage kind's request could run (``sbatch --test-only``)."""
    out: dict[str, str] = {}
    if not shutil.which("sbatch"):
        return {k: "sbatch not on the PATH" for k in kinds}
    for kind in kinds:
        res = resources.for_kind(kind, overrides)
        args = ["sbatch", "--test-only", f"--time={int(res.get('timeout_min', 60))}",
                f"--cpus-per-task={int(res.get('cpus_per_task', 1))}",
                f"--nodes={int(res.get('nodes', 1))}",
                f"--ntasks-per-node={int(res.get('tasks_per_node', 1))}"]
        if res.get("mem_gb"):
            args.append(f"--mem={int(res['mem_gb'])}G")
        gpu_type, gpus = parse_gpus(res.get("gpus_per_node"))
        if gpus:
            args.append(f"--gpus-per-node={gpu_type + ':' if gpu_type else ''}{gpus}")
        if res.get("mem_per_gpu"):
            mpg = res["mem_per_gpu"]
            args.append(f"--mem-per-gpu={mpg}G" if isinstance(mpg, int) else f"--mem-per-gpu={mpg}")
        if res.get("exclude"):
            ex = res["exclude"]
            args.append(f"--exclude={','.join(ex) if isinstance(ex, list) else ex}")
        for key in ("partition", "account", "qos", "constraint", "gres"):
            if res.get(key):
                args.append(f"--{key}={res[key]}")
        proc = subprocess.run([*args, "--wrap=true"], capture_output=True, text=True)
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        out[kind] = ("ok: " if proc.returncode == 0 else "refused: ") + (msg[-1] if msg else "")
    return out
