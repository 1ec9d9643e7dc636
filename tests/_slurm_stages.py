"""Helpers of the preemption and multi-node tests: one pretraining stage run as the harness runs it
(``launch.StageJob`` through submitit's real Slurm executor) on the one-node test cluster
(``slurm/start.sh``) or the two-node one (``slurm/start.sh --nodes 2``), and what its logs say.

Not a test module (no ``test_`` prefix): imported by tests/test_preemption.py and
tests/test_multinode.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit
import torch

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.launch import StageJob
from lxmert_bench.model import LxmertConfig
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import DIST_TIMEOUT_ENV

TWO_NODE_CONF = os.environ.get(
    "LXMERT_SLURM_CONF_2N",
    str(Path(os.environ.get("LXMERT_SLURM_BASE_2N", "/tmp/lxmert-slurm-2n")) / "etc" / "slurm.conf"))
USABLE = ("idle", "mixed", "allocated", "completing")


@contextlib.contextmanager
def using_cluster(conf: str | None) -> Iterator[None]:
    """Slurm clients started meanwhile (sbatch, sacct, submitit's, the job's) use that cluster:
    SLURM_CONF=conf, or for None the default /etc/slurm/slurm.conf (the one-node cluster)."""
    old = os.environ.get("SLURM_CONF")
    if conf:
        os.environ["SLURM_CONF"] = conf
    else:
        os.environ.pop("SLURM_CONF", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def run_slurm(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def cluster_problem(conf: str | None, nodes: int) -> str | None:
    """Why that cluster cannot run a `nodes`-node job now, or None when it can."""
    if not shutil.which("sbatch"):
        return "no Slurm client ('sbatch') on the PATH"
    if conf and not Path(conf).is_file():
        return f"{conf} does not exist"
    with using_cluster(conf):
        return _cluster_problem(nodes)


def _cluster_problem(nodes: int) -> str | None:
    try:
        sinfo = run_slurm("sinfo", "-h", "-N", "-o", "%N %T")
        if sinfo.returncode != 0:
            return f"sinfo failed: {sinfo.stderr.strip()}"
        states = dict(line.split() for line in sinfo.stdout.strip().splitlines() if line.strip())
        usable = [n for n, s in states.items() if s.rstrip("*") in USABLE and not s.endswith("*")]
        if len(usable) < nodes:
            return f"{len(usable)} usable node(s), {nodes} needed: {states}"
        sacct = run_slurm("sacct", "-n", "-X", "-j", "1")
        if sacct.returncode != 0:
            return f"sacct failed (slurmdbd down?): {sacct.stderr.strip()}"
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} did not answer within {e.timeout} s"
    return None


def require_cluster(conf: str | None, nodes: int, start: str, require_var: str) -> None:
    """Fail (when `require_var` is 1, as in CI) or skip when that cluster cannot take the job."""
    problem = cluster_problem(conf, nodes)
    if problem is None:
        return
    message = f"Slurm test cluster not usable: {problem}. Start it with: {start}"
    if os.environ.get(require_var) == "1":
        pytest.fail(message)
    pytest.skip(message)


def pretrain_config(data_root: Path, steps: int, checkpoint_every: int = 1000) -> RunConfig:
    """The test model's pretraining on the tiny synthetic benchmark, logging every step; batch 16
    splits evenly over 1 or 2 ranks. No dropout, so runs with different rank layouts agree."""
    model = LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = DataConfig(root=str(data_root), synthetic=True, synthetic_images=120, image_limit=6)
    return RunConfig(kind="pretrain", seed=3, model=model, data=data,
                     pretrain=PretrainConfig(optim=OptimConfig(batch_size=16, epochs=400,
                                                               max_steps=steps)),
                     log_every=1, checkpoint_every=checkpoint_every, device="cpu")


def submit_stage(conf: str | None, workdir: Path, cfg: RunConfig, nodes: int = 1,
                 tasks_per_node: int = 1, timeout_min: int = 10) -> tuple[submitit.Job, RunDir]:
    """Write the stage's run directory and submit it as the harness does (StageJob, 1 thread)."""
    run = RunDir(workdir, cfg.stage_id)
    run.write_config(cfg)
    executor = submitit.AutoExecutor(folder=workdir / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=1,
                               mem_gb=1, timeout_min=timeout_min, slurm_partition="debug",
                               name="lxmert-test-pretrain")
    # sbatch exports the environment: SLURM_CONF, and a process-group timeout so that a rank
    # whose peer is gone errors after a minute instead of waiting torch's 30
    old = os.environ.get(DIST_TIMEOUT_ENV)
    os.environ[DIST_TIMEOUT_ENV] = "60"
    try:
        with using_cluster(conf):
            job = executor.submit(StageJob(str(workdir), cfg.stage_id, threads=1))
    finally:
        if old is None:
            os.environ.pop(DIST_TIMEOUT_ENV, None)
        else:
            os.environ[DIST_TIMEOUT_ENV] = old
    return job, run


