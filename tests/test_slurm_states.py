"""Slurm's answers -> stage states, without a cluster: sacct/squeue record parsing, scancel id
compression, and every Slurm end state through ``launch._state`` (pure functions; the same paths on
the real test cluster are in tests/test_harness_slurm.py)."""

from __future__ import annotations

import pytest

from lxmert_bench.launch import (
    _state,
    compress_job_ids,
    expand_hostlist,
    expand_job_record,
    never_starts,
)
from lxmert_bench.store import FAILED, INTERRUPTED, QUEUED, RUNNING, RunDir


@pytest.mark.parametrize("record, ids", [
    ("37", ["37"]),
    ("37_4", ["37_4"]),
    ("37_[0-1%2]", ["37_0", "37_1"]),
    ("37_[0-3,7]", ["37_0", "37_1", "37_2", "37_3", "37_7"]),
    ("37_[5,9-10%4]", ["37_5", "37_9", "37_10"]),
    ("37_[0-6:3]", ["37_0", "37_3", "37_6"]),
    ("37_[12]", ["37_12"]),
    ("37_[a-b]", ["37_[a-b]"]),  # unknown form: kept whole, never a crash of status
])
def test_array_records_expand_to_their_elements(record, ids):
    assert expand_job_record(record) == ids


def test_scancel_ids_one_expression_per_array():
    ids = [f"40_{i}" for i in range(1000)] + ["41_3", "41_1", "41_2", "41_7", "55"]
    assert compress_job_ids(ids) == ["55", "40_[0-999]", "41_[1-3,7]"]
    # and back: every element is named exactly once
    assert sorted(expand_job_record("41_[1-3,7]")) == ["41_1", "41_2", "41_3", "41_7"]


ENDS = [
    ("NODE_FAIL", INTERRUPTED), ("PREEMPTED", INTERRUPTED), ("BOOT_FAIL", INTERRUPTED),
    ("TIMEOUT", INTERRUPTED), ("CANCELLED", INTERRUPTED), ("DEADLINE", INTERRUPTED),
    ("OUT_OF_MEMORY", FAILED), ("FAILED", FAILED), ("COMPLETED", FAILED),
    ("PENDING", QUEUED), ("REQUEUED", QUEUED), ("RUNNING", RUNNING), ("COMPLETING", RUNNING),
]


@pytest.mark.parametrize("slurm, ours", ENDS)
def test_every_slurm_state_maps_explicitly(tmp_path, slurm, ours):
    run = RunDir(tmp_path, "pretrain/abc")
    run.path.mkdir(parents=True)
    rec = {"executor": "slurm", "job_id": "37_0"}
    state, reason = _state(run, rec, {"37_0": (slurm, "")})
    assert state == ours
    if ours in (FAILED, INTERRUPTED):
        assert slurm in reason and "37_0" in reason  # status says which it was


def test_not_found_is_interrupted_never_queued(tmp_path):
    run = RunDir(tmp_path, "pretrain/abc")
    run.path.mkdir(parents=True)
    state, reason = _state(run, {"executor": "slurm", "job_id": "37_0"}, {"99": ("RUNNING", "")})
    assert state == INTERRUPTED and "not found" in reason


def test_done_decides_even_when_slurm_says_failed(tmp_path):
    run = RunDir(tmp_path, "pretrain/abc")
    run.path.mkdir(parents=True)
    run.write_result({"stage_id": "pretrain/abc", "metrics": {}})
    assert _state(run, {"executor": "slurm", "job_id": "5"}, {"5": ("FAILED", "")})[0] == "done"


@pytest.mark.parametrize("reason, never", [
    ("DependencyNeverSatisfied", True), ("PartitionNodeLimit", True), ("PartitionTimeLimit", True),
    ("InvalidAccount", True), ("InvalidQOS", True), ("Dependency", False), ("Resources", False),
    ("Priority", False), ("None", False), ("", False),
])
def test_pending_reasons_that_never_start_are_flagged(tmp_path, reason, never):
    assert bool(never_starts(reason)) is never
    run = RunDir(tmp_path, "finetune/abc")
    run.path.mkdir(parents=True)
    state, text = _state(run, {"executor": "slurm", "job_id": "8_1"}, {"8_1": ("PENDING", reason)})
    assert state == QUEUED
    if reason and reason != "None":
        assert f"Slurm PENDING ({reason})" in text
    assert ("will never start" in text) is never


@pytest.mark.parametrize("text, nodes", [
    ("n[1-3,7],login", ["n1", "n2", "n3", "n7", "login"]),
    ("gpu[01-02]", ["gpu01", "gpu02"]),
    ("localhost", ["localhost"]),
    ("", []),
])
def test_hostlists_expand(text, nodes):
    assert expand_hostlist(text) == nodes


def test_req_node_not_avail_never_starts_only_for_nodes_the_cluster_lacks():
    reason = "ReqNodeNotAvail, UnavailableNodes:n[1-2]"
    assert never_starts(reason, {"n1", "n2", "n3"}) == ""  # down or drained: it may come back
    assert "n2" in never_starts(reason, {"n1", "n3"}) and "does not have" in never_starts(
        reason, {"n1", "n3"})
    assert never_starts(reason, None) == ""  # without sinfo: not claimed
