"""One execution per stage, whatever the user does (issue 10): concurrent runs, kill -9, cancel,
Ctrl-C. Real `lxmert-bench run` processes on the local executor, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.launch import stage_statuses
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import DONE, INTERRUPTED, RUNNING, RunDir

pytestmark = pytest.mark.slow

SPEC = """\
name: once
variants:
  Only: {}
tasks: [nlvr2, vqa]
seeds: [0]
"""
# long enough to be caught mid-run, short enough for the suite
LONG = ["pretrain.optim.max_steps=150", "pretrain.optim.epochs=200"]


def _setup(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    spec = tmp_path / "once.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    wd = tmp_path / "wd"
    args = ["--profile", "test", "--workdir", str(wd), "--quiet", "--no-report"]
    for s in LONG:
        args += ["--set", s]
    return spec, wd, args


def _cli(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lxmert_bench.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _plan(spec: Path, wd: Path):
    return make_plan(load_spec(spec, "test", LONG), wd)


def _pretrain(plan) -> str:
    return next(s for s in plan.stages if s.startswith("pretrain/"))


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logged_steps(run: RunDir) -> list[int]:
    steps = []
    for line in run.log_path.read_text().splitlines():
        rec = json.loads(line)
        if "split" not in rec:
            steps.append(rec["step"])
    return steps


def _steps_running(run: RunDir, at_least: int = 3) -> bool:
    return run.log_path.is_file() and len(_logged_steps(run)) >= at_least


def _metrics(plan, wd: Path) -> dict[str, dict]:
    return {sid: RunDir(wd, sid).read_result()["metrics"] for sid in plan.stages}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same spec run once without interruption: what every other run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    spec, wd, args = _setup(tmp)
    assert main(["run", str(spec), *args]) == 0
    plan = _plan(spec, wd)
    return {sid.split("/")[0] + "/" + plan.stages[sid].describe(): m
            for sid, m in _metrics(plan, wd).items()}


def _by_description(plan, metrics: dict[str, dict]) -> dict[str, dict]:
    return {sid.split("/")[0] + "/" + plan.stages[sid].describe(): m for sid, m in metrics.items()}


def _run_until_pretraining_logs(tmp_path: Path, **popen):
    """A `run` in the background, returned once its pretraining has logged a few steps."""
    spec, wd, args = _setup(tmp_path)
    plan = _plan(spec, wd)
    pre = RunDir(wd, _pretrain(plan))
    proc = _cli("run", str(spec), *args, **popen)
    _wait_for(lambda: _steps_running(pre), 180, "the pretraining to log steps")
    return spec, wd, args, plan, pre, proc


def test_two_concurrent_runs_execute_every_stage_once(tmp_path, reference):
    spec, wd, args = _setup(tmp_path)
    first = _cli("run", str(spec), *args)
    second = _cli("run", str(spec), *args)
    out = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, out
    plan = _plan(spec, wd)
    for sid in plan.stages:
        run = RunDir(wd, sid)
        assert run.is_done(), sid
        steps = _logged_steps(run)
        assert steps == sorted(set(steps)), f"{sid}: steps not strictly increasing: {steps}"
    assert _by_description(plan, _metrics(plan, wd)) == reference
    statuses = stage_statuses(plan, wd)
    assert {s.state for s in statuses.values()} == {DONE}


def test_kill_9_of_run_then_a_plain_rerun_finishes_identically(tmp_path, reference):
    spec, wd, args, plan, pre, proc = _run_until_pretraining_logs(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # its stage must not outlive it: the lock is let go within seconds
    _wait_for(lambda: pre.lock_holder() is None, 20, "the orphaned stage to end")
    status = stage_statuses(plan, wd)[pre.stage_id]
    assert status.state == INTERRUPTED and "SIGTERM" in status.reason
    assert json.loads(pre.error_path.read_text())["signal"] == "SIGTERM"
    assert main(["run", str(spec), *args]) == 0  # a plain re-run, no --retry-failed
    assert all(RunDir(wd, s).is_done() for s in plan.stages)
    steps = _logged_steps(pre)
    assert steps == sorted(set(steps))  # resumed after its checkpoint, nothing logged twice
    assert _by_description(plan, _metrics(plan, wd)) == reference


def test_cancel_stops_a_local_run_within_seconds(tmp_path, capsys):
    spec, wd, args, plan, pre, proc = _run_until_pretraining_logs(tmp_path)
    assert stage_statuses(plan, wd)[pre.stage_id].state == RUNNING
    started = time.time()
    assert main(["cancel", str(spec), "--workdir", str(wd)]) == 0
    assert "cancelled" in capsys.readouterr().out
    proc.communicate(timeout=30)
    assert time.time() - started < 20
    assert pre.lock_holder() is None
    n = len(_logged_steps(pre))
    time.sleep(2)
    assert len(_logged_steps(pre)) == n  # nothing goes on training behind the user's back
    statuses = stage_statuses(plan, wd)
    assert statuses[pre.stage_id].state == INTERRUPTED
    assert not any(RunDir(wd, s).path.joinpath("log.jsonl").exists()
                   for s in plan.stages if s.startswith("finetune/"))
    assert main(["run", str(spec), *args]) == 0
    assert all(RunDir(wd, s).is_done() for s in plan.stages)


def test_a_ctrl_c_only_the_stage_got_stops_the_run_as_well(tmp_path):
    """While the launcher starts a local stage it ignores SIGINT (so that the stage's controller
    inherits that), and a Ctrl-C then reaches only the running stages. A stage ended by SIGINT
    stops the run as Ctrl-C does: exit 130 and its message, nothing started after it."""
    spec, wd, args, plan, pre, proc = _run_until_pretraining_logs(tmp_path)
    os.kill(pre.lock_holder()["pid"], signal.SIGINT)  # the stage's process alone
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to continue" in err and "Traceback" not in err
    assert stage_statuses(plan, wd)[pre.stage_id].state == INTERRUPTED
    assert json.loads(pre.error_path.read_text())["signal"] == "SIGINT"
    assert not any(RunDir(wd, s).log_path.exists() for s in plan.stages if s.startswith("finetune/"))


def _as_in_a_terminal() -> None:
    """A terminal's command has SIGINT at its default; one started from a background shell job
    (CI scripts) inherits it ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_the_truth_and_a_plain_rerun_continues(tmp_path):
    spec, wd, args, plan, pre, proc = _run_until_pretraining_logs(
        tmp_path, start_new_session=True, preexec_fn=_as_in_a_terminal)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "re-run the same command to continue" in err and "Traceback" not in err
    _wait_for(lambda: pre.lock_holder() is None, 20, "the stage to end")
    assert stage_statuses(plan, wd)[pre.stage_id].state == INTERRUPTED
    rerun = _cli("run", str(spec), *args)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err  # the message's promise holds: no --retry-failed needed
    assert all(RunDir(wd, s).is_done() for s in plan.stages)


