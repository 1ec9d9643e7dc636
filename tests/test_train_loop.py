"""The shared training loop on a toy model: order, resume, NaN stop, logging, progress, DDP."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _helpers import free_port
from torch import nn

from lxmert_bench.config import OptimConfig
from lxmert_bench.train.loop import (
    DistInfo,
    EvalResult,
    LoopSettings,
    epoch_batches,
    load_checkpoint,
    setup_distributed,
    shard,
    teardown_distributed,
    train,
)


class ToyData:
    """y = x·w; each example's input gets noise drawn from its own generator (like masking)."""

    def __init__(self, n: int = 40, dim: int = 4):
        g = np.random.default_rng(0)
        self.x = g.normal(size=(n, dim)).astype(np.float32)
        self.y = (self.x @ np.arange(1, dim + 1, dtype=np.float32)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def example(self, index, epoch, rng):
        return self.x[index] + rng.normal(scale=0.1, size=self.x.shape[1]).astype(np.float32), self.y[index]

    def collate(self, examples):
        return {"x": torch.from_numpy(np.stack([e[0] for e in examples])),
                "y": torch.tensor([e[1] for e in examples])}


class ToyModel(nn.Module):
    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.lin(x)))).squeeze(-1)


def step(model, batch, epoch):
    err = model(batch["x"]) - batch["y"]
    mse = (err**2).mean()
    l1 = err.abs().mean()
    return {"loss": mse, "losses": {"mse": mse, "l1": l1}}


def settings(tmp: Path, **kw) -> LoopSettings:
    optim = kw.pop("optim", OptimConfig(lr=1e-2, batch_size=8, epochs=3, warmup=0.1))
    return LoopSettings(seed=3, optim=optim, checkpoint_dir=tmp / "checkpoints",
                        log_path=tmp / "log.jsonl", log_every=2, checkpoint_every=3,
                        device="cpu", **kw)


def make_model(dropout: float = 0.2) -> ToyModel:
    torch.manual_seed(0)
    return ToyModel(dropout)


