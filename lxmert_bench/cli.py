"""The ``lxmert-bench`` command line: a thin layer over spec -> plan -> launch -> report.

Exit codes: 0 success; 1 a stage failed (or is blocked); 2 invalid input (spec, profile, data, paths);
3 the scheduler refused a submission.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LAUNCH = 0, 1, 2, 3


def _err(msg: str) -> None:
    print(f"lxmert-bench: error: {msg}", file=sys.stderr)


def _add_common(p: argparse.ArgumentParser, plan_args: bool = True) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="ablation spec YAML file(s)")
    p.add_argument("--workdir", default=None,
                   help="run directories, checkpoints and the manifest (default ./runs or "
                        "$LXMERT_BENCH_WORKDIR)")
    p.add_argument("--allow-group-write", action="store_true",
                   help="accept a workdir its group can write (a project sharing it on purpose); "
                        "world-writable ones are always refused")
    if plan_args:
        p.add_argument("--profile", default=None,
                       help="scale profile: default (the paper), demo (laptop), test, or a .yaml "
                            "(default: the one the spec was last run with, else 'default')")
        p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                       help="override any config key, e.g. --set pretrain.optim.lr=5e-5 (repeatable)")
        p.add_argument("--slurm-profile", default=None,
                       help="resource profile in slurm/profiles/ (default: the scale profile's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-bench",
        description="Benchmark and ablation harness for LXMERT: YAML spec -> plan -> jobs -> report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="plan and run (or submit) a spec's stages, then report")
    _add_common(run)
    run.add_argument("--executor", choices=["auto", "slurm", "local", "debug"], default=None,
                     help="auto: Slurm when sbatch is on the PATH (default: the profile's)")
    run.add_argument("--dry-run", action="store_true", help="print the plan; submit nothing")
    run.add_argument("--wait", action="store_true", help="on Slurm, follow the jobs to the end")
    run.add_argument("--retry-failed", action="store_true",
                     help="resubmit failed, cancelled and orphaned stages (and their dependents)")
    run.add_argument("--parallel", type=int, default=None, help="local: stages at once")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    plan = sub.add_parser("plan", help="show the stages, their state, sharing, resources, GPU-hours")
    _add_common(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--test-only", action="store_true",
                      help="ask Slurm to validate each stage kind's request (sbatch --test-only)")

    status = sub.add_parser("status", help="every stage's state, job id and error tail")
    _add_common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = sub.add_parser("report", help="write results/<spec>/report.md, results.jsonl, plots")
    _add_common(report)
    report.add_argument("--out", default=None, help="output folder (default results/<spec name>)")

    cancel = sub.add_parser("cancel", help="cancel the spec's queued and running stages")
    _add_common(cancel)

    data = sub.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    syn = dsub.add_parser("synthetic", help="write the synthetic benchmark in the LXMERT formats")
    syn.add_argument("--out", required=True)
    syn.add_argument("--images", type=int, default=600)
    syn.add_argument("--seed", type=int, default=0)
    conv = dsub.add_parser("convert", help="obj36 TSV(s) -> a memory-mapped feature store")
    conv.add_argument("tsv", nargs="+")
    conv.add_argument("--out", required=True)
    conv.add_argument("--fp16", action="store_true", help="store features as float16")

    stage = sub.add_parser("stage", help="run one stage from its run directory (as a job does)")
    stage.add_argument("run_dir", help="<workdir>/runs/<kind>/<hash>")
    return parser


# ---------------------------------------------------------------------------------------------
def _workdir(args: argparse.Namespace) -> Path:
    from lxmert_bench.store import default_workdir

    return Path(args.workdir) if args.workdir else default_workdir()


def _remembered(workdir: Path, spec_path: str) -> dict[str, Any]:
    from lxmert_bench.io import read_json

    p = workdir / "specs" / (Path(spec_path).stem + ".json")
    try:
        return read_json(p) if p.is_file() else {}
    except ValueError:
        return {}


def _load(args: argparse.Namespace) -> tuple[list, Any, Path]:
    """Specs + plan. Status/report/cancel reuse the profile and --set a spec was last run with."""
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    workdir = _workdir(args)
    specs = []
    for path in args.specs:
        mem = _remembered(workdir, path)
        profile = args.profile or mem.get("profile")
        overrides = args.overrides if args.overrides is not None else mem.get("overrides")
        specs.append(load_spec(path, profile, overrides))
    return specs, make_plan(specs, workdir), workdir


def _remember(workdir: Path, args: argparse.Namespace, specs: list) -> None:
    from lxmert_bench.io import atomic_write_json

    for spec in specs:
        atomic_write_json(workdir / "specs" / f"{Path(spec.path).stem}.json", {
            "spec": str(Path(spec.path).resolve()), "profile": spec.profile.path or spec.profile.name,
            "overrides": args.overrides or [],
            "allow_group_write": bool(getattr(args, "allow_group_write", False)),  # provenance
        })


def _permission_problems(args: argparse.Namespace, plan, workdir: Path) -> list[str]:
    """Directories others could write code or checkpoints into (lxmert_bench.permissions)."""
    from lxmert_bench.permissions import check_workdir
    from lxmert_bench.store import RunDir

    runs = [RunDir(workdir, sid).path for sid in plan.stages]
    return check_workdir(workdir, runs, allow_group=bool(getattr(args, "allow_group_write", False)))


def _resources(args: argparse.Namespace, specs: list):
    from lxmert_bench.launch import load_resource_profile

    return load_resource_profile(args.slurm_profile or specs[0].profile.slurm_profile)


def _in_spec_order(plan) -> list:
    """Stages by level, then in the order of the specs' variants, tasks and seeds."""
    rank: dict[str, int] = {}
    for i, e in enumerate(plan.entries):
        for sid in (e.bert, e.pretrain, e.finetune):
            if sid:
                rank.setdefault(sid, i)
    return sorted(plan.stages.values(), key=lambda st: (st.level, rank.get(st.stage_id, 0)))


