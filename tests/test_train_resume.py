"""Exact resume: a stage killed with SIGKILL after its first checkpoint, then restarted, ends with the
same result, weights and log as an uninterrupted run (CPU, same thread count). Also DDP at the stage
level: two gloo processes under torchrun give the same weights as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _helpers import free_port, synthetic_data

from lxmert_bench.config import TASK_DEFAULTS, DataConfig, OptimConfig, PretrainConfig, RunConfig
from lxmert_bench.model import LxmertConfig
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import load_checkpoint
from lxmert_bench.train.stages import run_stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory, image_limit=6)


def stage_cmd(rd: RunDir) -> list[str]:
    return [sys.executable, "-m", "lxmert_bench.train.stages", str(rd.path)]


def prepare(workdir: Path, cfg: RunConfig) -> RunDir:
    rd = RunDir(workdir, cfg.stage_id)
    rd.write_config(cfg)
    return rd


def strip_timing(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in ("time", "samples_per_s", "data_wait_s")})
    return out


def same_result(a: dict, b: dict) -> None:
    for key in ("metrics", "last_metrics", "history", "best_epoch", "steps", "samples", "stage_id"):
        assert a.get(key) == b.get(key), key


def kill_after_first_checkpoint(rd: RunDir) -> int:
    proc = subprocess.Popen(stage_cmd(rd), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = rd.checkpoint_dir / "last.pt"
    deadline = time.time() + 120
    while not last.exists():
        assert proc.poll() is None, "the stage ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not rd.is_done()
    state = load_checkpoint(last)["state"]
    assert state["global_step"] > 0 and not state["done"]  # it really died mid-run
    return state["global_step"]


def pretrain_config(data: DataConfig) -> RunConfig:
    # two epochs (QA from the second), dropout on: the RNG states must be restored too
    return RunConfig(kind="pretrain", seed=1, model=LxmertConfig.preset("test"),
                     data=replace(data, image_limit=2),
                     pretrain=PretrainConfig(qa_start=0.5, optim=OptimConfig(batch_size=8, epochs=2)),
                     log_every=1, checkpoint_every=3, device="cpu")


def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path, data):
    """The killed run is a subprocess; the reference and the resumed run run here (one thread,
    like the subprocess), which also shows that a checkpoint moves between processes exactly."""
    torch.set_num_threads(1)
    cfg = pretrain_config(data)
    ref = prepare(tmp_path / "ref", cfg)
    a = run_stage(ref)
    cut = prepare(tmp_path / "cut", cfg)
    step = kill_after_first_checkpoint(cut)
    b = run_stage(cut)

    per_epoch = a["steps"] // 2
    assert per_epoch >= 4 and [h["epoch"] for h in a["history"]] == [1, 2]
    assert step < a["steps"]  # killed mid-run (normally right after the step-3 checkpoint)
    same_result(a, b)
    wa = torch.load(ref.checkpoint_dir / "model.pt", weights_only=True)
    wb = torch.load(cut.checkpoint_dir / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the log has every step once, as the uninterrupted run's
    log = strip_timing(cut.log_path)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, a["steps"] + 1))
    assert log == strip_timing(ref.log_path)


class Crash(RuntimeError):
    pass


def test_finetune_resumes_after_a_failure_with_best_epoch_and_predictions(tmp_path, data, monkeypatch):
    """In-process: a crash in epoch 2 (after epoch 1's best.pt and predictions) writes error.json;
    running the stage again resumes and ends exactly like an uninterrupted run."""
    import lxmert_bench.train.finetune as finetune

    torch.set_num_threads(1)
    ft = replace(TASK_DEFAULTS["vqa"], optim=OptimConfig(batch_size=16, epochs=3, lr=1e-3, warmup=0.1))
    cfg = RunConfig(kind="finetune", seed=1, model=LxmertConfig.preset("test"), data=data,
                    finetune=ft, log_every=1, checkpoint_every=2, device="cpu")
    ref = prepare(tmp_path / "ref", cfg)
    a = run_stage(ref)
    per_epoch = a["steps"] // 3
    assert per_epoch >= 2

    real_loss = finetune.task_loss
    calls = []

    def crashing_loss(*args, **kw):
        calls.append(1)
        if len(calls) == per_epoch + 2:
            raise Crash("injected")
        return real_loss(*args, **kw)

    cut = prepare(tmp_path / "cut", cfg)
    monkeypatch.setattr(finetune, "task_loss", crashing_loss)
    with pytest.raises(Crash):
        run_stage(cut)
    assert cut.read_error()["type"] == "Crash" and not cut.is_done()
    assert (cut.checkpoint_dir / "best.pt").is_file()
    monkeypatch.setattr(finetune, "task_loss", real_loss)
    b = run_stage(cut)
    assert not cut.error_path.exists()
    same_result(a, b)
    assert b["predictions"] == a["predictions"]
    wa = torch.load(ref.checkpoint_dir / "best.pt", weights_only=True)
    wb = torch.load(cut.checkpoint_dir / "best.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for f in ("dev_predict.json", "dev_scores.json"):
        assert (ref.predictions_dir / f).read_text() == (cut.predictions_dir / f).read_text()
    assert strip_timing(cut.log_path) == strip_timing(ref.log_path)


def test_ddp_two_gloo_processes_equal_one_process(tmp_path, data):
    """The real pretraining model with two gloo ranks (the environment torchrun sets): losses that
    are means over examples (matching; visual losses over all boxes) make the 2 x 8 sharded global
    batch equal to one batch of 16."""
    model = LxmertConfig.preset("test", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = RunConfig(kind="pretrain", seed=2, model=model, data=data,
                    pretrain=PretrainConfig(mask_lm=False, qa=False,
                                            optim=OptimConfig(batch_size=16, epochs=1, max_steps=4)),
                    log_every=1, checkpoint_every=2, device="cpu")
    one = prepare(tmp_path / "one", cfg)
    two = prepare(tmp_path / "two", cfg)
    port = str(free_port())
    ranks = [subprocess.Popen(stage_cmd(two), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    torch.set_num_threads(1)
    r1 = run_stage(one)
    for p in ranks:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    r2 = two.read_result()
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r1["steps"] == r2["steps"] == 4 and r1["samples"] == r2["samples"] == 64
    for k, v in r1["metrics"].items():
        assert r2["metrics"][k] == pytest.approx(v, abs=1e-5), k
    w1 = torch.load(one.checkpoint_dir / "model.pt", weights_only=True)
    w2 = torch.load(two.checkpoint_dir / "model.pt", weights_only=True)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    l1 = [r for r in map(json.loads, one.log_path.read_text().splitlines()) if "loss" in r]
    l2 = [r for r in map(json.loads, two.log_path.read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code running from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_finetune_refuses_a_tampered_init_from_model_and_runs_nothing(tmp_path, data):
    """Someone who can write the pretraining run's model.pt replaced it with a code-running
    pickle: the fine-tuning stage that starts from it fails naming the file; the code never ran."""
    from lxmert_bench.io import RefusedFile

    pre_cfg = pretrain_config(data)
    pre = prepare(tmp_path, pre_cfg)
    marker = tmp_path / "pwned"
    pre.checkpoint_dir.mkdir(parents=True)
    torch.save({"bert.pooler.dense.weight": torch.zeros(2, 2), "x": _Payload(marker)},
               pre.checkpoint_dir / "model.pt")
    pre.write_result({"stage_id": pre_cfg.stage_id, "kind": "pretrain", "metrics": {}})
    ft = RunConfig(kind="finetune", seed=0, model=LxmertConfig.preset("test"), data=data,
                   finetune=TASK_DEFAULTS["vqa"], init_from=pre_cfg.stage_id, device="cpu")
    rd = prepare(tmp_path, ft)
    with pytest.raises(RefusedFile):
        run_stage(rd)
    assert not marker.exists()
    error = json.loads(rd.error_path.read_text())
    assert str(pre.checkpoint_dir / "model.pt") in error["error"] and "refused" in error["error"]
    assert not (rd.checkpoint_dir / "last.pt").exists()  # not one step trained
