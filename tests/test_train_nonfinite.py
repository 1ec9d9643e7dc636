"""No host sync inside the step (issue 13): the loss values stay on the device and are checked on
log steps and before every checkpoint, so a NaN still stops the run within ``log_every`` steps,
naming the step it appeared at, and never reaches last.pt."""

from __future__ import annotations

import pytest
from test_train_loop import ToyData, make_model, settings, step

from lxmert_bench.train.loop import NonFiniteLoss, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _nan_at(bad: int):
    calls = {"n": 0}

    def bad_step(model, batch, epoch):
        calls["n"] += 1
        out = step(model, batch, epoch)
        if calls["n"] == bad:
            out["losses"]["mse"] = out["losses"]["mse"] * float("nan")
            out["loss"] = out["losses"]["mse"]
        return out
    return bad_step


def test_a_nan_between_log_steps_stops_at_the_next_one_naming_its_step(tmp_path):
    s = settings(tmp_path)
    s.log_every, s.checkpoint_every = 4, 100
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 5 \(epoch 1") as info:
        train(make_model(), ToyData(), _nan_at(5), s)
    assert info.value.step == 5
    # it stopped at step 8 (the next log step): the log has step 4's line and nothing after it
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 4' in lines[0]


def test_a_nan_never_reaches_last_pt(tmp_path):
    s = settings(tmp_path)
    s.log_every, s.checkpoint_every = 10, 3  # checkpoints at steps 3 and 6, a NaN at step 5
    with pytest.raises(NonFiniteLoss, match=r"step 5"):
        train(make_model(), ToyData(), _nan_at(5), s)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state"]["global_step"] == 3