def _print_plan(plan, statuses, resources, as_json: bool, test_only: dict[str, str] | None) -> None:
    from lxmert_bench.plan import estimate_gpu_hours

    rows = []
    for st in _in_spec_order(plan):
        s = statuses[st.stage_id]
        res = resources.for_kind(st.kind)
        variants = list(dict.fromkeys(u[1] for u in st.users))
        what = st.describe() + (f" | {', '.join(variants)}" if st.kind != "bert" else "")
        rows.append({
            "stage": st.stage_id, "kind": st.kind, "what": what, "state": s.state,
            "job_id": s.job_id, "shared_by": len({(u[0], u[1]) for u in st.users}),
            "used_by": [f"{u[0]}:{u[1]}:seed{u[2]}:{u[3]}" for u in st.users],
            "depends_on": st.deps, "gpus": int(res.get("gpus_per_node") or 0) * int(res.get("nodes") or 1),
            "time_min": res.get("timeout_min"), "gpu_hours": round(estimate_gpu_hours(st.config), 2),
        })
    todo_hours = sum(r["gpu_hours"] for r in rows if r["state"] not in ("done",))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    if as_json:
        print(json.dumps({"stages": rows, "counts": counts, "gpu_hours_to_run": round(todo_hours, 1),
                          "sbatch_test_only": test_only or {}}, indent=2))
        return
    from tabulate import tabulate

    spec = plan.specs[0]
    print(f"Plan for {', '.join(s.name for s in plan.specs)} (profile: {spec.profile.name}, "
          f"resources: {resources.name})")
    table = [[r["state"], r["kind"], r["stage"].split("/")[1], r["what"],
              f"{r['shared_by']} variants" if r["shared_by"] > 1 else "",
              f"{r['gpus']} GPU, {r['time_min']} min" if r["gpus"] else f"CPU, {r['time_min']} min",
              f"{r['gpu_hours']:.1f}" if r["gpu_hours"] else "-"] for r in rows]
    print(tabulate(table, headers=["state", "kind", "hash", "stage", "shared", "resources", "GPU-h"],
                   tablefmt="simple"))
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; about {todo_hours:,.0f} GPU-hours still to run")
    for kind, verdict in (test_only or {}).items():
        print(f"sbatch --test-only {kind}: {verdict}")


