"""The harness through a REAL Slurm cluster (slurm/start.sh) and submitit's real Slurm executor.

Skipped with a reason when no Slurm client is on the PATH, except in CI, where
LXMERT_BENCH_REQUIRE_SLURM=1 turns a missing cluster into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.launch import stage_statuses
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import RunDir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm
CANCEL_STEPS = 600  # test-preset pretraining steps: ~20 s on one core


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    # "completing" too: a test that just cancelled a job leaves the node completing for seconds
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc", "comp"))


@pytest.fixture(autouse=True)
def require_slurm():
    if _cluster_up():
        return
    if os.environ.get("LXMERT_BENCH_REQUIRE_SLURM") == "1":
        pytest.fail("LXMERT_BENCH_REQUIRE_SLURM=1 but no Slurm cluster answers (bash slurm/start.sh)")
    pytest.skip("no Slurm cluster here (start one with: bash slurm/start.sh)")


def _slurm_profile(tmp_path: Path, **pretrain: object) -> Path:
    """The local test cluster's resource profile, with pretraining resources overridden."""
    import yaml

    prof = yaml.safe_load((REPO / "slurm" / "profiles" / "local.yaml").read_text())
    prof.setdefault("pretrain", {}).update(pretrain)
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def test_vision_tasks_demo_through_slurm(tmp_path, capsys):
    """The README's main command through Slurm: arrays, afterok dependencies, results, idempotence."""
    workdir = tmp_path / "wd"
    args = ["run", str(REPO / "ablations" / "vision_tasks.yaml"), "--profile", "demo",
            "--executor", "slurm", "--wait", "--workdir", str(workdir), "--quiet",
            "--set", "pretrain.optim.max_steps=6", "--set", "finetune.optim.max_steps=4",
            "--set", "data.synthetic_images=120"]
    assert main([*args, "--no-report"]) == 0
    spec = load_spec(REPO / "ablations" / "vision_tasks.yaml", "demo",
                     ["pretrain.optim.max_steps=6", "finetune.optim.max_steps=4",
                      "data.synthetic_images=120"])
    plan = make_plan(spec, workdir)
    assert len(plan.stages) == 4 + 4 * 3 * 3
    for sid in plan.stages:
        run = RunDir(workdir, sid)
        assert run.is_done(), sid
        job = json.loads((run.path / "job.json").read_text())
        assert job["executor"] == "slurm" and "_" in job["job_id"]  # an array element
        if sid.startswith("finetune/"):
            assert job["dependency"].startswith("afterok:")
    capsys.readouterr()
    assert main(args) == 0  # second run: nothing submitted
    assert "0 stage(s) submitted, 40 already done" in capsys.readouterr().out


def test_timeout_requeues_and_resumes(tmp_path):
    """A pretraining job hits a real 1-minute limit, is requeued by submitit and completes."""
    spec = tmp_path / "long.yaml"
    spec.write_text("name: long\nvariants: {Only: {}}\ntasks: [vqa]\nseeds: [0]\n")
    # Slurm may send the warning signal up to a minute early, so a segment lasts 0-35 s: the
    # step budget (~50 s of compute here) needs 2-4 segments. A loaded machine spends more of
    # each segment starting up (CI once ran out of 10 requeues), so max_num_timeout is generous:
    # it bounds the segments, it is not what the test measures.
    prof = _slurm_profile(tmp_path, timeout_min=1, signal_delay_s=25, max_num_timeout=40)
    workdir = tmp_path / "wd"
    sets = ["pretrain.optim.epochs=400", "pretrain.optim.max_steps=1200", "run.checkpoint_every=20",
            "run.log_every=20", "finetune.optim.max_steps=2"]
    args = ["run", str(spec), "--profile", "test", "--executor", "slurm", "--workdir",
            str(workdir), "--slurm-profile", str(prof), "--quiet", "--no-report", "--wait"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    plan = make_plan(load_spec(spec, "test", sets), workdir)
    pre = next(s for s in plan.stages if s.startswith("pretrain/"))
    job = json.loads((RunDir(workdir, pre).path / "job.json").read_text())
    job_id = job["job_id"]
    sacct = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-o", "JobID,State", "-j", job_id],
                           capture_output=True, text=True).stdout
    assert "REQUEUED" in sacct or "TIMEOUT" in sacct, sacct
    assert RunDir(workdir, pre).is_done()
    # each requeued segment picked up from the checkpoint the last one wrote, not from step 0
    logs = "".join(p.read_text() for p in Path(job["folder"]).glob("*_log.err"))
    resumed = [int(m) for m in re.findall(r"resumed from last\.pt at step (\d+)/1200", logs)]
    assert resumed and all(step > 0 for step in resumed), logs[-2000:]


