"""Pretraining logs image-sentence matching as an accuracy (in %, 50 = chance) after every epoch,
not only as a loss (a loss stuck at 0.693 is chance, which a reader has to know); the stage's
result keeps it beside its metrics, which stay the losses (golden results are unchanged)."""

from __future__ import annotations

import json

import pytest
from _helpers import synthetic_data

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.model import LxmertConfig
from lxmert_bench.store import RunDir
from lxmert_bench.train.stages import run_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory, image_limit=6)


def _run(tmp_path, data: DataConfig, **kw) -> tuple[dict, list[dict]]:
    optim = OptimConfig(batch_size=32, epochs=2)  # 6 images: a few steps per epoch
    cfg = RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"), data=data,
                    pretrain=PretrainConfig(optim=optim, **kw), log_every=1,
                    checkpoint_every=100, device="cpu")
    rd = RunDir(tmp_path, cfg.stage_id)
    rd.write_config(cfg)
    result = run_stage(rd)
    return result, [json.loads(line) for line in rd.log_path.read_text().splitlines()]


def test_each_epoch_logs_the_matching_accuracy(tmp_path, data):
    result, log = _run(tmp_path, data)
    evals = [r for r in log if "split" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    for r in evals:
        acc = r["metrics"]["matched_accuracy"]
        assert 0.0 <= acc <= 100.0
        # an accuracy, not folded into the summed loss
        losses = [v for k, v in r["metrics"].items() if k not in ("loss", "matched_accuracy")]
        assert r["metrics"]["loss"] == pytest.approx(sum(losses))
    assert result["matched_accuracy"] == pytest.approx(evals[-1]["metrics"]["matched_accuracy"])
    assert "matched_accuracy" not in result["metrics"]


def test_no_matching_task_no_accuracy(tmp_path, data):
    result, log = _run(tmp_path, data, matched=False)
    assert all("matched_accuracy" not in r["metrics"] for r in log if "split" in r)
    assert result["matched_accuracy"] is None