def cmd_plan(args: argparse.Namespace) -> int:
    from lxmert_bench.launch import sbatch_test_only, stage_statuses
    from lxmert_bench.plan import check_data

    specs, plan, workdir = _load(args)
    problems = check_data(plan) + _permission_problems(args, plan, workdir)
    resources = _resources(args, specs)
    statuses = stage_statuses(plan, workdir)
    test_only = None
    if getattr(args, "test_only", False):
        test_only = sbatch_test_only(resources, sorted({s.kind for s in plan.stages.values()}))
    _print_plan(plan, statuses, resources, getattr(args, "json", False), test_only)
    for p in problems:
        _err(p)
    return EXIT_INVALID if problems else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from lxmert_bench.launch import launch, resolve_executor, stage_statuses, wait
    from lxmert_bench.plan import check_data

    specs, plan, workdir = _load(args)
    problems = check_data(plan) + _permission_problems(args, plan, workdir)  # before any write
    if problems:
        for p in problems:
            _err(p)
        return EXIT_INVALID
    resources = _resources(args, specs)
    if args.dry_run:
        _print_plan(plan, stage_statuses(plan, workdir), resources, False, None)
        print("\n(dry run: nothing submitted)")
        return EXIT_OK
    executor = resolve_executor(args.executor or specs[0].profile.executor)
    _remember(workdir, args, specs)
    report = launch(plan, workdir, executor, resources=resources, retry_failed=args.retry_failed,
                    parallelism=args.parallel, progress=not args.quiet)
    print(f"{len(report.submitted)} stage(s) submitted, {len(report.skipped_done)} already done, "
          f"{len(report.skipped_active)} already queued or running")
    for sid, why in report.blocked.items():
        print(f"  not submitted: {sid}: {why}")
    statuses = None
    if executor == "slurm" and args.wait and (report.submitted or report.skipped_active):
        statuses = wait(plan, workdir, progress=not args.quiet)
    elif executor == "slurm" and report.submitted:
        print(f"follow with: lxmert-bench status {' '.join(args.specs)}"
              + (f" --workdir {args.workdir}" if args.workdir else ""))
    if statuses is None:
        statuses = stage_statuses(plan, workdir)
    bad = {sid: s for sid, s in statuses.items() if s.state in ("failed", "cancelled", "orphaned")}
    for sid, s in bad.items():
        print(f"  {s.state}: {sid} {s.reason}".rstrip())
    if not args.no_report:
        for spec in specs:
            _write_report(spec, plan, workdir, None, statuses)
    return EXIT_FAILED if bad or report.blocked else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from lxmert_bench.launch import cancel_orphans, stage_statuses

    specs, plan, workdir = _load(args)
    statuses = stage_statuses(plan, workdir)
    cancel_orphans(plan, workdir, statuses)
    if args.json:
        print(json.dumps([{"stage": sid, "kind": plan.stages[sid].kind,
                           "what": plan.stages[sid].describe(), "state": s.state, "job_id": s.job_id,
                           "executor": s.executor, "reason": s.reason, "error_tail": s.error_tail}
                          for sid, s in statuses.items()], indent=2))
    else:
        from tabulate import tabulate

        rows = [[statuses[st.stage_id].state, st.stage_id,
                 st.describe() + " | " + ", ".join(dict.fromkeys(u[1] for u in st.users)),
                 statuses[st.stage_id].job_id or "", statuses[st.stage_id].reason]
                for st in _in_spec_order(plan)]
        print(tabulate(rows, headers=["state", "stage", "what", "job", "note"], tablefmt="simple"))
        for st in plan.ordered():
            s = statuses[st.stage_id]
            if s.error_tail:
                print(f"\n--- {s.state}: {st.stage_id} ({st.describe()})")
                print("    " + s.error_tail.replace("\n", "\n    "))
    return EXIT_FAILED if any(s.state in ("failed", "orphaned") for s in statuses.values()) else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from lxmert_bench.launch import cancel

    _, plan, workdir = _load(args)
    done = cancel(plan, workdir)
    print(f"cancelled {len(done)} stage(s)")
    for sid in done:
        print(f"  {sid}")
    return EXIT_OK


def _write_report(spec, plan, workdir: Path, out: str | None, statuses=None) -> Path | None:
    try:
        from lxmert_bench.report.harness import report_for_spec
    except ImportError as e:  # the report layer is optional while it is being built
        _err(f"report not written: {e}")
        return None
    path = report_for_spec(spec, plan, workdir, Path(out) if out else None, statuses)
    print(f"report: {path}")
    return path


def cmd_report(args: argparse.Namespace) -> int:
    specs, plan, workdir = _load(args)
    for spec in specs:
        if _write_report(spec, plan, workdir, args.out) is None:
            return EXIT_FAILED
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synthetic":
        from lxmert_bench.data.synthetic import synthetic_main

        return synthetic_main(args.out, args.images, args.seed)
    from lxmert_bench.data.store import convert_main

    return convert_main(args.tsv, args.out, args.fp16)


def cmd_stage(args: argparse.Namespace) -> int:
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    path = Path(args.run_dir).resolve()
    if not (path / "config.json").is_file():
        _err(f"{path}: not a run directory (no config.json)")
        return EXIT_INVALID
    run_stage(RunDir(path.parents[2], f"{path.parent.name}/{path.name}"))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "cancel": cmd_cancel,
            "report": cmd_report, "data": cmd_data, "stage": cmd_stage}


def main(argv: list[str] | None = None) -> int:
    from lxmert_bench.launch import LaunchError
    from lxmert_bench.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SpecError as e:
        for p in e.problems:
            _err(p)
        return EXIT_INVALID
    except LaunchError as e:
        _err(str(e))
        return EXIT_LAUNCH
    except FileNotFoundError as e:
        _err(str(e))
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err("interrupted; finished stages are kept, re-run the same command to continue")
        return 130


if __name__ == "__main__":
    sys.exit(main())