def test_cancel_pretraining_orphans_finetunes_then_a_plain_rerun(tmp_path, capsys):
    spec = tmp_path / "c.yaml"
    spec.write_text(textwrap.dedent("""\
        name: c
        variants: {Only: {}}
        tasks: [vqa, nlvr2]
        seeds: [0]
        """))
    workdir = tmp_path / "wd"
    # long enough to cancel while it runs, short enough to finish when retried
    sets = [f"pretrain.optim.max_steps={CANCEL_STEPS}", "pretrain.optim.epochs=400"]
    base = ["--profile", "test", "--executor", "slurm", "--workdir", str(workdir), "--quiet",
            "--no-report"] + [a for s in sets for a in ("--set", s)]
    assert main(["run", str(spec), *base]) == 0
    out = capsys.readouterr().out
    assert "follow with: lxmert-bench status" in out and "lxmert-bench logs" in out
    plan = make_plan(load_spec(spec, "test", sets), workdir)
    pre = next(s for s in plan.stages if s.startswith("pretrain/"))
    job = json.loads((RunDir(workdir, pre).path / "job.json").read_text())
    for _ in range(60):  # wait until it runs, then cancel it behind the harness's back
        if stage_statuses(plan, workdir)[pre].state == "running":
            break
        time.sleep(1)
    subprocess.run(["scancel", job["job_id"]], check=True)
    for _ in range(60):
        statuses = stage_statuses(plan, workdir)
        if statuses[pre].state == "interrupted":
            break
        time.sleep(1)
    capsys.readouterr()
    assert main(["status", str(spec), "--workdir", str(workdir)]) == 1
    out = capsys.readouterr().out
    statuses = stage_statuses(plan, workdir)
    fins = [s for s in plan.stages if s.startswith("finetune/")]
    # cancelled from outside: interrupted (resumable), its fine-tunings orphaned and cancelled
    assert statuses[pre].state == "interrupted" and "CANCELLED" in statuses[pre].reason
    assert all(statuses[f].state == "orphaned" for f in fins), out
    assert "orphaned" in out
    # a plain re-run resubmits the pretraining (resuming it) and its fine-tunings, to the end
    assert main(["run", str(spec), *base, "--wait"]) == 0
    assert all(RunDir(workdir, s).is_done() for s in plan.stages)


# ---------------------------------------------------------------------------------------------
# States that tell the truth (issue 11)
# ---------------------------------------------------------------------------------------------
def _two_task_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "two.yaml"
    spec.write_text("name: two\nvariants: {Only: {}}\ntasks: [vqa, nlvr2]\nseeds: [0]\n")
    return spec


