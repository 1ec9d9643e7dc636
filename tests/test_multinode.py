"""Multi-node DDP on the REAL two-node test cluster (``slurm/start.sh --nodes 2``: node lxmert-n1
on this machine, lxmert-n2 a slurmd in its own network namespace, one CPU each), through
submitit's Slurm executor and the harness's StageJob:

- a ``nodes: 2, tasks_per_node: 1`` pretraining stage: both ranks join (gloo) at the first node's
  address, not localhost; rank 0 alone writes; the weights equal the one-node two-rank run's
  (on the one-node cluster, ``slurm/start.sh``);
- ``scancel --signal=USR2``: both ranks write last.pt at a step boundary, the job is requeued and
  resumes on both nodes right after that step;
- a node that dies (every process on lxmert-n2 frozen with SIGSTOP, so nothing there answers or
  makes progress, then killed as by a reboot): Slurm marks it DOWN after SlurmdTimeout (15 s on
  the test cluster), requeues the job, and once the node is back it resumes from the last
  checkpoint.

Both clusters must be up; CI sets LXMERT_BENCH_REQUIRE_SLURM_2N=1 so these fail rather than skip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _slurm_stages import (
    TWO_NODE_CONF,
    accounting_history,
    assert_same_weights,
    log_without_timing,
    logged_steps,
    pretrain_config,
    require_cluster,
    result_with,
    run_slurm,
    stderr_text,
    steps_around_stop,
    submit_stage,
    using_cluster,
    wait_for_step,
)

from lxmert_bench.data.root import ensure_data_root

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
STEPS = 600  # long enough to stop (USR2, a dead node) in the middle
CHECKPOINT_EVERY = 25
TWO_NODE_BASE = Path(TWO_NODE_CONF).parents[1]
DIST_LINE = re.compile(r"\[distributed\] rank (\d)/2 \(local 0\) on (\S+): gloo, "
                       r"MASTER_ADDR=(\S+) \(([\d.]+)\):(\d+)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "syn"
    ensure_data_root(pretrain_config(root, STEPS).data)
    return root


@pytest.fixture(scope="module")
def clusters() -> None:
    require_cluster(TWO_NODE_CONF, 2, "bash slurm/start.sh --nodes 2", "LXMERT_BENCH_REQUIRE_SLURM_2N")
    require_cluster(None, 1, "bash slurm/start.sh", "LXMERT_BENCH_REQUIRE_SLURM_2N")


@pytest.fixture(scope="module")
def one_node_two_ranks(clusters, data_root, tmp_path_factory):
    """The reference: the same stage as two ranks on the one-node cluster (submitted now, runs
    while the first two-node test runs; result_with waits for it)."""
    cfg = pretrain_config(data_root, STEPS, CHECKPOINT_EVERY)
    job, run = submit_stage(None, tmp_path_factory.mktemp("one_node_two_ranks"), cfg,
                            nodes=1, tasks_per_node=2)
    return job, run


def _reference(one_node_two_ranks):
    job, run = one_node_two_ranks
    result_with(None, job)
    return run


def _dist_lines(text: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in DIST_LINE.finditer(text)]


def test_two_node_ddp_joins_at_the_first_node_and_equals_one_node_two_ranks(
        clusters, one_node_two_ranks, data_root, tmp_path):
    cfg = pretrain_config(data_root, STEPS, CHECKPOINT_EVERY)
    t0 = time.time()
    job, run = submit_stage(TWO_NODE_CONF, tmp_path, cfg, nodes=2, tasks_per_node=1)
    result = result_with(TWO_NODE_CONF, job)
    print(f"two-node run of {STEPS} steps: {time.time() - t0:.1f} s")
    assert result["stage_id"] == cfg.stage_id
    (r0, host0, addr0, ip0, port0), = _dist_lines(stderr_text(job, 0))
    (r1, host1, addr1, ip1, port1), = _dist_lines(stderr_text(job, 1))
    assert (r0, host0, r1, host1) == ("0", "lxmert-n1", "1", "lxmert-n2")
    # both ranks rendezvous at the first node's name and link address, never localhost
    assert addr0 == addr1 == "lxmert-n1" and ip0 == ip1 == "198.18.0.1" and port0 == port1
    with using_cluster(TWO_NODE_CONF):
        nodes = run_slurm("sacct", "-n", "-P", "-X", "-o", "NodeList,AllocNodes",
                          "-j", job.job_id).stdout.split()
    assert nodes == ["lxmert-n[1-2]|2"], nodes
    # rank 0 alone writes: one log line per step (two writers would double them), and only
    # rank 0 reports progress
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert "] step " in stderr_text(job, 0) and "] step " not in stderr_text(job, 1)
    assert run.read_result()["world_size"] == 2
    ref = _reference(one_node_two_ranks)
    assert ref.read_result()["world_size"] == 2
    assert log_without_timing(run) == log_without_timing(ref)
    assert_same_weights(run, ref)


def test_two_node_usr2_checkpoints_both_ranks_and_resumes_on_both_nodes(
        clusters, one_node_two_ranks, data_root, tmp_path):
    cfg = pretrain_config(data_root, STEPS, CHECKPOINT_EVERY)
    t0 = time.time()
    with using_cluster(TWO_NODE_CONF):
        job, run = submit_stage(TWO_NODE_CONF, tmp_path, cfg, nodes=2, tasks_per_node=1)
        signalled_at = wait_for_step(job, run, 42)
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        result_with(TWO_NODE_CONF, job)
        history = accounting_history(job.job_id)
    print(f"two-node run with a USR2 requeue: {time.time() - t0:.1f} s")
    text0, text1 = stderr_text(job, 0), stderr_text(job, 1)
    stop_step, first_after = steps_around_stop(text0)
    # the ranks agree every stop_check_every (10) steps: at most 10 steps later
    assert signalled_at <= stop_step <= signalled_at + 10 and stop_step % 10 == 0
    assert first_after == stop_step + 1, text0[-3000:]
    assert history == ["REQUEUED", "COMPLETED"], history
    # two runs, each with both ranks on their nodes
    assert [h for _, h, *_ in _dist_lines(text0)] == ["lxmert-n1", "lxmert-n1"]
    assert [h for _, h, *_ in _dist_lines(text1)] == ["lxmert-n2", "lxmert-n2"]
    assert logged_steps(run) == list(range(1, STEPS + 1))
    ref = _reference(one_node_two_ranks)
    assert log_without_timing(run) == log_without_timing(ref)
    assert_same_weights(run, ref)


def _node2_pids() -> list[int]:
    """Every process of node lxmert-n2: its slurmd, slurmstepd and rank-1 task all live in the
    node's network namespace."""
    out = subprocess.run(["ip", "netns", "pids", "lxmert-n2"], capture_output=True, text=True,
                         check=True).stdout
    pids = [int(p) for p in out.split()]
    slurmd = int((TWO_NODE_BASE / "run" / "slurmd-lxmert-n2.pid").read_text().strip())
    assert slurmd in pids, (slurmd, pids)
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_dead_node_requeues_the_job_which_resumes_from_the_last_checkpoint(
        clusters, one_node_two_ranks, data_root, tmp_path):
    cfg = pretrain_config(data_root, STEPS, CHECKPOINT_EVERY)
    t0 = time.time()
    with using_cluster(TWO_NODE_CONF):
        job, run = submit_stage(TWO_NODE_CONF, tmp_path, cfg, nodes=2, tasks_per_node=1)
        killed_at = wait_for_step(job, run, 60)
        # the node dies: nothing on it answers or runs on (killing only slurmd left the ranks
        # running, and a fast machine finished the job before Slurm noticed the node)
        frozen = _node2_pids()
        _signal_all(frozen, signal.SIGSTOP)
        killed = time.time()
        try:
            # Slurm notices within SlurmdTimeout (15 s), ends the job's run with NODE_FAIL and
            # requeues it; the 2-node job then waits for the node to come back
            deadline, state = time.time() + 90, ""
            while time.time() < deadline:
                state = run_slurm("scontrol", "show", "node", "lxmert-n2").stdout
                if "State=DOWN" in state:
                    break
                time.sleep(1)
            assert "State=DOWN" in state, state
            detected = time.time() - killed
        finally:  # the node reboots: its processes are gone, start.sh restarts its slurmd only
            _signal_all(frozen, signal.SIGKILL)
            _signal_all(frozen, signal.SIGCONT)
            up = subprocess.run(["bash", str(REPO / "slurm" / "start.sh"), "--nodes", "2"],
                                capture_output=True, text=True, timeout=120)
            assert up.returncode == 0, up.stdout + up.stderr
        # not job.result(): submitit takes the NODE_FAIL record for the end (the requeued run is
        # another record under the same id); the accounting shows when the requeued run is done
        history = accounting_history(job.job_id, timeout=300)
    print(f"dead node: DOWN {detected:.1f} s after it froze; run with the requeue "
          f"{time.time() - t0:.1f} s")
    assert history[0] == "NODE_FAIL" and history[-1] == "COMPLETED", history
    text0 = stderr_text(job, 0)
    second_run = [m.end() for m in re.finditer(r"\[distributed\] rank 0/2", text0)]
    assert len(second_run) >= 2, text0[-3000:]
    first_after = int(re.search(r"\] step (\d+)/", text0[second_run[-1]:]).group(1))
    # resumed from a checkpoint (epoch ends: every 10 steps here), not from the start
    assert first_after > killed_at - 10 and (first_after - 1) % 5 == 0, (killed_at, first_after)
    assert logged_steps(run) == list(range(1, STEPS + 1))
    ref = _reference(one_node_two_ranks)
    assert log_without_timing(run) == log_without_timing(ref)
    assert_same_weights(run, ref)
