"""Preemption on the REAL one-node test cluster (slurm/start.sh): ``scancel --signal=USR2`` on a
running pretraining stage (the signal Slurm sends before a time limit or on preemption) makes
every rank write ``last.pt`` at the next step boundary, then submitit requeues the job and it
resumes right after that step, ending with the same weights and log as an uninterrupted run.

The two-node version is in tests/test_multinode.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
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

from lxmert_bench.train.stages import ensure_data

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 400  # ~15 s of the test model on one core


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "syn"
    ensure_data(pretrain_config(root, STEPS).data)  # once here, not racing in two jobs
    return root


@pytest.fixture
def one_node():
    require_cluster(None, 1, "bash slurm/start.sh", "LXMERT_BENCH_REQUIRE_SLURM")
    with using_cluster(None):
        yield


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
