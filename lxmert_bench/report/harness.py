"""From a harness plan to a report: the spec's variants, tasks and seeds as report entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxmert_bench.launch import StageStatus, stage_statuses
from lxmert_bench.plan import Plan
from lxmert_bench.report.collect import ReportEntry, ReportSpec
from lxmert_bench.spec import Spec


def report_spec(spec: Spec) -> ReportSpec:
    from lxmert_bench.spec import axis_label, format_value

    keys = [k for k, _ in spec.axes]
    return ReportSpec(
        name=spec.name, title=spec.title, variants=[v.name for v in spec.variants],
        tasks=list(spec.tasks), reference=spec.reference, reference_variant=spec.reference_variant,
        profile=spec.profile.name,
        notes={"profile_description": spec.profile.description, "spec_path": spec.path,
               "seeds": list(spec.seeds), "overrides": dict(spec.cli_overrides)},
        axes={axis_label(k, keys): [format_value(x) for x in values] for k, values in spec.axes},
        cells={v.name: (v.group, {axis_label(k, keys): format_value(x) for k, x in v.axis_values})
               for v in spec.variants if v.axis_values},
    )


def report_entries(spec: Spec, plan: Plan, statuses: dict[str, StageStatus]) -> list[ReportEntry]:
    return [
        ReportEntry(variant=e.variant, seed=e.seed, task=e.task, finetune_stage=e.finetune,
                    pretrain_stage=e.pretrain, bert_stage=e.bert,
                    state=statuses[e.finetune].state)
        for e in plan.entries if e.spec == spec.name
    ]


class ReportDirError(ValueError):
    """A report folder that holds somebody else's files or another spec's report."""


OWNER_FILE = ".lxmert-bench-report.json"  # which spec file a report folder belongs to
_REPORT_FILES = ("report.md", "results.jsonl", OWNER_FILE)  # and *.png: what write_report makes


def claim_report_dir(out_dir: Path, spec: Spec) -> None:
    """Make ``out_dir`` this spec's report folder, or refuse: the tool writes only into a missing
    or empty folder, one it marked as this spec file's, or an unmarked one holding only the files
    a report consists of (reports written before the mark existed)."""
    from lxmert_bench.io import atomic_write_json, read_json
    from lxmert_bench.owner import remove_dead_temporaries

    me = str(Path(spec.path).resolve())
    owner_path = out_dir / OWNER_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportDirError(f"{out_dir}: is a file, expected a report folder (pass --out DIR)")
    if owner_path.is_file():
        try:
            owner = read_json(owner_path).get("spec")
        except (ValueError, AttributeError):
            owner = None
        if owner != me:
            raise ReportDirError(
                f"{out_dir}: holds the report of {owner or 'an unknown spec'} ({OWNER_FILE}); "
                f"{me} has the same name: {spec.name!r}. Rename one spec, or pass --out DIR")
        return
    if out_dir.is_dir():
        remove_dead_temporaries(out_dir / "report.md")  # of a report writer that was killed
        foreign = sorted(p.name for p in out_dir.iterdir()
                         if p.name not in _REPORT_FILES and p.suffix != ".png"
                         and not p.name.startswith(".report.md.tmp-"))  # one being written
        if foreign:
            raise ReportDirError(f"{out_dir}: holds files that are not a report of lxmert-bench "
                                 f"({', '.join(foreign[:5])}); pass --out DIR for the report")
    atomic_write_json(owner_path, {"spec": me, "name": spec.name})


def report_for_spec(spec: Spec, plan: Plan, workdir: Path, out_dir: Path | None = None,
                    statuses: dict[str, Any] | None = None) -> Path:
    """Write ``results/<spec name>/`` (or ``out_dir``): report.md, results.jsonl, PNG plots."""
    from lxmert_bench.report.render import write_report

    statuses = statuses or stage_statuses(plan, workdir)
    out_dir = out_dir or Path("results") / spec.name
    claim_report_dir(out_dir, spec)
    return write_report(report_spec(spec), report_entries(spec, plan, statuses), workdir, out_dir)
