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

from lxmert_bench.spec import EXECUTORS
from lxmert_bench.store import DONE, FAILED, INTERRUPTED, ORPHANED

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LAUNCH = 0, 1, 2, 3
NOT_FINISHED = (FAILED, INTERRUPTED, ORPHANED)  # after a run: states that make it exit 1


class InputError(Exception):
    """Bad input found by the CLI itself (a path, a selector): exit 2 with this message."""


def _err(msg: str) -> None:
    print(f"lxmert-bench: error: {msg}", file=sys.stderr)


def _note(msg: str) -> None:
    """Human-readable context on stderr, so it never mixes into --json output."""
    print(f"lxmert-bench: {msg}", file=sys.stderr)


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
        p.add_argument("--only", action="append", default=None, metavar="KEY=VALUE",
                       help="just part of the spec: variant=NAME, task=T, seed=S, kind=K or "
                            "stage=ID (repeatable; all must hold), with what it needs; stage ids "
                            "stay the same, so nothing is done twice")
        p.add_argument("--fresh", action="store_true",
                       help="ignore the options remembered from the spec's last run (profile, "
                            "--set, --slurm-profile); run remembers the new ones")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-bench",
        description="Benchmark and ablation harness for LXMERT: YAML spec -> plan -> jobs -> report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="plan and run (or submit) a spec's stages, then report")
    _add_common(run)
    run.add_argument("--executor", choices=EXECUTORS, default=None,
                     help="auto: Slurm when sbatch is on the PATH (default: the profile's)")
    run.add_argument("--dry-run", action="store_true", help="print the plan; submit nothing")
    run.add_argument("--wait", action="store_true", help="on Slurm, follow the jobs to the end")
    run.add_argument("--retry-failed", action="store_true",
                     help="also resubmit failed stages (interrupted ones resume without it)")
    run.add_argument("--rerun", action="append", default=[], metavar="SELECTOR",
                     help="run finished stages again: move their run directories (and their "
                          "dependents') to <workdir>/archive/ and plan them anew; SELECTOR is a "
                          "stage id or hash prefix, or KEY=VALUE,... over kind, variant, task, "
                          "seed (repeatable)")
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

    logs = sub.add_parser("logs", help="the tail of a stage's job stdout/stderr (submitit's files)")
    _add_logs_args(logs)

    clean = sub.add_parser("clean", help="free disk: remove finished stages' resume state "
                                         "(checkpoints/last.pt); keeps weights, predictions, logs")
    _add_common(clean)
    clean.add_argument("--dry-run", action="store_true", help="say what would be removed")

    export = sub.add_parser("export", help="a finished stage's weights as a transformers directory "
                                           "(LxmertForPreTraining / LxmertForQuestionAnswering)")
    export.add_argument("run", metavar="RUN",
                        help="a run directory (<workdir>/runs/<kind>/<hash>) or a stage id")
    export.add_argument("--hf", required=True, metavar="DIR",
                        help="output directory: missing, empty, or an earlier export")
    export.add_argument("--workdir", default=None, help="where stage ids are looked up (as for run)")

    predict = sub.add_parser("predict", help="test-split predictions (leaderboard files) of "
                                             "finished fine-tunings, from their best.pt")
    _add_common(predict)

    stage = sub.add_parser("stage", help="run one stage from its run directory (as a job does)")
    stage.add_argument("run_dir", help="<workdir>/runs/<kind>/<hash>")
    return parser


def _add_logs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="ablation spec YAML file")
    p.add_argument("variant", nargs="?", default=None, metavar="VARIANT",
                   help="only the stages this variant uses")
    p.add_argument("--stage", dest="kind", choices=["bert", "pretrain", "finetune"], default=None,
                   help="only stages of this kind")
    p.add_argument("--task", default=None, help="only fine-tunings on this task (vqa, gqa, nlvr2)")
    p.add_argument("--tail", type=int, default=40, metavar="N",
                   help="last N lines of each file (0: all; default 40)")
    p.add_argument("--workdir", default=None, help="as for run (default ./runs or $LXMERT_BENCH_WORKDIR)")
    p.add_argument("--profile", default=None, help="as for run (default: the remembered one)")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--slurm-profile", default=None)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--allow-group-write", action="store_true")


