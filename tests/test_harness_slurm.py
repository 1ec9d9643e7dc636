"""The harness through a REAL Slurm cluster (slurm/start.sh) and submitit's real Slurm executor.

Skipped with a reason when no Slurm client is on the PATH, except in CI, where
LXMERT_BENCH_REQUIRE_SLURM=1 turns a missing cluster into a failure.
"""

from __future__ import annotations

import json
import os
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
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))


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
    # step budget (~50 s of compute) needs 2-4 segments and max_num_timeout leaves headroom.
    prof = _slurm_profile(tmp_path, timeout_min=1, signal_delay_s=25, max_num_timeout=10)
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
    job_id = json.loads((RunDir(workdir, pre).path / "job.json").read_text())["job_id"]
    sacct = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-o", "JobID,State", "-j", job_id],
                           capture_output=True, text=True).stdout
    assert "REQUEUED" in sacct or "TIMEOUT" in sacct, sacct
    assert RunDir(workdir, pre).is_done()


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
