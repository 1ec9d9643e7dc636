"""Code edits do not re-plan the world (issue 11): a stage's identity carries the declared code
version, the exact code is provenance, jobs import a snapshot, and runs finished under the old
source-hash scheme keep their results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.plan import code_version, make_plan
from lxmert_bench.provenance import CODE_VERSION, PACKAGE, source_hash
from lxmert_bench.spec import load_spec
from lxmert_bench.store import RunDir, adopt_legacy_runs

SPEC = """\
name: ident
variants:
  Only: {}
tasks: [nlvr2, vqa]
seeds: [0]
"""

# tests/golden_results.json: what each declared code version produces for this spec on the `test`
# profile (its pretraining and fine-tunings on the synthetic benchmark). When a change moves these
# numbers, results changed: bump provenance.CODE_VERSION and add its values there (keep the old
# ones: they document the history).


def _spec(tmp_path: Path) -> Path:
    p = tmp_path / "ident.yaml"
    p.write_text(textwrap.dedent(SPEC))
    return p


def _run(spec: Path, wd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "lxmert_bench.cli", "run", str(spec), "--profile",
                           "test", "--workdir", str(wd), "--quiet", "--no-report"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=PACKAGE.parent)  # a checkout as the current directory: the hard case
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ident")
    spec = _spec(tmp)
    _run(spec, tmp / "wd")
    return spec, tmp / "wd"


def _results(spec: Path, wd: Path) -> dict[str, dict]:
    plan = make_plan(load_spec(spec, "test"), wd)
    return {plan.stages[sid].describe(): RunDir(wd, sid).read_result() for sid in plan.stages}


def test_results_match_the_declared_version(finished):
    """If this fails, a change altered results: bump provenance.CODE_VERSION (so old and new
    results never share a hash) and record the new values in tests/golden_results.json."""
    results = _results(*finished)
    got = {what: {k: round(v, 3) for k, v in r["metrics"].items()} for what, r in results.items()}
    expected = json.loads((Path(__file__).parent / "golden_results.json").read_text())
    assert CODE_VERSION in expected, f"no golden results for code version {CODE_VERSION}"
    assert got == expected[CODE_VERSION], (
        "results changed: bump CODE_VERSION in lxmert_bench/provenance.py and add the new values "
        f"to tests/golden_results.json:\n{json.dumps(got, indent=1, sort_keys=True)}")


def test_results_record_the_exact_code_and_import_the_snapshot(finished):
    spec, wd = finished
    for r in _results(spec, wd).values():
        code = r["code"]
        assert r["code_version"] == CODE_VERSION and code["version"] == CODE_VERSION
        # the job imported its package from the content-addressed snapshot, not the checkout
        assert Path(code["path"]) == wd.resolve() / "code" / code["source_hash"] / "lxmert_bench"
        assert source_hash(Path(code["path"])) == code["source_hash"]  # the copy is what it says
        if shutil.which("git") and (PACKAGE.parent / ".git").exists():
            assert len(code["git_commit"]) == 40
    hashes = {r["code"]["source_hash"] for r in _results(spec, wd).values()}
    assert sorted(p.name for p in (wd / "code").iterdir()) == sorted(hashes)  # one copy per tree


def test_a_comment_in_the_training_loop_does_not_change_any_hash(tmp_path, finished):
    """The repro: appending one comment to train/loop.py changed every stage hash."""
    spec, wd = finished
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "lxmert_bench", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "lxmert_bench" / "train" / "loop.py", "a") as f:
        f.write("# a comment\n")
    script = ("import json, sys; from lxmert_bench.plan import make_plan; "
              "from lxmert_bench.spec import load_spec; import lxmert_bench; "
              "p = make_plan(load_spec(sys.argv[1], 'test'), sys.argv[2]); "
              "print(json.dumps([lxmert_bench.__file__, sorted(p.stages)]))")
    out = subprocess.run([sys.executable, "-c", script, str(spec), str(wd)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(copy)}, check=True,
                         cwd=tmp_path)
    where, stages = json.loads(out.stdout)
    assert where.startswith(str(copy))  # it really planned with the edited copy
    assert stages == sorted(make_plan(load_spec(spec, "test"), wd).stages)
    statuses = subprocess.run([sys.executable, "-m", "lxmert_bench.cli", "status", str(spec),
                               "--workdir", str(wd), "--json"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(copy)}, cwd=tmp_path)
    assert {s["state"] for s in json.loads(statuses.stdout)} == {"done"}


def test_runs_finished_under_the_old_scheme_are_adopted_once(tmp_path, capsys, finished):
    spec = _spec(tmp_path)
    wd = tmp_path / "wd"
    legacy = "0.1.0+abcd1234"  # the old code_version(): package version + a hash of the sources
    _run(spec, wd, {"LXMERT_BENCH_CODE_VERSION": legacy})
    before = {p.name: p for kind in ("pretrain", "finetune") for p in (wd / "runs" / kind).iterdir()}
    assert len(before) == 3
    assert main(["status", str(spec), "--workdir", str(wd), "--json"]) == 0
    out, err = capsys.readouterr()
    assert {s["state"] for s in json.loads(out)} == {"done"}  # not "to run"
    assert "adopted 3 finished run(s)" in err and code_version() in err
    plan = make_plan(load_spec(spec, "test"), wd)
    for sid, st in plan.stages.items():
        run = RunDir(wd, sid)
        adopted = json.loads((run.path / "adopted.json").read_text())
        assert adopted["legacy_code_version"] == legacy
        assert (wd / "runs" / adopted["from"]).is_symlink()  # the old name forwards
        assert run.read_result()["stage_id"] == sid
        if st.config.init_from:
            assert st.config.init_from in plan.stages  # dependents point at the adopted parent
    # the same numbers as the run under the declared version: same config, same code
    assert {w: r["metrics"] for w, r in _results(spec, wd).items()} == \
        {w: r["metrics"] for w, r in _results(*finished).items()}
    assert adopt_legacy_runs(wd, code_version()) == {}  # once
    assert main(["run", str(spec), "--workdir", str(wd), "--quiet", "--no-report"]) == 0
    assert "0 stage(s) submitted, 3 already done" in capsys.readouterr().out