def _poll(predicate, timeout: float = 90, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    return predicate()


def _squeue_reason(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%r", "-j", job_id], capture_output=True,
                         text=True).stdout.strip()
    return out.splitlines()[0] if out else ""


def test_pending_array_cancelled_from_outside_is_interrupted(tmp_path, capsys):
    """`scancel <array id>` while the fine-tuning array waits on its pretraining: sacct keeps only
    the record `N_[0-1%k]`; its elements are interrupted (resumable), never 'queued' forever."""
    spec = _two_task_spec(tmp_path)
    workdir = tmp_path / "wd"
    sets = [f"pretrain.optim.max_steps={CANCEL_STEPS}", "pretrain.optim.epochs=400"]
    base = ["--profile", "test", "--executor", "slurm", "--workdir", str(workdir), "--quiet",
            "--no-report"] + [a for s in sets for a in ("--set", s)]
    assert main(["run", str(spec), *base]) == 0
    plan = make_plan(load_spec(spec, "test", sets), workdir)
    pre = next(s for s in plan.stages if s.startswith("pretrain/"))
    fins = [s for s in plan.stages if s.startswith("finetune/")]
    fin_jobs = {json.loads((RunDir(workdir, f).path / "job.json").read_text())["job_id"] for f in fins}
    array = {j.split("_")[0] for j in fin_jobs}
    assert len(array) == 1 and len(fin_jobs) == 2  # one array of two elements
    pre_job = json.loads((RunDir(workdir, pre).path / "job.json").read_text())["job_id"]
    try:
        subprocess.run(["scancel", array.pop()], check=True)  # the array id, not its elements
        # (until slurmdbd has the record they read "not found": interrupted too, but say less)
        statuses = _poll(lambda: (s := stage_statuses(plan, workdir)) and all(
            s[f].state == "interrupted" and "CANCELLED" in s[f].reason for f in fins) and s,
            timeout=60)
        assert statuses, {f: stage_statuses(plan, workdir)[f] for f in fins}
        capsys.readouterr()
        main(["status", str(spec), "--workdir", str(workdir)])
        out = capsys.readouterr().out
        rows = [line for line in out.splitlines() if "finetune/" in line]
        assert len(rows) == 2 and all(r.startswith("interrupted") and "CANCELLED" in r
                                      for r in rows), out
    finally:
        subprocess.run(["scancel", pre_job])


@pytest.mark.slow  # ~35 s: a local run, a failing job, two fine-tunings on Slurm
def test_dependency_never_satisfied_is_resubmitted_against_the_finished_stage(tmp_path, capsys):
    """The requeue race of issue 11: the pretraining's job ends FAILED although the stage wrote
    result.json, so its fine-tunings pend with DependencyNeverSatisfied. Reproduced with a real
    job that exits 1 standing in for the pretraining's job while the stage's files are its own
    (from a finished run). status flags them; a plain `run` cancels and resubmits them without
    the dead dependency, and they finish."""
    spec = _two_task_spec(tmp_path)
    workdir = tmp_path / "wd"
    common = ["--profile", "test", "--workdir", str(workdir), "--quiet", "--no-report"]
    assert main(["run", str(spec), *common, "--executor", "local"]) == 0  # every stage done
    plan = make_plan(load_spec(spec, "test", []), workdir)
    pre = next(s for s in plan.stages if s.startswith("pretrain/"))
    fins = [s for s in plan.stages if s.startswith("finetune/")]
    aside = tmp_path / "aside"
    aside.mkdir()
    for f in fins:  # the fine-tunings have not run yet
        shutil.move(str(RunDir(workdir, f).path), str(aside / f.replace("/", "_")))
    result = RunDir(workdir, pre).result_path
    shutil.move(str(result), str(aside / "result.json"))  # ... nor has the pretraining finished
    dead = subprocess.run(["sbatch", "--parsable", "-t", "5", "-o", "/dev/null",
                           "--wrap", "sleep 6; exit 1"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (RunDir(workdir, pre).path / "job.json").write_text(json.dumps(
        {"executor": "slurm", "job_id": dead, "folder": str(tmp_path)}))
    assert main(["run", str(spec), *common, "--executor", "slurm"]) == 0
    first = {f: json.loads((RunDir(workdir, f).path / "job.json").read_text()) for f in fins}
    assert all(r["dependency"] == f"afterok:{dead}" for r in first.values()), first
    shutil.move(str(aside / "result.json"), str(result))  # the stage wrote its result, then died
    try:
        reason = _poll(lambda: _squeue_reason(next(iter(first.values()))["job_id"])
                       == "DependencyNeverSatisfied", timeout=90)
        assert reason, _squeue_reason(next(iter(first.values()))["job_id"])
        statuses = stage_statuses(plan, workdir)
        assert statuses[pre].state == "done"
        for f in fins:
            assert statuses[f].state == "queued"
            assert "Slurm PENDING (DependencyNeverSatisfied)" in statuses[f].reason
            assert "will never start" in statuses[f].reason
        capsys.readouterr()
        assert main(["run", str(spec), *common, "--executor", "slurm"]) == 0
        out = capsys.readouterr().out
        assert "2 stage(s) submitted" in out, out
        again = {f: json.loads((RunDir(workdir, f).path / "job.json").read_text()) for f in fins}
        for f in fins:
            assert again[f]["job_id"] != first[f]["job_id"] and not again[f]["dependency"]
        assert subprocess.run(["squeue", "-h", "-j", first[fins[0]]["job_id"].split("_")[0]],
                              capture_output=True, text=True).stdout.strip() == ""  # cancelled
        from lxmert_bench.launch import wait

        final = wait(plan, workdir, poll_s=1, progress=False, timeout_s=240)
        assert all(final[s].state == "done" for s in plan.stages), final
    finally:
        for r in first.values():
            subprocess.run(["scancel", r["job_id"].split("_")[0]])


def _counting(tmp_path: Path, *commands: str) -> Path:
    """A PATH folder whose `sbatch`/`scancel` log each call, then exec the real one (a counter,
    not a stand-in: Slurm does the work)."""
    folder = tmp_path / "counting-bin"
    folder.mkdir()
    for cmd in commands:
        real = shutil.which(cmd)
        script = folder / cmd
        script.write_text(f'#!/bin/sh\necho "$*" >> {folder}/{cmd}.calls\nexec {real} "$@"\n')
        script.chmod(0o755)
    return folder


def test_cancel_is_one_scancel_per_batch_of_arrays(tmp_path, monkeypatch, capsys):
    """vision_tasks (test profile: 4 pretrainings, 12 fine-tunings) is 5 sbatch calls (one
    array per level and parent) and its cancel one scancel call, not one per stage."""
    bin_dir = _counting(tmp_path, "sbatch", "scancel")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    workdir = tmp_path / "wd"
    spec = REPO / "ablations" / "vision_tasks.yaml"
    sets = [f"pretrain.optim.max_steps={CANCEL_STEPS}", "pretrain.optim.epochs=400"]
    common = ["--profile", "test", "--workdir", str(workdir)] + [a for s in sets for a in ("--set", s)]
    assert main(["run", str(spec), *common, "--executor", "slurm", "--quiet", "--no-report"]) == 0
    sbatch_calls = (bin_dir / "sbatch.calls").read_text().splitlines()
    assert len(sbatch_calls) == 5, sbatch_calls
    capsys.readouterr()
    assert main(["cancel", str(spec), *common]) == 0
    assert "cancelled 16 stage(s)" in capsys.readouterr().out
    scancel_calls = (bin_dir / "scancel.calls").read_text().splitlines()
    assert len(scancel_calls) == 1, scancel_calls
    plan = make_plan(load_spec(spec, "test", sets), workdir)
    jobs = {json.loads((RunDir(workdir, s).path / "job.json").read_text())["job_id"].split("_")[0]
            for s in plan.stages}
    assert _poll(lambda: subprocess.run(["squeue", "-h", "-j", ",".join(sorted(jobs))],
                                        capture_output=True, text=True).stdout.strip() == "",
                 timeout=30)
    statuses = stage_statuses(plan, workdir)
    assert all(s.state == "interrupted" for s in statuses.values()), statuses


def test_scheduler_queries_are_chunked(tmp_path, monkeypatch):
    """10,000 element ids of 10 arrays plus 1,100 plain jobs: squeue/sacct are asked by array id
    in chunks of at most 500 ids, so the argument list stays short (it crashed past ~9,500)."""
    from lxmert_bench.launch import SLURM_QUERY_CHUNK, slurm_states

    bin_dir = _counting(tmp_path, "squeue", "sacct")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ids = [f"{9_000_000 + a}_{i}" for a in range(10) for i in range(1000)]
    ids += [str(9_100_000 + j) for j in range(1100)]
    assert slurm_states(ids) == {}  # none exists
    for cmd in ("squeue", "sacct"):
        lines = (bin_dir / f"{cmd}.calls").read_text().splitlines()
        assert len(lines) == 3, lines  # 1,110 array/plain ids in chunks of 500
        lists = [line.split(" -j ")[1].split()[0].split(",") for line in lines]
        assert all(len(x) <= SLURM_QUERY_CHUNK for x in lists)
        assert sum(map(len, lists)) == 1110 and max(map(len, lines)) < 5000
