"""`lxmert-bench logs` (a stage's submitit stdout/stderr) and `lxmert-bench clean` (finished
stages' resume state), on a real local run of a small spec (test profile, local executor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.io import human_bytes as _human
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import RunDir


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    spec = root / "two.yaml"
    spec.write_text("name: two\nvariants: {Only: {}}\ntasks: [vqa, nlvr2]\nseeds: [0]\n")
    workdir = root / "wd"
    assert main(["run", str(spec), "--profile", "test", "--executor", "local", "--workdir",
                 str(workdir), "--quiet", "--no-report"]) == 0
    return spec, workdir, make_plan(load_spec(spec, "test", []), workdir)


def _stage(plan, kind: str, task: str | None = None) -> str:
    return next(s for s, st in plan.stages.items() if st.kind == kind
                and (task is None or st.config.finetune.task == task))


def test_logs_tail_of_a_stage_job_files(finished, capsys):
    spec, workdir, plan = finished
    pre = _stage(plan, "pretrain")
    rec = json.loads((RunDir(workdir, pre).path / "job.json").read_text())
    out_file = Path(rec["folder"]) / f"{rec['job_id']}_0_log.out"
    err_file = Path(rec["folder"]) / f"{rec['job_id']}_0_log.err"
    assert out_file.is_file() and err_file.is_file()
    capsys.readouterr()
    assert main(["logs", str(spec), "--stage", "pretrain", "--tail", "3", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"=== {pre}" in out and str(out_file) in out and str(err_file) in out
    assert out.index(str(out_file)) < out.index(str(err_file))  # stdout first
    err_lines = err_file.read_text().splitlines()
    assert err_lines and "\n".join(err_lines[-3:]) in out
    assert f"last {min(3, len(err_lines))} of {len(err_lines)} lines" in out
    assert "finetune/" not in out  # only the selected stage


def test_logs_selects_by_variant_and_task(finished, capsys):
    spec, workdir, plan = finished
    vqa, nlvr2 = _stage(plan, "finetune", "vqa"), _stage(plan, "finetune", "nlvr2")
    capsys.readouterr()
    assert main(["logs", str(spec), "Only", "--task", "vqa", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"=== {vqa}" in out and nlvr2 not in out and "pretrain/" not in out


@pytest.mark.parametrize("extra", [["Nope"], ["--task", "gqa"], ["--stage", "bert"]])
def test_logs_exit_2_when_the_selection_names_no_stage(finished, capsys, extra):
    spec, workdir, _ = finished
    assert main(["logs", str(spec), *extra, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_clean_removes_only_finished_stages_resume_state(finished, capsys, tmp_path):
    spec, src, plan = finished
    workdir = tmp_path / "wd"
    shutil.copytree(src, workdir, symlinks=True)
    plan = make_plan(load_spec(spec, "test", []), workdir)
    pre, vqa, nlvr2 = _stage(plan, "pretrain"), _stage(plan, "finetune", "vqa"), \
        _stage(plan, "finetune", "nlvr2")
    # the vqa fine-tuning did not finish (its result moved away); a file the tool did not write
    RunDir(workdir, vqa).result_path.rename(tmp_path / "vqa-result.json")
    foreign = RunDir(workdir, pre).checkpoint_dir / "my-notes.txt"
    foreign.write_text("mine")
    lasts = {s: RunDir(workdir, s).checkpoint_dir / "last.pt" for s in (pre, vqa, nlvr2)}
    assert all(p.is_file() for p in lasts.values())
    size = {s: p.stat().st_size for s, p in lasts.items()}
    expected = size[pre] + size[nlvr2]
    kept = [p for s in (pre, nlvr2) for p in RunDir(workdir, s).path.rglob("*")
            if p.is_file() and p.name != "last.pt"]
    assert any(p.name == "model.pt" for p in kept) and any(p.name == "best.pt" for p in kept)
    args = ["clean", str(spec), "--workdir", str(workdir)]
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would free" in out and f"({expected} bytes)" in out, out
    assert all(p.is_file() for p in lasts.values())  # a dry run removes nothing
    # a finished stage whose lock is held (its process still exiting) is left alone too
    with RunDir(workdir, nlvr2).execution_lock():
        assert main(args) == 0
    out = capsys.readouterr().out
    assert f"freed {_human(size[pre])} ({size[pre]} bytes) in 1 file(s)" in out, out
    assert not lasts[pre].exists() and lasts[nlvr2].is_file() and lasts[vqa].is_file()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"({size[nlvr2]} bytes) in 1 file(s)" in out, out
    assert not lasts[nlvr2].exists() and lasts[vqa].is_file()  # unfinished: resume state kept
    assert all(p.is_file() for p in kept) and foreign.read_text() == "mine"
    assert main(["status", str(spec), "--workdir", str(workdir)]) in (0, 1)
    assert RunDir(workdir, pre).is_done() and RunDir(workdir, nlvr2).is_done()
