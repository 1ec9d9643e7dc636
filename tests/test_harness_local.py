"""The harness end to end on the local executor: spec -> plan -> submitit LocalExecutor jobs -> results.

Real stages (the `test` profile: smallest model, small synthetic benchmark, a few steps each).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.launch import stage_statuses
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import RunDir

SPEC = """\
name: mini
title: Two variants
reference: table5
reference_variant: Feat + Label
variants:
  Feat:         {pretrain.visual_losses: [feat]}
  Feat + Label: {pretrain.visual_losses: [obj, attr, feat]}
tasks: [vqa, nlvr2]
seeds: [0]
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One real run of a two-variant spec; later tests look at what it left on disk."""
    tmp = tmp_path_factory.mktemp("harness")
    spec = tmp / "mini.yaml"
    spec.write_text(SPEC)
    workdir = tmp / "wd"
    out = tmp / "results"
    cwd = os.getcwd()
    os.chdir(tmp)  # the report goes to ./results/<spec name>/
    try:
        code = main(["run", str(spec), "--profile", "test", "--executor", "local", "--workdir",
                     str(workdir), "--quiet", "--parallel", "2"])
    finally:
        os.chdir(cwd)
    return {"spec": spec, "workdir": workdir, "code": code, "out": out, "tmp": tmp}


def _plan(ran):
    return make_plan(load_spec(ran["spec"], "test"), ran["workdir"])


def test_run_completes_every_stage(ran):
    assert ran["code"] == 0
    plan = _plan(ran)
    kinds = sorted(s.kind for s in plan.stages.values())
    assert kinds == ["finetune"] * 4 + ["pretrain"] * 2
    for sid in plan.stages:
        run = RunDir(ran["workdir"], sid)
        assert run.is_done(), sid
        result = run.read_result()
        assert result["config_hash"] == sid.split("/")[1]
        job = json.loads((run.path / "job.json").read_text())
        assert job["executor"] == "local" and job["job_id"]


def test_report_written_with_tables_and_plots(ran):
    report = ran["tmp"] / "results" / "mini" / "report.md"
    text = report.read_text()
    assert "Feat + Label" in text and "VQA" in text and "NLVR" in text
    assert "synthetic" in text.lower()  # the test profile's numbers are never the paper's
    assert list((ran["tmp"] / "results" / "mini").glob("*.png"))
    rows = (ran["tmp"] / "results" / "mini" / "results.jsonl").read_text().splitlines()
    assert len(rows) >= 4


def test_second_run_submits_nothing(ran, capsys, monkeypatch):
    monkeypatch.chdir(ran["tmp"])
    plan = _plan(ran)
    mtimes = {sid: RunDir(ran["workdir"], sid).result_path.stat().st_mtime_ns for sid in plan.stages}
    code = main(["run", str(ran["spec"]), "--workdir", str(ran["workdir"]), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "0 stage(s) submitted, 6 already done" in out
    for sid, m in mtimes.items():  # never redone, never overwritten
        assert RunDir(ran["workdir"], sid).result_path.stat().st_mtime_ns == m


def test_plan_and_status_show_done_from_a_later_shell(ran, capsys):
    assert main(["plan", str(ran["spec"]), "--workdir", str(ran["workdir"]), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["counts"] == {"done": 6}
    assert main(["status", str(ran["spec"]), "--workdir", str(ran["workdir"]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {s["state"] for s in status} == {"done"}


def test_stage_shared_across_specs(ran, tmp_path):
    """A second spec with the same 'Feat + Label' setup reuses the finished pretraining."""
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("name: mini", "name: other").replace(
        "  Feat:         {pretrain.visual_losses: [feat]}\n", ""))
    a = _plan(ran)
    b = make_plan(load_spec(other, "test"), ran["workdir"])
    shared = set(a.stages) & set(b.stages)
    assert any(s.startswith("pretrain/") for s in shared)
    statuses = stage_statuses(b, ran["workdir"])
    assert all(statuses[s].state == "done" for s in shared)
    both = make_plan([load_spec(ran["spec"], "test"), load_spec(other, "test")], ran["workdir"])
    assert len(both.stages) == len(a.stages)  # planned once


def test_failure_orphans_then_retry_failed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    """A stage that fails leaves its dependents orphaned; --retry-failed reruns it and them."""
    spec = tmp_path / "one.yaml"
    spec.write_text(textwrap.dedent("""\
        name: one
        variants:
          Only: {}
        tasks: [vqa]
        seeds: [0]
        """))
    workdir = tmp_path / "wd"
    # generate the data, then break the pretraining corpus so pretraining fails with a clear error
    # (valid JSON, so the plan's check lets it through, but not the corpus format)
    plan = make_plan(load_spec(spec, "test"), workdir)
    root = Path(next(iter(plan.stages.values())).config.data.root)
    assert main(["data", "synthetic", "--out", str(root), "--images", "120", "--seed", "0"]) == 0
    corpus = root / "lxmert" / "mscoco_train.json"
    good = corpus.read_bytes()
    corpus.write_text('[{"sentf": {}}]')
    code = main(["run", str(spec), "--profile", "test", "--executor", "local", "--workdir",
                 str(workdir), "--quiet"])
    assert code == 1
    statuses = stage_statuses(plan, workdir)
    pre = next(s for s in plan.stages if s.startswith("pretrain/"))
    fin = next(s for s in plan.stages if s.startswith("finetune/"))
    assert statuses[pre].state == "failed" and "mscoco_train.json" in statuses[pre].error_tail
    assert statuses[fin].state == "orphaned"
    capsys.readouterr()
    # without --retry-failed nothing is resubmitted
    assert main(["run", str(spec), "--workdir", str(workdir), "--quiet", "--no-report"]) == 1
    assert "re-run with --retry-failed" in capsys.readouterr().out
    corpus.write_bytes(good)
    code = main(["run", str(spec), "--workdir", str(workdir), "--quiet", "--retry-failed"])
    assert code == 0
    assert RunDir(workdir, pre).is_done() and RunDir(workdir, fin).is_done()


def test_dry_run_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "mini.yaml"
    spec.write_text(SPEC)
    workdir = tmp_path / "wd"
    assert main(["run", str(spec), "--profile", "test", "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to run" in out and "dry run" in out
    assert not (workdir / "runs").exists()


class _EndsOnCall:
    """Stands in for a submitit job in a unit test of the launcher's wait (no process needed):
    ``done()`` turns true on its ``n``-th call."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def done(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_the_local_launcher_wakes_when_a_stage_ends_not_after_its_poll_interval():
    from lxmert_bench.launch import _sleep_until_one_ends

    ending, running = _EndsOnCall(3), _EndsOnCall(10**9)
    _sleep_until_one_ends({"a": running, "b": ending}, limit_s=600)  # returns on the 3rd look
    assert ending.calls == 3 and running.calls == 3
    idle = _EndsOnCall(10**9)
    _sleep_until_one_ends({"a": idle}, limit_s=0.2)  # nothing ends: it looks until the limit
    assert 1 < idle.calls < 10**9
    _sleep_until_one_ends({}, limit_s=0.05)  # only waiting on other processes: a plain sleep
