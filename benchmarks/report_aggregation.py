"""How fast the report layer aggregates a big sweep: N fine-tuning result files -> one DataFrame.

Writes N realistic run directories (config-free: result.json only, as collect reads) into a temporary
directory, then times ``collect`` (reading every result.json, building the frame, and writing
results.jsonl). Target: 10,000 files in under 3 s.

    python benchmarks/report_aggregation.py [--files 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lxmert_bench.report.collect import ReportEntry, collect

TASK_METRICS = {
    "vqa": ("accuracy", "yes/no", "number", "other"),
    "gqa": ("accuracy", "binary", "open"),
    "nlvr2": ("accuracy", "consistency"),
}


def make_runs(workdir: Path, n_files: int, variants: int = 20) -> list[ReportEntry]:
    """``n_files`` finished fine-tuning runs spread over variants x tasks x seeds."""
    rng = random.Random(0)
    tasks = list(TASK_METRICS)
    entries = []
    for i in range(n_files):
        variant, task = f"variant {i % variants}", tasks[(i // variants) % 3]
        seed = i // (variants * 3)
        stage = f"finetune/{i:012x}"
        run = workdir / "runs" / stage
        run.mkdir(parents=True)
        result = {
            "stage_id": stage, "kind": "finetune", "config_hash": f"{i:012x}", "seed": seed,
            "task": task,
            "metrics": {m: round(rng.uniform(40, 80), 2) for m in TASK_METRICS[task]},
            "last_metrics": {"accuracy": 60.0}, "best_epoch": 3,
            "history": [{"epoch": e, "metrics": {"accuracy": 50.0 + e}} for e in range(1, 5)],
            "predictions": {"dev": "predictions/dev_predict.json",
                            "scores": "predictions/dev_scores.json"},
            "steps": 1234, "samples": 39488, "samples_per_s": 812.3,
            "timings": {"train_s": 48.6, "eval_s": 3.1, "total_s": 52.0},
            "device": "cuda", "num_gpus": 1, "gpu_hours": 0.0144, "precision": "bf16",
            "versions": {"lxmert_bench": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
            "data_fingerprint": "abc123", "code_version": "0.1.0+deadbeef",
            "finished_at": "2026-11-23T07:00:00Z",
        }
        (run / "result.json").write_text(json.dumps(result, indent=2))
        entries.append(ReportEntry(variant, seed, task, stage, None, "done"))
    return entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        entries = make_runs(workdir, args.files)
        print(f"wrote {args.files} result files in {time.perf_counter() - t0:.1f} s")
        times, rows = [], 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            frame = collect(entries, workdir, results_path=workdir / "results.jsonl")
            times.append(time.perf_counter() - t0)
            rows = len(frame)
        best = min(times)
        print(f"collect: {args.files} files -> {rows} rows + results.jsonl: best {best:.2f} s "
              f"of {args.repeat} ({args.files / best:,.0f} files/s); all: "
              + ", ".join(f"{t:.2f}" for t in times))
        print(f"target < 3 s: {'OK' if best < 3 else 'TOO SLOW'} (ratio {best / 3:.2f})")


if __name__ == "__main__":
    main()
