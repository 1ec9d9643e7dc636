"""The one-node test cluster (slurm/start.sh) through submitit's REAL Slurm executor.

Nothing is mocked: jobs go through sbatch, run under slurmd, and their states come from sacct
(slurmdbd + MariaDB). When the cluster is not up these tests FAIL with the command that starts it;
they skip only where no Slurm client is installed at all and LXMERT_BENCH_REQUIRE_SLURM is not 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import submitit
import yaml
from submitit.core.utils import UncompletedJobError

from lxmert_bench.launch import load_resource_profile, submitit_parameters

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "slurm" / "profiles"
STAGE_KINDS = ("bert", "pretrain", "finetune")
RESOURCE_KEYS = {"gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "partition", "account",
                 "qos", "constraint", "nodes", "tasks_per_node"}

# The jobs run this module's functions in a fresh interpreter where tests/ is not importable:
# ship them by value rather than by module name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
# Is the cluster up?
# ---------------------------------------------------------------------------------------------
def _run(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _cluster_problem() -> str | None:
    """Why the test cluster cannot take jobs, or None when it can."""
    if not shutil.which("sbatch"):
        return "no Slurm client ('sbatch') on the PATH"
    try:
        sinfo = _run("sinfo", "-h", "-o", "%T")
        if sinfo.returncode != 0:
            return f"sinfo failed: {sinfo.stderr.strip()}"
        state = sinfo.stdout.strip().splitlines()[0] if sinfo.stdout.strip() else "(no node)"
        if state not in ("idle", "mixed", "allocated", "completing"):
            return f"node state is {state!r}"
        # submitit reads every job state with sacct: accounting must answer too
        sacct = _run("sacct", "-n", "-X", "-j", "1")
        if sacct.returncode != 0:
            return f"sacct failed (slurmdbd down?): {sacct.stderr.strip()}"
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} did not answer within {e.timeout} s"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    message = (f"Slurm test cluster not usable: {problem}. Install and start it with: "
               "bash slurm/install.sh && bash slurm/start.sh")
    if os.environ.get("LXMERT_BENCH_REQUIRE_SLURM") == "1" or shutil.which("sbatch"):
        pytest.fail(message)
    pytest.skip(message)


def _executor(folder: Path, max_num_timeout: int = 3, **params: Any) -> submitit.AutoExecutor:
    """A real Slurm executor with the local profile's fine-tuning resources (+ overrides)."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=max_num_timeout)
    resources = load_resource_profile(str(PROFILES / "local.yaml")).for_kind("finetune")
    executor.update_parameters(**{**submitit_parameters(resources, "slurm"), "timeout_min": 5,
                                  **params})
    return executor


def _wait_state(job: submitit.Job, wanted: tuple[str, ...], timeout: float = 60) -> str:
    """Poll sacct (bypassing submitit's cache) until the job's state starts with one of `wanted`."""
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = job.get_info(mode="force").get("State", "")
        if state.startswith(wanted):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job.job_id}: state {state!r} after {timeout} s, wanted {wanted}\n"
                         f"stderr: {job.stderr()}")


# ---------------------------------------------------------------------------------------------
# Job bodies (run on the node)
# ---------------------------------------------------------------------------------------------
def _add(a: int, b: int) -> tuple[int, str]:
    return a + b, os.environ["SLURM_JOB_ID"]


def _square(x: int) -> tuple[int, str]:
    return x * x, os.environ["SLURM_ARRAY_TASK_ID"]


