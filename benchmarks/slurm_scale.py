"""Slurm at scale, on a real cluster (the test cluster from slurm/start.sh): how many sbatch and
scancel calls a spec costs, and how long ``status`` and ``cancel`` take for thousands of stages.

1. The vision_tasks spec (demo profile: 4 pretrainings, 36 fine-tunings) submitted with
   ``run --executor slurm`` and cancelled with ``cancel``, through sbatch/scancel wrappers that
   count their calls and then exec the real commands.
2. N = 2,000 and 9,000 stages: N held array elements (``sbatch --hold --array=0-999``, so nothing
   runs) and N fabricated run directories whose job.json point at them; times
   ``stage_statuses`` (what ``status`` does: read the records, ask squeue/sacct) and ``cancel``.
   The pending arrays are one job record each until they start, so MaxJobCount is not at stake.

    python benchmarks/slurm_scale.py [--stages 2000 9000] [--skip-spec]

Prints the figures; not a test (it needs a cluster and minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from lxmert_bench import launch
from lxmert_bench.cli import main
from lxmert_bench.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def counting_path(folder: Path, *commands: str) -> Path:
    """Wrappers that log each call of these commands, then exec the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    for cmd in commands:
        real = shutil.which(cmd)
        if real is None:
            sys.exit(f"{cmd}: not on the PATH (start the test cluster: bash slurm/start.sh)")
        script = folder / cmd
        script.write_text(f'#!/bin/sh\necho "$*" >> {folder}/{cmd}.calls\nexec {real} "$@"\n')
        script.chmod(0o755)
    return folder


def calls(folder: Path, cmd: str) -> int:
    path = folder / f"{cmd}.calls"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def spec_calls(tmp: Path) -> None:
    bin_dir = counting_path(tmp / "bin", "sbatch", "scancel")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
    try:
        common = [str(REPO / "ablations" / "vision_tasks.yaml"), "--profile", "demo",
                  "--workdir", str(tmp / "wd"), "--set", "pretrain.optim.max_steps=100000"]
        t0 = time.perf_counter()
        main(["run", *common, "--executor", "slurm", "--quiet", "--no-report"])
        submit_s = time.perf_counter() - t0
        submitted = calls(bin_dir, "sbatch")
        t0 = time.perf_counter()
        main(["cancel", *common])
        cancel_s = time.perf_counter() - t0
    finally:
        os.environ["PATH"] = old_path
    print(f"vision_tasks (demo: 40 stages): {submitted} sbatch call(s) to submit "
          f"({submit_s:.1f} s), {calls(bin_dir, 'scancel')} scancel call(s) to cancel "
          f"({cancel_s:.1f} s)")


def held_arrays(n: int, size: int = 1000) -> list[str]:
    """n held (never starting) array elements, as job ids."""
    ids: list[str] = []
    while len(ids) < n:
        k = min(size, n - len(ids))
        out = subprocess.run(["sbatch", "--parsable", "--hold", f"--array=0-{k - 1}", "-t", "5",
                              "-o", "/dev/null", "-J", "lxmert-scale", "--wrap", "true"],
                             capture_output=True, text=True, check=True).stdout.strip()
        ids += [f"{out.split(';')[0]}_{i}" for i in range(k)]
    return ids


def status_and_cancel(tmp: Path, n: int) -> None:
    workdir = tmp / f"wd{n}"
    job_ids = held_arrays(n)
    stages = {}
    for i, job in enumerate(job_ids):
        sid = f"finetune/{i:012x}"
        atomic_write_json(workdir / "runs" / sid / "job.json",
                          {"executor": "slurm", "job_id": job, "folder": str(tmp)})
        stages[sid] = None
    plan = SimpleNamespace(stages=stages)  # stage_statuses and cancel read only the stage ids
    bin_dir = counting_path(tmp / f"bin{n}", "squeue", "sacct")
    old_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old_path}"
        t0 = time.perf_counter()
        statuses = launch.stage_statuses(plan, workdir)
        status_s = time.perf_counter() - t0
        os.environ["PATH"] = old_path
        queries = {cmd: calls(bin_dir, cmd) for cmd in ("squeue", "sacct")}
        queued = sum(s.state == "queued" for s in statuses.values())
        ids_len = len(",".join(job_ids))
        print(f"{n} stages: status {status_s:.2f} s ({queries['squeue']} squeue + "
              f"{queries['sacct']} sacct call(s); {queued} queued); one -j list of every element "
              f"would be {ids_len:,} characters")
        t0 = time.perf_counter()
        cancelled = launch.cancel(plan, workdir, grace_s=0)
        cancel_s = time.perf_counter() - t0
        print(f"{n} stages: cancel {cancel_s:.2f} s for {len(cancelled)} stage(s), "
              f"{len({j.split('_')[0] for j in job_ids})} array(s) in "
              f"{len(launch.compress_job_ids(job_ids)) // 200 + 1} scancel call(s)")
    finally:
        os.environ["PATH"] = old_path
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in job_ids})], capture_output=True)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2000, 9000])
    ap.add_argument("--skip-spec", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="slurm-scale-", dir=os.environ.get("TMPDIR")) as d:
        tmp = Path(d)
        if not args.skip_spec:
            spec_calls(tmp)
        for n in args.stages:
            status_and_cancel(tmp, n)


if __name__ == "__main__":
    main_()
