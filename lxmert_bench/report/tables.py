"""Markdown tables from the collected frame: the paper's layout, mean ± std over seeds, paper beside.

Every cell of a planned run is shown: a number (``mean ± std (n=K)``, sample std over the seeds
done), a number with what is still missing (``69.90 ± 0.10 (n=2) · running (2/3 done)``), or only
the state (``failed (0/3 done)``); a variant without runs for a task says ``— (no runs)``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd
from tabulate import tabulate

from lxmert_bench.metrics import PRETRAIN_DIAGNOSTICS
from lxmert_bench.report.collect import MAIN_METRIC, ReportSpec
from lxmert_bench.report.paper import paper_table, paper_value
from lxmert_bench.report.significance import Comparison
from lxmert_bench.store import DONE, NOT_DONE_WORST_FIRST

TASK_LABELS = {"vqa": "VQA", "gqa": "GQA", "nlvr2": "NLVR²"}
METRIC_LABELS = {
    "accuracy": "accuracy", "yes/no": "yes/no", "number": "number", "other": "other",
    "binary": "binary", "open": "open", "consistency": "consistency",
    "validity": "validity", "plausibility": "plausibility", "distribution": "distribution",
    "loss": "total", "mlm": "masked LM", "matched": "matching", "obj": "obj label",
    "attr": "attr label", "feat": "RoI feat", "qa": "image QA",
    "matched_accuracy": "matching accuracy (%)", "mlm_own_image": "masked LM, own image",
    "mlm_other_image": "masked LM, another image",
}
DETAIL_METRICS = {
    "vqa": ("accuracy", "yes/no", "number", "other"),
    "gqa": ("accuracy", "binary", "open", "consistency", "validity", "plausibility",
            "distribution"),
    "nlvr2": ("accuracy", "consistency"),
    "pretrain": ("loss", "mlm", "matched", "obj", "attr", "feat", "qa"),
}
SIG_MARK = "†"
NO_RUNS = "— (no runs)"


class Summary:
    """Per-cell statistics of a collected frame, computed once for all tables."""

    def __init__(self, frame: pd.DataFrame):
        done = frame[frame["state"] == DONE]
        grouped = done.groupby(["kind", "variant", "task", "metric"], sort=False)["value"]
        self.values: dict[tuple, list[float]] = {k: list(v) for k, v in grouped}
        runs = frame.drop_duplicates(["kind", "variant", "task", "stage"])
        self.states: dict[tuple, Counter] = {
            k: Counter(g["state"]) for k, g in runs.groupby(["kind", "variant", "task"], sort=False)
        }
        self.metrics: dict[tuple, set[str]] = {}
        for kind, _variant, task, metric in self.values:
            self.metrics.setdefault((kind, task), set()).add(metric)

    def cell(self, kind: str, variant: str, task: str, metric: str) -> list[float]:
        return self.values.get((kind, variant, task, metric), [])

    def state(self, kind: str, variant: str, task: str) -> Counter:
        return self.states.get((kind, variant, task), Counter())

    def variants(self, spec: ReportSpec, kind: str = "finetune") -> list[str]:
        """The spec's variants in order, then any other variant found in the runs (never dropped)."""
        extra = [v for (k, v, _t) in self.states if k == kind and v not in spec.variants]
        return list(dict.fromkeys([*spec.variants, *extra]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def status_text(states: Counter) -> str:
    """E.g. 'running (2/3 done)' or 'failed 1, pending 1 (1/3 done)'; '' when all are done."""
    total, done = sum(states.values()), states.get(DONE, 0)
    open_ = [(s, states[s]) for s in NOT_DONE_WORST_FIRST if states.get(s)]
    if not open_:
        return ""
    if len(open_) == 1:
        words = open_[0][0]
    else:
        words = ", ".join(f"{s} {c}" for s, c in open_)
    return f"{words} ({done}/{total} done)"


def format_cell(values: Sequence[float], states: Counter, digits: int = 2, bold: bool = False,
                mark: str = "") -> str:
    """One table cell: the statistics of the seeds done and the state of the others."""
    if not states and not values:
        return NO_RUNS
    status = status_text(states)
    if not values:
        return status or "—"
    mean, std = mean_std(values)
    text = f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if bold:
        text = f"**{text}**"
    text = f"{text}{mark} (n={len(values)})"
    return f"{text} · {status}" if status else text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Inline Markdown (CommonMark + GitHub's strikethrough and math) and HTML: emphasis, code, links,
# images, autolinks, raw HTML, entities, heading closers. '|' is left to markdown_table.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&~$#])")


def md_text(value: object) -> str:
    """Text from a spec, a config or a run (variant names, --set values, errors) as literal
    Markdown: one line (control characters become spaces) with every character that could start
    markup or HTML backslash-escaped, so it renders exactly as written and never as a link, an
    image, a tag or a new block."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _CONTROL.sub(" ", str(value)))


def md_code(value: object) -> str:
    """``value`` as an inline code span (one line; a fence longer than any backtick run in it)."""
    text = _CONTROL.sub(" ", str(value))
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _escape(text: str) -> str:
    """A table cell: one line, '|' escaped (also inside code spans, as GFM wants)."""
    return _CONTROL.sub(" ", str(text)).replace("|", "\\|")


def _best(means: Mapping[str, float], higher_is_better: bool) -> set[str]:
    finite = {k: m for k, m in means.items() if not math.isnan(m)}
    if not finite:
        return set()
    target = max(finite.values()) if higher_is_better else min(finite.values())
    return {k for k, m in finite.items() if round(m, 6) == round(target, 6)}


def markdown_table(headers: list[str], rows: list[list[str]],
                   align: Sequence[str] | None = None) -> str:
    """A pipe table (GitHub Markdown); default alignment: first column left, the others right."""
    align = tuple(align) if align is not None else ("left",) + ("right",) * (len(headers) - 1)
    return tabulate([[_escape(c) for c in r] for r in rows], headers=[_escape(h) for h in headers],
                    tablefmt="pipe", disable_numparse=True, colalign=align)


def _paper_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main_table(summary: Summary, spec: ReportSpec,
               comparisons: Mapping[tuple[str, str], Comparison] | None = None,
               digits: int = 2) -> str:
    """The paper's layout: rows = variants, columns = each task's main metric (+ the paper's)."""
    comparisons = comparisons or {}
    variants = summary.variants(spec)
    headers = ["Variant"]
    for task in spec.tasks:
        headers.append(f"{TASK_LABELS[task]} ↑")
        if spec.reference:
            headers.append(f"{TASK_LABELS[task]} paper")
    best = {task: _best({v: mean_std(summary.cell("finetune", v, task, MAIN_METRIC))[0]
                         for v in variants}, True) for task in spec.tasks}
    rows = []
    for v in variants:
        name = f"{md_text(v)} (ref.)" if v == spec.reference_variant else md_text(v)
        row = [name]
        for task in spec.tasks:
            comp = comparisons.get((v, task))
            mark = SIG_MARK if comp is not None and comp.significant else ""
            row.append(format_cell(summary.cell("finetune", v, task, MAIN_METRIC),
                                   summary.state("finetune", v, task), digits,
                                   bold=v in best[task], mark=mark))
            if spec.reference:
                row.append(_paper_text(paper_value(spec.reference, v, task)))
        rows.append(row)
    return markdown_table(headers, rows)


def main_table_legend(spec: ReportSpec, has_comparisons: bool, n_resamples: int = 10_000) -> str:
    lines = [
        "Cells: dev-set accuracy (%), mean ± sample std over the seeds done (n = seeds); "
        "the best mean per column in **bold**; runs not done are named with their state.",
    ]
    if spec.reference:
        t = paper_table(spec.reference)
        lines.append(f"*paper*: Tan & Bansal (2019), {t.caption} ({t.split}); "
                     "— where the paper has no such row or number.")
    if spec.reference_variant and has_comparisons:
        lines.append(
            f"{SIG_MARK}: significantly different from the reference row *{md_text(spec.reference_variant)}* "
            "at 95% (two-sided; paired t-test over seeds with ≥ 3 paired seeds, otherwise a paired "
            f"bootstrap over dev examples, {n_resamples:,} resamples). See the significance table.")
    return "\n".join(f"- {line}" for line in lines)


def significance_table(comparisons: Mapping[tuple[str, str], Comparison], digits: int = 2) -> str:
    headers = ["Variant", "Task", "Δ vs ref. (points)", "95% CI", "p", "test", "paired", "sig."]
    rows = []
    for (variant, task), c in comparisons.items():
        nan = math.isnan(c.diff)
        ci = "—" if math.isnan(c.ci_low) else f"[{c.ci_low:+.{digits}f}, {c.ci_high:+.{digits}f}]"
        paired = f"{c.seeds} seed{'' if c.seeds == 1 else 's'}" + (
            f", {c.examples} examples" if c.examples else "")
        test = c.method if not c.note else f"{c.method}: {c.note}"
        p = "—" if math.isnan(c.p_value) else (f"{c.p_value:.3g}" if c.p_value >= 1e-4 else "<1e-4")
        rows.append([md_text(variant), md_text(TASK_LABELS.get(task, task)),
                     "—" if nan else f"{c.diff:+.{digits}f}",
                     ci, p, test, paired, "yes " + SIG_MARK if c.significant else "no"])
    align = ("left", "left", "right", "right", "right", "left", "left", "left")
    return markdown_table(headers, rows, align)


def _metric_label(metric: str) -> str:
    # per-type keys (GQA "structural/query") are shown under a table titled by their family
    return METRIC_LABELS.get(metric, metric.split("/", 1)[1] if metric.startswith(GQA_TYPE_PREFIXES)
                             else metric)


def metric_table(summary: Summary, spec: ReportSpec, kind: str, task: str,
                 metrics: Sequence[str] | None = None, higher_is_better: bool = True,
                 digits: int = 2, no_bold: Sequence[str] = (),
                 lower_is_better: Sequence[str] = ()) -> str:
    """Rows = variants, columns = ``metrics`` of ``task`` (those any run reported, in a fixed
    order; the main metric always); best per column in bold, except in ``no_bold`` columns;
    ``lower_is_better`` columns go the other way from ``higher_is_better``."""
    present = summary.metrics.get((kind, task), set())
    wanted = metrics if metrics is not None else DETAIL_METRICS.get(task, ())
    cols = [m for m in wanted if m in present or m == wanted[0]]
    cols += sorted(present - set(cols)) if metrics is None else []
    variants = summary.variants(spec, kind) if kind == "finetune" else _pretrain_variants(summary, spec)
    higher = {m: higher_is_better != (m in lower_is_better) for m in cols}
    headers = ["Variant", *[f"{_metric_label(m)} {'↑' if higher[m] else '↓'}" for m in cols]]
    best = {m: set() if m in no_bold else
            _best({v: mean_std(summary.cell(kind, v, task, m))[0] for v in variants},
                  higher[m]) for m in cols}
    rows = []
    for v in variants:
        states = summary.state(kind, v, task)
        if kind == "pretrain" and not states:
            rows.append([md_text(v), *["no pretraining"] * len(cols)])
            continue
        rows.append([md_text(v), *[format_cell(summary.cell(kind, v, task, m), states, digits,
                                      bold=v in best[m]) for m in cols]])
    return markdown_table(headers, rows)


def _pretrain_variants(summary: Summary, spec: ReportSpec) -> list[str]:
    extra = [v for (k, v, _t) in summary.states if k in ("finetune", "pretrain")
             and v not in spec.variants]
    return list(dict.fromkeys([*spec.variants, *extra]))


def pretraining_table(summary: Summary, spec: ReportSpec, digits: int = 3) -> str:
    """Final pretraining losses (mean valid loss per task) per variant; lower is better. The total
    sums the losses of the tasks a variant trains, so it is not compared (no bold) across rows."""
    present = summary.metrics.get(("pretrain", "pretrain"), set())
    losses = DETAIL_METRICS["pretrain"]
    losses += tuple(sorted(present - set(losses) - set(PRETRAIN_DIAGNOSTICS)))
    return metric_table(summary, spec, "pretrain", "pretrain", losses, higher_is_better=False,
                        digits=digits, no_bold=("loss",))


def pretraining_diagnostics_table(summary: Summary, spec: ReportSpec) -> str | None:
    """Per variant, at the end of pretraining on the validation split: the image-sentence matching
    accuracy and the masked-LM loss of the matched pairs with their own image and with another
    (the gap says how much the language side reads the image). None when no run logged them."""
    present = summary.metrics.get(("pretrain", "pretrain"), set())
    if not present & set(PRETRAIN_DIAGNOSTICS):
        return None
    return metric_table(summary, spec, "pretrain", "pretrain", PRETRAIN_DIAGNOSTICS,
                        higher_is_better=True, digits=3, lower_is_better=("mlm_own_image",),
                        no_bold=("mlm_other_image",))


GQA_TYPE_PREFIXES = ("structural/", "semantic/")
GQA_TYPE_TITLES = {"structural/": "GQA accuracy per structural type",
                   "semantic/": "GQA accuracy per semantic type"}


def gqa_tables(summary: Summary, spec: ReportSpec, digits: int = 2) -> dict[str, str]:
    """GQA: accuracy, binary / open and the official evaluator's metrics (distribution: lower is
    better), then accuracy per structural and per semantic type when the runs had the official
    question files."""
    present = summary.metrics.get(("finetune", "gqa"), set())
    main = [*DETAIL_METRICS["gqa"], *sorted(m for m in present if m not in DETAIL_METRICS["gqa"]
                                            and not m.startswith(GQA_TYPE_PREFIXES))]
    out = {"GQA": metric_table(summary, spec, "finetune", "gqa", main, True, digits,
                               lower_is_better=("distribution",))}
    for prefix, title in GQA_TYPE_TITLES.items():
        cols = sorted(m for m in present if m.startswith(prefix))
        if cols:
            out[title] = metric_table(summary, spec, "finetune", "gqa", cols, True, digits)
    return out


PRETRAINING_LOSSES = "Pretraining losses (final validation loss per task)"
PRETRAINING_DIAGNOSTICS = "Pretraining: matching accuracy and image reading (final validation)"


def detail_tables(summary: Summary, spec: ReportSpec, digits: int = 2) -> dict[str, str]:
    """Title -> Markdown table: VQA per answer type, GQA, NLVR² accuracy + consistency, and the
    pretraining losses when any variant pretrains."""
    titles = {"vqa": "VQA per answer type", "gqa": "GQA", "nlvr2": "NLVR² accuracy and consistency"}
    out = {}
    for t in spec.tasks:
        if t != "gqa":
            out[titles[t]] = metric_table(summary, spec, "finetune", t, None, True, digits)
            continue
        out.update(gqa_tables(summary, spec, digits))
    if any(k == "pretrain" for (k, _v, _t) in summary.states):
        out[PRETRAINING_LOSSES] = pretraining_table(summary, spec)
        diagnostics = pretraining_diagnostics_table(summary, spec)
        if diagnostics:
            out[PRETRAINING_DIAGNOSTICS] = diagnostics
    return out


def axis_tables(summary: Summary, spec: ReportSpec, digits: int = 2) -> dict[str, str]:
    """Title -> table for each axis of a spec with axes: rows = the declared variants (and the
    other axes' values), columns = this axis's values per task (main metric); the best of each
    task in a row in bold, so a row reads as the effect of the axis with all else fixed."""
    out: dict[str, str] = {}
    for axis, values in spec.axes.items():
        rows_of: dict[str, dict[str, str]] = {}  # row label -> axis value -> cell (variant)
        for cell in spec.variants:
            group, at = spec.cells.get(cell, (None, {}))
            if axis not in at:
                continue
            rest = [f"{a}={v}" for a, v in at.items() if a != axis]
            label = ", ".join([group, *rest] if group else rest) or "—"
            rows_of.setdefault(label, {})[at[axis]] = cell
        headers = ["Variant"] + [f"{TASK_LABELS[t]} {md_text(axis)}={md_text(v)}"
                                 for t in spec.tasks for v in values]
        rows = []
        for label, by_value in rows_of.items():
            row = [md_text(label)]
            for task in spec.tasks:
                means = {v: mean_std(summary.cell("finetune", c, task, MAIN_METRIC))[0]
                         for v, c in by_value.items()}
                best = _best(means, True)
                for v in values:
                    c = by_value.get(v)
                    row.append(NO_RUNS if c is None else format_cell(
                        summary.cell("finetune", c, task, MAIN_METRIC),
                        summary.state("finetune", c, task), digits, bold=v in best))
            rows.append(row)
        out[f"Per axis: {axis}"] = markdown_table(headers, rows)
    return out