def wait_for_step(job: submitit.Job, run: RunDir, step: int, timeout: float = 240) -> int:
    """Wait until the stage's log.jsonl has reached `step`; returns the last logged step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = logged_steps(run)
        if steps and steps[-1] >= step:
            return steps[-1]
        state = run_slurm("sacct", "-n", "-P", "-X", "-o", "State", "-j", job.job_id).stdout
        if state.strip().startswith(("FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL")):
            raise AssertionError(f"job {job.job_id} ended ({state.strip()}) before step {step}:\n"
                                 f"{stderr_text(job)[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"job {job.job_id}: step {step} not reached in {timeout} s; logged "
                         f"{logged_steps(run)[-1:]}\n{stderr_text(job)[-3000:]}")


def result_with(conf: str | None, job: submitit.Job, timeout: float = 600) -> dict:
    """job.result(), polling that cluster's accounting (submitit's sacct calls)."""
    with using_cluster(conf):
        deadline = time.time() + timeout
        while not job.done(force_check=True):
            if time.time() > deadline:
                raise AssertionError(f"job {job.job_id} not done after {timeout} s:\n"
                                     f"{stderr_text(job)[-3000:]}")
            time.sleep(1)
        return job.results()[0]  # rank 0's (a multi-task job has one per task)


def logged_steps(run: RunDir) -> list[int]:
    if not run.log_path.is_file():
        return []
    steps = []
    for line in run.log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            steps.append(int(rec["step"]))
    return steps


def stderr_text(job: submitit.Job, rank: int = 0) -> str:
    path = Path(str(job.paths.stderr).replace("_0_log.err", f"_{rank}_log.err"))
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


STOP_LINE = re.compile(r"stop requested \((\w+)\): last\.pt written at step (\d+)")
STEP_LINE = re.compile(r"\] step (\d+)/\d+ epoch")


def steps_around_stop(text: str) -> tuple[int, int]:
    """(the step the stop checkpointed, the first step logged after it) from rank 0's stderr."""
    stops = list(STOP_LINE.finditer(text))
    assert len(stops) == 1, f"expected one stop line, found {len(stops)}:\n{text[-3000:]}"
    after = STEP_LINE.search(text, stops[0].end())
    assert after, f"no step logged after the stop:\n{text[-3000:]}"
    return int(stops[0].group(2)), int(after.group(1))


def accounting_history(job_id: str, final: str = "COMPLETED", timeout: float = 30) -> list[str]:
    """The job's states over its runs (sacct -D), once slurmdbd has recorded the `final` one (or
    after `timeout` seconds, or a FAILED/CANCELLED/TIMEOUT end)."""
    history: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = run_slurm("sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", job_id).stdout
        history = [s.split()[0] for s in out.split()]
        if history[-1:] == [final] or history[-1:] in (["FAILED"], ["CANCELLED"], ["TIMEOUT"]):
            break
        time.sleep(1)
    return history


def assert_same_weights(a: RunDir, b: RunDir) -> None:
    wa = torch.load(a.checkpoint_dir / "model.pt", weights_only=True)
    wb = torch.load(b.checkpoint_dir / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def log_without_timing(run: RunDir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "samples_per_s", "data_wait_s")}
            for line in run.log_path.read_text().splitlines()]
