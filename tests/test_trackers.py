"""Optional trackers: run.tensorboard writes TensorBoard event files per stage with the same
numbers as log.jsonl (read back with tensorboard's own reader); run.wandb without wandb installed
says so and trains on; both are provenance, so a stage's id does not change with them."""

from __future__ import annotations

import json
import math

import pytest
from _helpers import synthetic_data

from lxmert_bench.config import DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.model import LxmertConfig
from lxmert_bench.store import RunDir
from lxmert_bench.train.stages import run_stage
from lxmert_bench.train.trackers import TENSORBOARD_DIR, scalars

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory, image_limit=6)


def _config(data: DataConfig, **run) -> RunConfig:
    return RunConfig(kind="pretrain", seed=0, model=LxmertConfig.preset("test"), data=data,
                     pretrain=PretrainConfig(optim=OptimConfig(batch_size=16, epochs=1,
                                                               max_steps=3)),
                     log_every=1, checkpoint_every=100, device="cpu", **run)


def _run(tmp_path, cfg: RunConfig) -> tuple[RunDir, list[dict]]:
    rd = RunDir(tmp_path, cfg.stage_id)
    rd.write_config(cfg)
    run_stage(rd)
    return rd, [json.loads(line) for line in rd.log_path.read_text().splitlines()]


def test_trackers_are_provenance(data):
    plain = _config(data)
    assert _config(data, tensorboard=True, wandb=True).stage_id == plain.stage_id


def test_scalars_of_log_records():
    step = {"step": 3, "epoch": 1, "loss": 2.5, "lr": 1e-4, "losses": {"mlm": 1.5, "qa": 1.0}}
    assert dict(scalars(step)) == {"train/loss": 2.5, "train/lr": 1e-4, "train/loss/mlm": 1.5,
                                   "train/loss/qa": 1.0}
    valid = {"step": 3, "epoch": 1, "split": "minival", "metrics": {"accuracy": 51.0, "ok": True}}
    assert dict(scalars(valid)) == {"minival/accuracy": 51.0}


def test_tensorboard_event_files_hold_the_logged_numbers(tmp_path, data):
    pytest.importorskip("tensorboard", reason="run.tensorboard needs the optional tensorboard "
                        "package (pip install 'lxmert-bench[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd, log = _run(tmp_path, _config(data, tensorboard=True))
    events = list((rd.path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run directory"
    acc = EventAccumulator(str(rd.path / TENSORBOARD_DIR))
    acc.Reload()
    steps = [r for r in log if "losses" in r]
    got = {e.step: e.value for e in acc.Scalars("train/loss")}  # float32 in the event file
    assert got == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in steps} and got
    evals = [r for r in log if "split" in r]
    split = evals[-1]["split"]
    matched = acc.Scalars(f"{split}/matched_accuracy")
    assert math.isclose(matched[-1].value, evals[-1]["metrics"]["matched_accuracy"], rel_tol=1e-6)


def test_no_tracker_no_event_files(tmp_path, data):
    rd, _log = _run(tmp_path, _config(data))
    assert not (rd.path / TENSORBOARD_DIR).exists()


def test_wandb_missing_says_so_and_trains(tmp_path, data, capfd):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here: the missing-package path cannot be checked")
    rd, log = _run(tmp_path, _config(data, wandb=True))
    assert "run.wandb is set but wandb is not installed" in capfd.readouterr().err
    assert rd.is_done() and any("losses" in r for r in log)
