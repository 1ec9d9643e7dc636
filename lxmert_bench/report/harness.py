"""From a harness plan to a report: the spec's variants, tasks and seeds as report entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxmert_bench.launch import StageStatus, stage_statuses
from lxmert_bench.plan import Plan
from lxmert_bench.report.collect import ReportEntry, ReportSpec
from lxmert_bench.spec import Spec

# harness states -> report states ('orphaned' stages never ran: their dependency failed;
# 'interrupted' ones resume on the next run)
_STATE = {"done": "done", "failed": "failed", "running": "running", "queued": "pending",
          "to run": "pending", "interrupted": "pending", "orphaned": "cancelled"}


def report_spec(spec: Spec) -> ReportSpec:
    return ReportSpec(
        name=spec.name, title=spec.title, variants=[v.name for v in spec.variants],
        tasks=list(spec.tasks), reference=spec.reference, reference_variant=spec.reference_variant,
        profile=spec.profile.name,
        notes={"profile_description": spec.profile.description, "spec_path": spec.path,
               "seeds": list(spec.seeds), "overrides": dict(spec.cli_overrides)},
    )


def report_entries(spec: Spec, plan: Plan, statuses: dict[str, StageStatus]) -> list[ReportEntry]:
    return [
        ReportEntry(variant=e.variant, seed=e.seed, task=e.task, finetune_stage=e.finetune,
                    pretrain_stage=e.pretrain, bert_stage=e.bert,
                    state=_STATE.get(statuses[e.finetune].state, "pending"))
        for e in plan.entries if e.spec == spec.name
    ]


def report_for_spec(spec: Spec, plan: Plan, workdir: Path, out_dir: Path | None = None,
                    statuses: dict[str, Any] | None = None) -> Path:
    """Write ``results/<spec name>/`` (or ``out_dir``): report.md, results.jsonl, PNG plots."""
    from lxmert_bench.report.render import write_report

    statuses = statuses or stage_statuses(plan, workdir)
    out_dir = out_dir or Path("results") / spec.name
    return write_report(report_spec(spec), report_entries(spec, plan, statuses), workdir, out_dir)
