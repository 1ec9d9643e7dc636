"""plan's GPU-hour estimate (issue 13): pretraining from the measured samples/s per GPU in the
slurm profile's throughput table, with the GPU type named; not measured -> no estimate."""

from __future__ import annotations

import pytest

from lxmert_bench.config import PretrainConfig, RunConfig
from lxmert_bench.launch import ResourceError, load_resource_profile
from lxmert_bench.plan import estimate_gpu_hours, throughput_problems

PAPER_PRETRAIN = RunConfig(kind="pretrain", pretrain=PretrainConfig())  # 20 epochs, base model


def test_pretraining_hours_come_from_the_measured_samples_per_second():
    table = load_resource_profile("default").throughput
    assert table["gpu"] and table["samples_per_s"]["pretrain"] == 1369
    # 20 epochs x 9.18M pairs at 1369 samples/s: the ~37 H100-hours issue 13 quotes
    assert estimate_gpu_hours(PAPER_PRETRAIN, table) == pytest.approx(37.25, abs=0.01)
    twice = {**table, "samples_per_s": {"pretrain": 2 * 1369}}
    assert estimate_gpu_hours(PAPER_PRETRAIN, twice) == pytest.approx(37.25 / 2, abs=0.01)
    assert estimate_gpu_hours(PAPER_PRETRAIN, {}) is None  # not measured: no guess
    assert estimate_gpu_hours(PAPER_PRETRAIN, {"gpu": "A100", "samples_per_s": {"pretrain": None}}) is None


def test_a_bad_throughput_table_is_refused_naming_the_key(tmp_path):
    assert throughput_problems({"gpu": "H100", "samples_per_s": {"pretrain": 1369}}) == []
    assert "throughput.samples_per_s.pretrain" in throughput_problems(
        {"gpu": "H100", "samples_per_s": {"pretrain": "fast"}})[0]
    assert "throughput.gpu" in throughput_problems({"samples_per_s": {"pretrain": 10}})[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nthroughput:\n  gpu: H100\n  samples_per_s: {pretrian: 5}\n")
    with pytest.raises(ResourceError, match=r"bad.yaml: throughput.samples_per_s.pretrian: unknown"):
        load_resource_profile(str(bad))