def test_a_locked_stage_is_never_started_again_and_shows_who_runs_it(tmp_path, capsys):
    spec, wd, args, plan, pre, proc = _run_until_pretraining_logs(tmp_path)
    try:
        holder = pre.lock_holder()
        assert holder and holder["pid"] != proc.pid  # the stage's own process, not the launcher
        assert main(["stage", str(pre.path)]) == 1
        assert f"already running (pid {holder['pid']} on {holder['host']})" in \
            capsys.readouterr().err
        assert main(["status", str(spec), "--workdir", str(wd)]) == 0
        assert f"pid {holder['pid']} on {holder['host']}" in capsys.readouterr().out
    finally:
        proc.communicate(timeout=600)
    assert proc.returncode == 0
    steps = _logged_steps(pre)
    assert steps == sorted(set(steps))


def test_rerun_archives_and_runs_again(tmp_path, capsys):
    spec, wd, args = _setup(tmp_path)
    assert main(["run", str(spec), *args]) == 0
    plan = _plan(spec, wd)
    fin = [s for s in plan.stages if s.startswith("finetune/")]
    old = {s: RunDir(wd, s).result_path.read_bytes() for s in fin}
    capsys.readouterr()
    assert main(["run", str(spec), *args, "--rerun", "kind=finetune,task=vqa"]) == 0
    out = capsys.readouterr().out
    vqa = [s for s in fin if plan.stages[s].config.finetune.task == "vqa"]
    assert len(vqa) == 1 and f"rerun {vqa[0]}: moved its run directory to" in out
    archived = list((wd / "archive" / "finetune").iterdir())
    assert len(archived) == 1 and (archived[0] / "result.json").read_bytes() == old[vqa[0]]
    assert RunDir(wd, vqa[0]).is_done()
    other = next(s for s in fin if s != vqa[0])
    assert RunDir(wd, other).result_path.read_bytes() == old[other]  # not selected: untouched
    assert main(["run", str(spec), *args, "--rerun", "variant=Nope"]) == 2
    assert "names no stage" in capsys.readouterr().err