def _timed_sleep(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


class _SleepOnce(submitit.helpers.Checkpointable):
    """Sleeps past its time limit on the first run; submitit's USR2 handler pickles this object
    (runs=1) and requeues it, and the second run returns at once."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self) -> tuple[int, str]:
        self.runs += 1
        if self.runs == 1:
            time.sleep(600)
        return self.runs, os.environ.get("SLURM_RESTART_COUNT", "0")


# ---------------------------------------------------------------------------------------------
# Resource profiles (no cluster needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["local", "default"])
def test_profiles_have_every_resource_key_per_stage_kind(name):
    raw = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    profile = load_resource_profile(name)  # the harness's own loader accepts it
    assert profile.path == str(PROFILES / f"{name}.yaml")
    assert isinstance(raw["array_parallelism"], int) and raw["array_parallelism"] > 0
    assert isinstance(raw["max_array_size"], int) and 0 < raw["max_array_size"] <= 1000
    for kind in STAGE_KINDS:
        res = profile.for_kind(kind)
        assert RESOURCE_KEYS <= set(res), f"{name}.{kind} lacks {RESOURCE_KEYS - set(res)}"
        assert res["timeout_min"] > 0 and res["mem_gb"] > 0 and res["cpus_per_task"] >= 1


def test_local_profile_fits_the_test_cluster_and_default_the_paper():
    local, default = load_resource_profile("local"), load_resource_profile("default")
    for kind in STAGE_KINDS:
        assert local.for_kind(kind)["gpus_per_node"] == 0
        assert local.for_kind(kind)["partition"] == "debug"
        assert local.for_kind(kind)["timeout_min"] <= 60
    pre, fin = default.for_kind("pretrain"), default.for_kind("finetune")
    # paper: pretraining on 4 GPUs for ~10 days, so long jobs requeued from checkpoints
    assert pre["gpus_per_node"] == 4 and pre["tasks_per_node"] == 4
    # submitit requeues a checkpointable job up to 3 times on timeout by default
    assert pre["timeout_min"] * (1 + 3) >= 10 * 24 * 60 and pre["signal_delay_s"] >= 60
    assert fin["gpus_per_node"] == 1 and fin["timeout_min"] < pre["timeout_min"]


# ---------------------------------------------------------------------------------------------
# The real cluster
# ---------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_cluster_configuration(cluster):
    config = _run("scontrol", "show", "config").stdout
    settings = dict(line.split("=", 1) for line in config.splitlines() if " = " in line)
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    assert settings["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert settings["SelectType"] == "select/cons_tres"
    assert int(settings["MaxArraySize"]) > load_resource_profile("local").max_array_size
    node = _run("scontrol", "show", "node", "localhost").stdout
    assert f"CPUTot={len(os.sched_getaffinity(0))}" in node, node  # CPUs=$(nproc)
    mem_total_mb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024
    real_mb = int(node.split("RealMemory=")[1].split()[0])
    assert 0.85 * mem_total_mb <= real_mb <= 0.95 * mem_total_mb  # ~90% of MemTotal
    assert "debug" in _run("sinfo", "-h", "-o", "%P").stdout


@pytest.mark.slurm
def test_trivial_job_completes_with_its_result(cluster, tmp_path):
    job = _executor(tmp_path).submit(_add, 2, 3)
    assert job.result() == (5, job.job_id)  # computed under Slurm, in this very job
    assert _wait_state(job, ("COMPLETED",), timeout=30) == "COMPLETED"


@pytest.mark.slurm
def test_batch_submits_one_array_of_three(cluster, tmp_path):
    executor = _executor(tmp_path)
    with executor.batch():
        jobs = [executor.submit(_square, i) for i in range(3)]
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]
    assert [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]
    assert [job.result() for job in jobs] == [(0, "0"), (1, "1"), (4, "2")]
    for job in jobs:
        assert _wait_state(job, ("COMPLETED",), timeout=30) == "COMPLETED"


@pytest.mark.slurm
def test_afterok_dependency_runs_second_job_after_the_first(cluster, tmp_path):
    first = _executor(tmp_path / "first").submit(_timed_sleep, 3)
    second = _executor(tmp_path / "second", slurm_additional_parameters={
        "dependency": f"afterok:{first.job_id}"}).submit(_timed_sleep, 0)
    # the first sleeps 3 s, so right now the second must still wait for it
    queued = _run("squeue", "-h", "-j", second.job_id, "-o", "%T %r").stdout.split()
    assert queued == ["PENDING", "Dependency"], queued
    (_, first_end), (second_start, _) = first.result(), second.result()
    assert second_start >= first_end
    assert _wait_state(second, ("COMPLETED",), timeout=30) == "COMPLETED"


@pytest.mark.slurm
def test_cancelled_job_reports_cancelled(cluster, tmp_path):
    job = _executor(tmp_path).submit(time.sleep, 300)
    _wait_state(job, ("RUNNING",))
    job.cancel(check=True)
    assert _wait_state(job, ("CANCELLED",), timeout=30).startswith("CANCELLED")
    sacct = _run("sacct", "-n", "-P", "-X", "-o", "State", "-j", job.job_id).stdout
    assert sacct.startswith("CANCELLED"), sacct
    job._results_timeout_s = 1  # no result file will ever come: do not wait submitit's 15 s for it
    with pytest.raises(UncompletedJobError, match="has not produced any output"):
        job.result()


@pytest.mark.slurm
@pytest.mark.slow
def test_checkpointable_job_is_requeued_on_timeout_and_completes(cluster, tmp_path):
    # USR2 comes signal_delay_s before the 1-minute limit (or up to ~30 s earlier); the requeued
    # job may start again after cred_expire=10 s (slurm.conf), so this takes about a minute.
    executor = _executor(tmp_path, timeout_min=1, slurm_signal_delay_s=15, max_num_timeout=2)
    job = executor.submit(_SleepOnce())
    runs, restart_count = job.result()
    assert (runs, restart_count) == (2, "1")
    # the result file comes before slurmdbd records the end: poll the accounting for a while
    for _ in range(30):
        history = _run("sacct", "-n", "-P", "-D", "-X", "-o", "State", "-j", job.job_id).stdout.split()
        if history[-1:] != ["RUNNING"] and history[-1:] != ["COMPLETING"]:
            break
        time.sleep(1)
    assert history == ["REQUEUED", "COMPLETED"], history