def evaluate_on(data):
    def evaluate(model, epoch):
        model.eval()
        with torch.no_grad():
            err = model(torch.from_numpy(data.x)) - torch.from_numpy(data.y)
        return EvalResult({"mse": float((err**2).mean())})
    return evaluate


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s", "data_wait_s")} for r in records]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_batches(40, 8, seed=1, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(40, 8, 1, 0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(40, 8, 1, 1)]
    assert sorted(np.concatenate(a).tolist()) == list(range(40))
    assert len(epoch_batches(43, 8, 1, 0)) == 5  # the partial batch is dropped
    assert len(epoch_batches(5, 8, 1, 0)) == 1 and len(epoch_batches(5, 8, 1, 0)[0]) == 5
    b = a[0]
    parts = [shard(b, DistInfo(rank=r, world_size=2)) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(b.tolist())
    assert len(parts[0]) == len(parts[1]) == 4


def test_train_logs_evaluates_and_checkpoints(tmp_path, capsys):
    data = ToyData()
    calls = []

    def on_best(model, epoch, result):
        calls.append(epoch)

    s = settings(tmp_path, select_metric="mse", select_mode="min")
    summary = train(make_model(), data, step, s, evaluate=evaluate_on(data), on_best=on_best)
    assert summary.steps == 15 and summary.samples == 120
    assert [h["epoch"] for h in summary.history] == [1, 2, 3]
    assert summary.history[-1]["metrics"]["mse"] < summary.history[0]["metrics"]["mse"]
    assert calls and calls[0] == 1 and summary.best_epoch == calls[-1]
    log = read_log(tmp_path / "log.jsonl")
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert set(train_lines[0]) == {"step", "total_steps", "epoch", "lr", "loss", "losses",
                                   "samples_per_s", "time", "data_wait_s"}
    assert all(0 <= r["data_wait_s"] < 1 for r in train_lines)
    assert set(train_lines[0]["losses"]) == {"mse", "l1"}
    evals = [r for r in log if r.get("split") == "valid"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(5, 1), (10, 2), (15, 3)]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["state"]["done"] and ckpt["state"]["global_step"] == 15
    assert ckpt["schedule"]["updates"] == 15
    # not a terminal: plain progress lines on stderr
    err = capsys.readouterr().err
    assert "step 2/15" in err and "valid: mse" in err


def test_max_steps_stops_mid_epoch_and_evaluates(tmp_path):
    data = ToyData()
    s = settings(tmp_path, optim=OptimConfig(lr=1e-2, batch_size=8, epochs=3, max_steps=7))
    summary = train(make_model(), data, step, s, evaluate=evaluate_on(data))
    assert summary.steps == 7
    assert [h["epoch"] for h in summary.history] == [1, 2]  # the cut epoch 2 is evaluated
    # a finished run resumed does nothing more
    again = train(make_model(), data, step, s, evaluate=evaluate_on(data))
    assert again.steps == 7 and again.history == summary.history


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(tmp_path, capsys):
    data = ToyData()
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    s_full, s_cut = settings(full_dir), settings(cut_dir)
    full_model = make_model()
    full = train(full_model, data, step, s_full, evaluate=evaluate_on(data))

    seen = []

    def dying_step(model, batch, epoch):
        seen.append(1)
        if len(seen) == 8:  # after the step-6 checkpoint, during epoch 2
            raise Interrupt
        return step(model, batch, epoch)

    with pytest.raises(Interrupt):
        train(make_model(), data, dying_step, s_cut, evaluate=evaluate_on(data))
    assert load_checkpoint(cut_dir / "checkpoints" / "last.pt")["state"]["global_step"] == 6
    # the log already holds step 6's line (not 8): a resumed run must not duplicate lines
    resumed_model = make_model()
    torch.manual_seed(1234)  # the global RNG state is restored from the checkpoint anyway
    capsys.readouterr()
    cut = train(resumed_model, data, step, s_cut, evaluate=evaluate_on(data))
    assert re.search(r"resumed from last\.pt at step 6/\d+", capsys.readouterr().err)
    assert cut.history == full.history
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert strip_timing(read_log(cut_dir / "log.jsonl")) == strip_timing(read_log(full_dir / "log.jsonl"))


def test_non_finite_loss_stops_with_the_step_and_loss(tmp_path):
    data = ToyData()

    def bad_step(model, batch, epoch):
        out = step(model, batch, epoch)
        if bad_step.n == 3:
            out["losses"]["l1"] = out["losses"]["l1"] * float("inf")
            out["loss"] = out["loss"] + out["losses"]["l1"]
        bad_step.n += 1
        return out

    bad_step.n = 1
    with pytest.raises(FloatingPointError, match=r"step 3 .*l1"):
        train(make_model(), data, bad_step, settings(tmp_path))


# --- DDP: two gloo processes vs one process, same global batch -------------------------------
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        model = make_model(dropout=0.0)
        s = settings(Path(out_dir), optim=OptimConfig(lr=1e-2, batch_size=8, epochs=2, warmup=0.1))
        summary = train(model, ToyData(), step, s, dist_info=info)
        if info.is_main:
            torch.save({"model": model.state_dict(), "steps": summary.steps}, Path(out_dir) / "final.pt")
    finally:
        teardown_distributed(info)


def test_ddp_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    model = make_model(dropout=0.0)
    train(model, ToyData(), step,
          settings(one, optim=OptimConfig(lr=1e-2, batch_size=8, epochs=2, warmup=0.1)))
    two = tmp_path / "two"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(two)), nprocs=2, join=True)
    final = torch.load(two / "final.pt")
    assert final["steps"] == 10
    for k, v in model.state_dict().items():
        assert torch.allclose(v, final["model"][k], atol=1e-5), k
    # the logged global losses agree too (rank 0 logs the mean over both shards)
    log1 = [r for r in read_log(one / "log.jsonl") if "loss" in r]
    log2 = [r for r in read_log(two / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log1] == [r["step"] for r in log2]
    for a, b in zip(log1, log2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