# ---------------------------------------------------------------------------------------------
def _workdir(args: argparse.Namespace) -> Path:
    from lxmert_bench.store import default_workdir

    return Path(args.workdir) if args.workdir else default_workdir()


def _memory_path(workdir: Path, spec_path: str) -> Path:
    return workdir / "specs" / (Path(spec_path).stem + ".json")


def _remembered(workdir: Path, spec_path: str) -> dict[str, Any]:
    """The options this spec file was last run with in this workdir ({} if none, or if they
    belong to another spec file of the same name)."""
    from lxmert_bench.io import read_json

    p = _memory_path(workdir, spec_path)
    try:
        mem = read_json(p) if p.is_file() else {}
    except ValueError:
        return {}
    if not isinstance(mem, dict) or mem.get("spec") != str(Path(spec_path).resolve()):
        return {}
    return mem


def _check_workdir(args: argparse.Namespace, workdir: Path) -> None:
    """Say where the workdir is (first line of human output, on stderr); refuse one that is a file
    or, for ``run``, cannot be written."""
    import os

    where = workdir.resolve()
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {where}: is a file, expected a directory")
    if args.command == "run" and not getattr(args, "dry_run", False):
        parent = where
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"--workdir {where}: {parent} is not writable (read-only filesystem "
                             "or no permission); choose a workdir you can write")
    elif not workdir.is_dir():
        _note(f"workdir {where} (does not exist: nothing has run here; pass --workdir or set "
              "LXMERT_BENCH_WORKDIR to look elsewhere)")
        return
    _note(f"workdir {where}")


def _adopt_legacy(workdir: Path) -> None:
    """Once per workdir: finished runs planned under the old source-hash code versions keep their
    results under the declared code version (store.adopt_legacy_runs)."""
    from lxmert_bench.launch import workdir_lock
    from lxmert_bench.plan import code_version
    from lxmert_bench.store import adopt_legacy_runs

    if not (workdir / "runs").is_dir():
        return
    try:
        with workdir_lock(workdir):
            adopted = adopt_legacy_runs(workdir, code_version())
    except OSError as e:  # e.g. a colleague's workdir we may only read
        _note(f"finished runs of an older version not adopted ({e.strerror}: {e.filename})")
        return
    if adopted:
        _note(f"adopted {len(adopted)} finished run(s) planned before code versions were declared "
              f"as code version {code_version()} (each has an adopted.json; old names forward)")


def _load(args: argparse.Namespace) -> tuple[list, Any, Path]:
    """Specs + plan. Every command reuses the profile, --set and --slurm-profile a spec was last
    run with (unless given, or --fresh), and says so."""
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    workdir = _workdir(args)
    _check_workdir(args, workdir)
    _adopt_legacy(workdir)
    specs = []
    args.effective = {}
    for path in args.specs:
        mem = {} if getattr(args, "fresh", False) else _remembered(workdir, path)
        profile = args.profile or mem.get("profile")
        overrides = args.overrides if args.overrides is not None else mem.get("overrides")
        slurm = getattr(args, "slurm_profile", None) or mem.get("slurm_profile")
        used = []
        if not args.profile and mem.get("profile"):
            used.append(f"--profile {mem['profile']}")
        if args.overrides is None and mem.get("overrides"):
            used += [f"--set {o}" for o in mem["overrides"]]
        if not getattr(args, "slurm_profile", None) and mem.get("slurm_profile"):
            used.append(f"--slurm-profile {mem['slurm_profile']}")
        if used:
            _note(f"{Path(path).name}: using the options of its last run: {' '.join(used)} "
                  f"(from {_memory_path(workdir, path)}; give other ones, or --fresh to forget them)")
        spec = load_spec(path, profile, overrides)
        args.effective[spec.path] = {"profile": _profile_arg(spec.profile),
                                     "overrides": list(overrides or []), "slurm_profile": slurm}
        specs.append(spec)
    plan = make_plan(specs, workdir)
    if getattr(args, "only", None):
        from lxmert_bench.plan import restrict

        plan = restrict(plan, args.only)
        _note(f"--only {' '.join(args.only)}: {len(plan.stages)} stage(s) of the plan")
    return specs, plan, workdir


def _profile_arg(profile) -> str:
    """How to name a profile on the command line: a shipped one by name, others by path."""
    from lxmert_bench.spec import PROFILE_DIR

    shipped = profile.path and Path(profile.path).parent == PROFILE_DIR
    return profile.name if shipped or not profile.path else profile.path


