"""Preemption on the REAL one-node test cluster (slurm/start.sh): ``scancel --signal=USR2`` on a
running pretraining stage (the signal Slurm sends before a time limit or on preemption) makes
every rank write ``last.pt`` at the next step boundary, then submitit requeues the job and it
resumes right after that step, ending with the same weights and log as an uninterrupted run.

Without Slurm: two local gloo ranks (the variables torchrun sets) agree on a stop request that
only one of them received, and a rank whose peer stops answering errors after the process-group
timeout instead of hanging. The two-node versions are in tests/test_multinode.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import free_port
from _slurm_stages import (
    accounting_history,
    assert_same_weights,
    log_without_timing,
    logged_steps,
    pretrain_config,
    require_cluster,
    result_with,
    stderr_text,
    steps_around_stop,
    submit_stage,
    using_cluster,
    wait_for_step,
)

from lxmert_bench.data.root import ensure_data_root
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import DIST_TIMEOUT_ENV, dist_timeout_s, load_checkpoint

STEPS = 400  # ~15 s of the test model on one core


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "syn"
    ensure_data_root(pretrain_config(root, STEPS).data)  # once here, not racing in two jobs
    return root


@pytest.fixture
def one_node():
    require_cluster(None, 1, "bash slurm/start.sh", "LXMERT_BENCH_REQUIRE_SLURM")
    with using_cluster(None):
        yield


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_writes_a_checkpoint_then_requeues_and_resumes_after_it(one_node, tmp_path, data_root):
    cfg = pretrain_config(data_root, STEPS)  # checkpoint_every 1000: only the stop writes mid-epoch
    ref_job, ref = submit_stage(None, tmp_path / "ref", cfg)  # uninterrupted, on the other CPU
    job, cut = submit_stage(None, tmp_path / "cut", cfg)
    signalled_at = wait_for_step(job, cut, 60)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    assert result_with(None, job)["stage_id"] == cfg.stage_id
    assert result_with(None, ref_job)["stage_id"] == cfg.stage_id
    text = stderr_text(job)
    stop_step, first_after = steps_around_stop(text)
    assert signalled_at <= stop_step < STEPS
    assert first_after == stop_step + 1, text[-3000:]  # nothing redone, nothing skipped
    assert "stop requested (SIGUSR2)" in text
    # one job id, two runs: submitit requeued it (REQUEUED), the second run completed
    assert accounting_history(job.job_id) == ["REQUEUED", "COMPLETED"]
    assert logged_steps(cut) == list(range(1, STEPS + 1))
    assert log_without_timing(cut) == log_without_timing(ref)
    assert_same_weights(cut, ref)
    assert cut.read_result()["steps"] == STEPS


# ---------------------------------------------------------------------------------------------
# Two local gloo ranks (no Slurm)
# ---------------------------------------------------------------------------------------------
RANK_MAIN = """
import signal, sys
import torch
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import StopRequested, request_stop
from lxmert_bench.train.stages import run_stage
torch.set_num_threads(1)
signal.signal(signal.SIGUSR2, request_stop)  # what StageJob does in a submitit Slurm job
try:
    run_stage(RunDir(sys.argv[1], sys.argv[2]))
except StopRequested as stop:
    print(f"StopRequested at {stop.step}", file=sys.stderr)
    sys.exit(3)
