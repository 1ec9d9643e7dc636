"""Figures of a report (seaborn on matplotlib's Agg backend, PNG files written atomically).

- ``bars_<task>.png``: the main metric per variant, mean over seeds with ±1 std error bars, each
  seed as a dot, and the paper's number of the same row as a red diamond.
- ``curves_<kind>.png``: training loss vs step per variant (mean over seeds with a ±1 std band).
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from lxmert_bench.io import atomic_write_bytes  # noqa: E402
from lxmert_bench.report.collect import MAIN_METRIC, ReportSpec  # noqa: E402
from lxmert_bench.report.paper import paper_value  # noqa: E402
from lxmert_bench.report.tables import status_text  # noqa: E402
from lxmert_bench.store import DONE  # noqa: E402

TASK_LABELS = {"vqa": "VQA", "gqa": "GQA", "nlvr2": "NLVR²", "pretrain": "pretraining"}
MAX_CURVE_POINTS = 400  # per line: keeps plotting fast on 600K-step pretraining logs


def _label(text: object) -> str:
    """A name as plain figure text: '$' would start matplotlib mathtext (a name such as '$\\x$'
    made savefig raise), so it is escaped."""
    return str(text).replace("$", r"\$")


def _png(out_dir: Path, prefix: str, part: str) -> Path:
    """A plot's file name: only from fixed prefixes and task / stage-kind names, never from a
    variant name or title."""
    if not re.fullmatch(r"[a-z0-9_]+", part):
        raise ValueError(f"plot name {prefix}{part!r}: expected a task or stage kind")
    return out_dir / f"{prefix}{part}.png"


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _order(variants: Sequence[str], present: Sequence[str]) -> list[str]:
    """The spec's variants that are present, in its order, then the others present."""
    return list(dict.fromkeys([*[v for v in variants if v in set(present)], *present]))


def plot_task_bars(frame: pd.DataFrame, spec: ReportSpec, out_dir: str | os.PathLike,
                   metric: str = MAIN_METRIC) -> list[Path]:
    """One bar plot per task with runs done; returns the PNG paths."""
    out_dir = Path(out_dir)
    finetune = frame[frame["kind"] == "finetune"]
    done = finetune[(finetune["state"] == DONE) & (finetune["metric"] == metric)]
    paths = []
    for task in spec.tasks:
        data = done[done["task"] == task]
        if data.empty:
            continue
        # every variant keeps its place on the axis; one without a result says why
        order = _order(spec.variants, [*spec.variants, *data["variant"].unique()])
        runs = finetune[finetune["task"] == task].drop_duplicates("stage")
        missing = {v: status_text(Counter(runs.loc[runs["variant"] == v, "state"])) or "no runs"
                   for v in order if v not in set(data["variant"])}
        fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2.5, 3.8))
        shown = data.assign(variant=data["variant"].map(_label))
        shown_order = [_label(v) for v in order]
        sns.barplot(data=shown, x="variant", y="value", order=shown_order, errorbar="sd",
                    color="#8fb3d9", capsize=0.15, err_kws={"linewidth": 1.2}, ax=ax)
        sns.stripplot(data=shown, x="variant", y="value", order=shown_order, color="#1f3b5c",
                      size=4, jitter=0.12, ax=ax)
        paper = [(i, paper_value(spec.reference, v, task, metric)) for i, v in enumerate(order)]
        paper = [(i, p) for i, p in paper if p is not None]
        if paper:
            ax.scatter([i for i, _ in paper], [p for _, p in paper], marker="D", s=45,
                       color="#c0392b", zorder=5, label="paper")
            ax.legend(loc="lower right", frameon=True)
        values = list(data["value"]) + [p for _, p in paper]
        low, high = min(values), max(values)
        pad = max(1.0, (high - low) * 0.25)
        ax.set_ylim(max(0.0, low - pad * 2), min(100.0, high + pad))
        ax.set_xlim(-0.6, len(order) - 0.4)  # room for a missing first or last bar's note
        for i, v in enumerate(order):
            if v in missing:
                ax.text(i, 0.04, _label(missing[v]).replace(" (", "\n("), ha="center", va="bottom",
                        fontsize=8, color="#444444", transform=ax.get_xaxis_transform())
        ax.set_xlabel("")
        ax.set_ylabel(f"{TASK_LABELS[task]} {metric} (%)")
        ax.set_title(_label(f"{spec.title}: {TASK_LABELS[task]} (dev)"))
        ax.tick_params(axis="x", labelrotation=20)
        paths.append(_save(fig, _png(out_dir, "bars_", task)))
    return paths


def _thin(part: pd.DataFrame) -> pd.DataFrame:
    """At most ~MAX_CURVE_POINTS evenly spaced points per (variant, stage) line."""
    groups = part.groupby(["variant", "stage"], sort=False)
    stride = -(-groups["step"].transform("size") // MAX_CURVE_POINTS)
    return part[groups.cumcount() % stride == 0]


def plot_training_curves(curves: pd.DataFrame, spec: ReportSpec, out_dir: str | os.PathLike,
                         series: str = "loss") -> list[Path]:
    """Loss vs step per variant: one PNG for pretraining, one for fine-tuning (a panel per task)."""
    out_dir = Path(out_dir)
    data = curves[(curves["series"] == series) & curves["step"].notna()]
    paths = []
    for kind in ("pretrain", "finetune"):
        part = data[data["kind"] == kind]
        if part.empty:
            continue
        part = _thin(part)
        part = part.assign(variant=part["variant"].map(_label))
        tasks = [t for t in (["pretrain"] if kind == "pretrain" else spec.tasks)
                 if t in set(part["task"])]
        order = _order([_label(v) for v in spec.variants], list(part["variant"].unique()))
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            sns.lineplot(data=part[part["task"] == task], x="step", y="value", hue="variant",
                         hue_order=order, errorbar="sd", estimator="mean", ax=ax)
            ax.set_title("LXMERT pretraining" if kind == "pretrain"
                         else f"{TASK_LABELS.get(task, task)} fine-tuning")
            ax.set_ylabel(series)
            ax.legend(fontsize=8, title=None)
        fig.suptitle(_label(spec.title), fontsize=10)
        paths.append(_save(fig, _png(out_dir, "curves_", kind)))
    return paths