def _remember(workdir: Path, args: argparse.Namespace, specs: list) -> None:
    """Keep the options in force (given or remembered), so the next command runs the same."""
    from lxmert_bench.io import atomic_write_json

    for spec in specs:
        atomic_write_json(_memory_path(workdir, spec.path), {
            "spec": str(Path(spec.path).resolve()), **args.effective[spec.path],
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

    remembered = getattr(args, "effective", {}).get(specs[0].path, {}).get("slurm_profile")
    return load_resource_profile(args.slurm_profile or remembered or specs[0].profile.slurm_profile)


def _in_spec_order(plan) -> list:
    """Stages by level, then in the order of the specs' variants, tasks and seeds."""
    rank: dict[str, int] = {}
    for i, e in enumerate(plan.entries):
        for sid in (e.bert, e.pretrain, e.finetune):
            if sid:
                rank.setdefault(sid, i)
    return sorted(plan.stages.values(), key=lambda st: (st.level, rank.get(st.stage_id, 0)))


def _print_plan(plan, statuses, resources, as_json: bool, test_only: dict[str, str] | None) -> None:
    from lxmert_bench.launch import gpu_count
    from lxmert_bench.plan import estimate_gpu_hours

    rows = []
    for st in _in_spec_order(plan):
        s = statuses[st.stage_id]
        res = resources.for_kind(st.kind)
        hours = estimate_gpu_hours(st.config, resources.throughput)
        variants = list(dict.fromkeys(u[1] for u in st.users))
        what = st.describe() + (f" | {', '.join(variants)}" if st.kind != "bert" else "")
        rows.append({
            "stage": st.stage_id, "kind": st.kind, "what": what, "state": s.state,
            "job_id": s.job_id, "shared_by": len({(u[0], u[1]) for u in st.users}),
            "used_by": [f"{u[0]}:{u[1]}:seed{u[2]}:{u[3]}" for u in st.users],
            "depends_on": st.deps, "gpus": gpu_count(res) * int(res.get("nodes") or 1),
            "time_min": res.get("timeout_min"), "gpu_hours": None if hours is None else round(hours, 2),
        })
    # None: no measured samples/s for the stage in the slurm profile's throughput table
    todo_hours = sum(r["gpu_hours"] or 0.0 for r in rows if r["state"] != DONE)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    from lxmert_bench.plan import plan_notes

    notes = plan_notes(plan)
    if as_json:
        print(json.dumps({"stages": rows, "counts": counts, "gpu_hours_to_run": round(todo_hours, 1),
                          "sbatch_test_only": test_only or {}, "notes": notes}, indent=2))
        return
    from tabulate import tabulate

    spec = plan.specs[0]
    print(f"Plan for {', '.join(s.name for s in plan.specs)} (profile: {spec.profile.name}, "
          f"resources: {resources.name})")
    for note in notes:
        print(note)
    table = [[r["state"], r["kind"], r["stage"].split("/")[1], r["what"],
              f"{r['shared_by']} variants" if r["shared_by"] > 1 else "",
              f"{r['gpus']} GPU, {r['time_min']} min" if r["gpus"] else f"CPU, {r['time_min']} min",
              "not measured" if r["gpu_hours"] is None else
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
    problems += _resource_problems(args, plan, resources, specs)
    statuses = stage_statuses(plan, workdir)
    test_only = None
    if getattr(args, "test_only", False):
        test_only = sbatch_test_only(resources, sorted({s.kind for s in plan.stages.values()}))
    _print_plan(plan, statuses, resources, getattr(args, "json", False), test_only)
    for p in problems:
        _err(p)
    return EXIT_INVALID if problems else EXIT_OK


def _resource_problems(args: argparse.Namespace, plan, resources, specs: list) -> list[str]:
    """Requests Slurm could never satisfy (launch.check_resources), when the plan is for Slurm
    (its executor, or a --slurm-profile given or remembered); `run` refuses the same ones before
    submitting."""
    import shutil

    from lxmert_bench.launch import check_resources

    executor = specs[0].profile.executor
    slurm = executor == "slurm" or (executor == "auto" and shutil.which("sbatch")) or bool(
        getattr(args, "effective", {}).get(specs[0].path, {}).get("slurm_profile"))
    return check_resources(plan, resources, None, "slurm" if slurm else executor)


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
        problems = _resource_problems(args, plan, resources, specs)
        for p in problems:  # what the real run would refuse
            _err(p)
        print("\n(dry run: nothing submitted)")
        return EXIT_INVALID if problems else EXIT_OK
    executor = resolve_executor(args.executor or specs[0].profile.executor)
    if args.rerun:
        _archive_for_rerun(plan, workdir, args.rerun)
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
        where = " ".join(args.specs) + (f" --workdir {args.workdir}" if args.workdir else "")
        print(f"follow with: lxmert-bench status {where}   (a stage's output: lxmert-bench logs "
              f"{where} [VARIANT] [--stage KIND] [--task T])")
    if statuses is None:
        statuses = stage_statuses(plan, workdir)
    bad = {sid: s for sid, s in statuses.items() if s.state in NOT_FINISHED}
    for sid, s in bad.items():
        print(f"  {s.state}: {sid} {s.reason}".rstrip())
    if any(s.state == INTERRUPTED for s in bad.values()):
        print("interrupted stages resume from their last checkpoint: re-run the same command")
    if args.only and not args.no_report:
        _note("no report for a selection (--only): `lxmert-bench report` writes the whole spec's")
    elif not args.no_report:
        for spec in specs:
            _write_report(spec, plan, workdir, None, statuses)
    return EXIT_FAILED if bad or report.blocked else EXIT_OK


def _archive_for_rerun(plan, workdir: Path, selectors: list[str]) -> None:
    """``run --rerun``: archive the selected stages and everything that depends on them."""
    from lxmert_bench.launch import stage_statuses
    from lxmert_bench.plan import match_stages
    from lxmert_bench.store import ACTIVE, RunDir

    chosen: list[str] = []
    for sel in selectors:
        for sid in match_stages(plan, sel):
            for s in (sid, *plan.dependents(sid)):
                if s not in chosen:
                    chosen.append(s)
    statuses = stage_statuses(plan, workdir)
    busy = [f"{s} ({statuses[s].state}{': ' + statuses[s].reason if statuses[s].reason else ''})"
            for s in chosen if statuses[s].state in ACTIVE]
    if busy:
        raise InputError("--rerun: these stages are queued or running; cancel them first: "
                         + ", ".join(busy))
    for sid in chosen:
        run = RunDir(workdir, sid)
        if run.path.exists():
            print(f"rerun {sid}: moved its run directory to {run.archive()}")


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
    return EXIT_FAILED if any(s.state in (FAILED, ORPHANED) for s in statuses.values()) else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from lxmert_bench.launch import cancel

    _, plan, workdir = _load(args)
    done = cancel(plan, workdir)
    print(f"cancelled {len(done)} stage(s)")
    for sid in done:
        print(f"  {sid}")
    return EXIT_OK


def stage_log_files(workdir: Path, stage_id: str) -> list[Path]:
    """The submitit stdout/stderr files of a stage's latest job (job.json: folder, job_id), every
    task's, rank 0 first; [] when it never ran as a job."""
    from lxmert_bench.launch import read_job

    rec = read_job(workdir, stage_id) or {}
    if not rec.get("folder") or not rec.get("job_id"):
        return []
    folder, job = Path(rec["folder"]), str(rec["job_id"])
    files = []
    for f in folder.glob(f"{job}_*_log.*"):
        task = f.name[len(job) + 1:].split("_log.", 1)[0]  # <job>_<task>_log.{out,err}
        if task.isdigit() and f.suffix in (".out", ".err"):
            files.append((int(task), f.suffix != ".out", f))
    return [f for *_, f in sorted(files)]


def cmd_logs(args: argparse.Namespace) -> int:
    from lxmert_bench.plan import match_stages

    args.specs = [args.spec]
    _, plan, workdir = _load(args)
    terms = [f"{k}={v}" for k, v in (("variant", args.variant), ("kind", args.kind),
                                     ("task", args.task)) if v]
    if args.task and not args.kind:
        terms.append("kind=finetune")  # a task names fine-tunings
    if args.tail < 0:
        raise InputError(f"--tail {args.tail}: expected N >= 0")
    variants = list(dict.fromkeys(u[1] for st in plan.ordered() for u in st.users))
    if args.variant and args.variant not in variants:
        raise InputError(f"variant {args.variant!r} is not in {args.spec} (variants: "
                         f"{', '.join(variants)})")
    chosen = match_stages(plan, ",".join(terms)) if terms else [st.stage_id for st in plan.ordered()]
    for sid in chosen:
        files = stage_log_files(workdir, sid)
        print(f"=== {sid} ({plan.stages[sid].describe()})")
        if not files:
            print("    (no job logs: the stage has not been submitted or run as a job)")
        for f in files:
            lines = f.read_text(errors="replace").splitlines()
            part = lines[-args.tail:] if args.tail else lines
            print(f"--- {f} (last {len(part)} of {len(lines)} lines)")
            for line in part:
                print(line)
    return EXIT_OK


RESUME_STATE = ("checkpoints/last.pt",)  # what a finished stage no longer needs (store.py)


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove finished stages' resume state. Only stages whose result.json exists and whose
    execution lock nobody holds; only the files in RESUME_STATE, which the training loop writes."""
    from lxmert_bench.io import human_bytes
    from lxmert_bench.launch import stage_statuses
    from lxmert_bench.store import DONE, RunDir

    _, plan, workdir = _load(args)
    statuses = stage_statuses(plan, workdir, query_scheduler=False)
    freed, files = 0, 0
    for st in plan.ordered():
        run = RunDir(workdir, st.stage_id)
        if statuses[st.stage_id].state != DONE or run.lock_holder() is not None:
            continue
        for rel in RESUME_STATE:
            path = run.path / rel
            if not path.is_file() or path.is_symlink():
                continue
            size = path.stat().st_size
            if not args.dry_run:
                path.unlink()
            freed += size
            files += 1
            print(f"{'would remove' if args.dry_run else 'removed'} {path} ({human_bytes(size)})")
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {human_bytes(freed)} ({freed} bytes) in {files} file(s); kept model.pt, best.pt, "
          "predictions and logs")
    return EXIT_OK


def _write_report(spec, plan, workdir: Path, out: str | None, statuses=None) -> Path:
    from lxmert_bench.report.harness import report_for_spec

    path = report_for_spec(spec, plan, workdir, Path(out) if out else None, statuses)
    print(f"report: {path}")
    return path


def cmd_report(args: argparse.Namespace) -> int:
    specs, plan, workdir = _load(args)
    for spec in specs:
        _write_report(spec, plan, workdir, args.out)
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synthetic":
        return _data_synthetic(args.out, args.images, args.seed)
    return _data_convert(args.tsv, args.out, args.fp16)


def _data_synthetic(out: str, images: int, seed: int) -> int:
    """``data synthetic``: refuses (exit 2) a DIR that holds anything but this very benchmark."""
    from lxmert_bench.data.synthetic import MARKER, ensure_synthetic_root
    from lxmert_bench.io import read_json

    try:
        created = ensure_synthetic_root(out, images, seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not created:
        print(f"{out}: already holds this synthetic benchmark; nothing written", file=sys.stderr)
    print(json.dumps(read_json(Path(out) / MARKER), indent=2))
    return EXIT_OK


def _data_convert(tsv_paths: list[str], out: str, fp16: bool) -> int:
    """``data convert``: a memory-mapped store of the TSVs, reused when it is there already."""
    import time

    from lxmert_bench.data.features import FeatureFormatError
    from lxmert_bench.data.store import StoreError, build_stamp, ensure_store
    from lxmert_bench.io import human_bytes

    missing = [p for p in tsv_paths if not Path(p).is_file()]
    if missing:
        raise InputError("; ".join(f"{p}: feature file not found (expected an obj36 TSV)"
                                   for p in missing))
    before, start = build_stamp(Path(out)), time.perf_counter()
    try:
        store = ensure_store(tsv_paths, out, feature_dtype="float16" if fp16 else "float32")
    except (FeatureFormatError, StoreError, ValueError) as e:
        raise InputError(str(e)) from None
    took = time.perf_counter() - start
    action = "reused" if before and before == build_stamp(store.path) else f"converted in {took:.1f}s"
    print(f"{store.path}: {len(store)} images x {store.num_boxes} boxes x {store.feature_dim} "
          f"{store.feature_dtype}, {human_bytes(store.nbytes())} on disk, "
          f"fingerprint {store.fingerprint[:16]} ({action})")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from lxmert_bench.export import export_run

    done = export_run(args.run, Path(args.hf), _workdir(args))
    print(f"{done['stage_id']}: exported {done['weights']} as transformers {done['architecture']} "
          f"into {args.hf}")
    for f in done["files"]:
        print(f"  {f}")
    if done["architecture"] == "LxmertForQuestionAnswering" and not done["id2label"]:
        _note("the answer table under the run's data.root was not readable (or does not match the "
              "head): config.json has transformers' default labels LABEL_0...")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    """Test-split predictions of the selected finished fine-tunings (train/finetune.py)."""
    from lxmert_bench.launch import stage_statuses
    from lxmert_bench.store import DONE, RunDir, StageBusy
    from lxmert_bench.train.finetune import predict_finished

    _, plan, workdir = _load(args)
    stages = [st for st in plan.ordered() if st.kind == "finetune"]
    if not stages:
        raise InputError("the selection names no fine-tuning stage; test splits are predicted by "
                         "fine-tunings (try --only task=vqa)")
    statuses = stage_statuses(plan, workdir, query_scheduler=False)
    missed = 0
    for st in stages:
        run = RunDir(workdir, st.stage_id)
        state = statuses[st.stage_id].state
        print(f"{st.stage_id} ({st.describe()}):")
        if state != DONE:
            print(f"  {state}: not finished, nothing to predict from (`lxmert-bench run` first)")
            missed += 1
            continue
        try:
            done = predict_finished(run)
        except (StageBusy, OSError, ValueError) as e:  # a busy stage, a missing or unreadable file
            print(f"  {e}")
            missed += 1
            continue
        for split, entry in done["splits"].items():
            scored = "".join(f", {k} {v:.2f}" for k, v in (entry.get("metrics") or {}).items()
                             if isinstance(v, (int, float)))
            print(f"  {split}: {run.path / entry['file']} ({entry['leaderboard']}; "
                  f"{entry['examples']} of {entry['records']} examples{scored})")
        for split, why in done["absent"].items():
            print(f"  {split}: absent ({why})")
    return EXIT_FAILED if missed else EXIT_OK


def cmd_stage(args: argparse.Namespace) -> int:
    from lxmert_bench.train.stages import main as stage_main

    return stage_main([args.run_dir])


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "cancel": cmd_cancel,
            "report": cmd_report, "data": cmd_data, "stage": cmd_stage, "logs": cmd_logs,
            "clean": cmd_clean, "export": cmd_export, "predict": cmd_predict}


# The exceptions that mean bad input (exit 2), by home module. They are looked up only in modules
# already imported, where alone they can have been raised, so that a command does not import the
# report's pandas / seaborn or torch just to name their errors (`plan --help` in 0.3 s, not 3.5 s).
INPUT_ERRORS = (
    ("lxmert_bench.data.synthetic", "DataRootError"), ("lxmert_bench.plan", "SelectorError"),
    ("lxmert_bench.report.harness", "ReportDirError"), ("lxmert_bench.launch", "ResourceError"),
    ("lxmert_bench.export", "ExportError"), ("lxmert_bench.model.hf", "ExportDirError"),
)
LAUNCH_ERRORS = (("lxmert_bench.launch", "LaunchError"),)  # the scheduler refused (exit 3)


def _loaded(errors: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in errors
                 if module in sys.modules)


def main(argv: list[str] | None = None) -> int:
    from lxmert_bench.spec import SpecError
    from lxmert_bench.store import StageBusy

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SpecError as e:
        for p in e.problems:
            _err(p)
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err("interrupted; finished stages are kept and interrupted ones resume from their last "
             "checkpoint: re-run the same command to continue")
        return 130
    except Exception as e:
        if isinstance(e, (InputError, FileNotFoundError, NotADirectoryError,
                          *_loaded(INPUT_ERRORS))):
            _err(str(e))
            return EXIT_INVALID
        if isinstance(e, _loaded(LAUNCH_ERRORS)):
            _err(str(e))
            return EXIT_LAUNCH
        if isinstance(e, StageBusy):
            _err(str(e))
            return EXIT_FAILED
        if isinstance(e, OSError):  # a full disk, a vanished mount: the system's words, the file
            where = f"{e.filename}: " if e.filename else ""
            _err(f"{where}{e.strerror or e}; nothing finished was lost (results are written last)")
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