"""


def _start_ranks(run: RunDir, tmp_path: Path, timeout_s: float | None = None) -> list[subprocess.Popen]:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    if timeout_s is not None:
        env[DIST_TIMEOUT_ENV] = str(timeout_s)
    return [subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(run.workdir), run.stage_id],
                             env={**env, "RANK": str(r)}, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / f"rank{r}.err", "w"))
            for r in range(2)]


def test_ddp_ranks_agree_on_a_stop_request_only_one_received(tmp_path, data_root):
    cfg = pretrain_config(data_root, STEPS)
    run = RunDir(tmp_path / "wd", cfg.stage_id)
    run.write_config(cfg)
    ranks = _start_ranks(run, tmp_path)
    try:
        deadline = time.time() + 120
        while not (logged_steps(run) and logged_steps(run)[-1] >= 25) and time.time() < deadline:
            time.sleep(0.1)
        signalled_at = logged_steps(run)[-1]
        ranks[1].send_signal(signal.SIGUSR2)  # rank 1 only: rank 0 learns it at the agreement
        codes = [p.wait(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [3, 3], errs
    stops = [int(e.rsplit("StopRequested at ", 1)[1].split()[0]) for e in errs]
    # the same step on both ranks: the first multiple of stop_check_every (10) after the signal
    assert stops[0] == stops[1] and stops[0] % 10 == 0, stops
    assert signalled_at <= stops[0] <= signalled_at + 10, (signalled_at, stops)
    assert f"stop requested (another rank): last.pt written at step {stops[0]}" in errs[0]
    ckpt = load_checkpoint(run.checkpoint_dir / "last.pt")
    assert ckpt["state"]["global_step"] == stops[0] and len(ckpt["rng"]) == 2
    assert not run.result_path.exists() and not run.is_failed()  # neither done nor failed


def test_a_peer_that_stops_answering_ends_in_an_error_not_a_hang(tmp_path, data_root):
    cfg = pretrain_config(data_root, STEPS)
    run = RunDir(tmp_path / "wd", cfg.stage_id)
    run.write_config(cfg)
    ranks = _start_ranks(run, tmp_path, timeout_s=5)
    try:
        deadline = time.time() + 120
        while not (logged_steps(run) and logged_steps(run)[-1] >= 5) and time.time() < deadline:
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)  # alive but silent, like a node cut off
        stopped = time.time()
        code = ranks[0].wait(timeout=90)  # without the timeout: torch's 30 minutes
        waited = time.time() - stopped
    finally:
        for p in ranks:
            p.kill()
    err = (tmp_path / "rank0.err").read_text()
    assert code != 0 and 4 < waited < 60, (code, waited, err[-2000:])
    # gloo: "Application timeout caused pair closure" (or "Timed out waiting ...")
    assert "timeout 5 s" in err and "time" in err.strip().splitlines()[-1].lower(), err[-2000:]
    assert run.read_error()["type"] in ("RuntimeError", "DistBackendError")


def test_dist_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert dist_timeout_s() == 1800.0
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "42.5")
    assert dist_timeout_s() == 42.5
    for bad in ("ten", "0", "-3"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"LXMERT_BENCH_DIST_TIMEOUT_S={bad!r}"):
            dist_timeout_s()


LATE_SIGNAL_MAIN = """
import os, signal, sys
os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # as in a submitit Slurm job, whose handler is set
import submitit
from submitit.core.job_environment import SignalHandler
from lxmert_bench.launch import StageJob
env = submitit.JobEnvironment()
signal.signal(env._usr_sig(), SignalHandler(env, None, None).checkpoint_and_try_requeue)
out = StageJob(sys.argv[1], sys.argv[2], threads=1)()
print("ignored", signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)
import gc
print("frozen", gc.get_freeze_count() > 0)
os.kill(os.getpid(), signal.SIGUSR2)  # while submitit would be saving the result, or exiting
print("alive", out["stage_id"])
"""


def test_a_usr2_after_the_stage_is_done_is_ignored(tmp_path, data_root):
    """A job whose USR2 came just after training ended died of the signal while Python exited
    (which resets handlers to the default action, except SIG_IGN): Slurm said FAILED although
    result.json was written, and the fine-tunings waiting on it never started."""
    cfg = pretrain_config(data_root, 4)
    run = RunDir(tmp_path / "wd", cfg.stage_id)
    run.write_config(cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    proc = subprocess.run([sys.executable, "-c", LATE_SIGNAL_MAIN, str(run.workdir), run.stage_id],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ignored True" in proc.stdout and f"alive {cfg.stage_id}" in proc.stdout
    assert run.read_result()["steps"] == 4
    # the job process exits next: its objects are left out of the interpreter's last collection
    assert "frozen True" in proc.stdout


def test_a_stage_run_in_the_launchers_own_process_leaves_its_garbage_collector_alone(
        tmp_path, data_root, monkeypatch):
    """The debug executor runs stages in the launcher's process, which goes on: freezing its
    objects there would keep every cycle they form from being collected."""
    import gc

    from lxmert_bench.launch import StageJob

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    cfg = pretrain_config(data_root, 2)
    run = RunDir(tmp_path / "wd", cfg.stage_id)
    run.write_config(cfg)
    before = gc.get_freeze_count()
    assert StageJob(str(run.workdir), run.stage_id, threads=1)()["stage_id"] == cfg.stage_id
    assert gc.get_freeze_count() == before
