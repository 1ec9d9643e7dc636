"""Figures of a report (seaborn on matplotlib's Agg backend, PNG files written atomically).

- ``bars_<task>.png``: the main metric per variant, mean over seeds with ±1 std error bars, each
  seed as a dot, and (real data only) the paper's number of the same row as a red diamond.
- ``curves_<kind>.png``: training loss vs step per variant (mean over seeds with a ±1 std band).
- ``stages_pretrain.png``, ``stages_finetune_<task>.png``: every stage's own log.jsonl: training
  loss per task vs step and the validation metrics per epoch, one line per stage.

Every figure carries a footer (and the same text in the PNG's ``Description`` text chunk, which
tests and tools can read) naming the profile, saying when the data is the synthetic benchmark,
and explaining its marks.
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
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lxmert_bench.io import atomic_write_bytes  # noqa: E402
from lxmert_bench.metrics import IMAGE_READING  # noqa: E402
from lxmert_bench.report.collect import MAIN_METRIC, ReportSpec  # noqa: E402
from lxmert_bench.report.paper import paper_value  # noqa: E402
from lxmert_bench.report.tables import status_text  # noqa: E402
from lxmert_bench.store import DONE  # noqa: E402

TASK_LABELS = {"vqa": "VQA", "gqa": "GQA", "nlvr2": "NLVR²", "pretrain": "pretraining"}
MAX_CURVE_POINTS = 400  # per line: keeps plotting fast on 600K-step pretraining logs
SYNTHETIC_NOTE = "synthetic benchmark, not comparable with the paper"
NOTE_KEY = "Description"  # the PNG text chunk holding the footer


def plot_note(profile: str, synthetic: bool) -> str:
    """The footer line every figure of a report starts with: its profile and, for the synthetic
    benchmark, that its numbers are not the paper's."""
    return f"profile {profile}" + (f"; {SYNTHETIC_NOTE}" if synthetic else "")


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


def _save(fig: plt.Figure, path: Path, note: str = "") -> Path:
    """Write ``fig`` with ``note`` as a footer below the axes and as the PNG's Description."""
    if note:  # below everything drawn so far (rotated tick labels reach under the axes)
        renderer = fig.canvas.get_renderer()
        bottom = fig.get_tightbbox(renderer).y0 / fig.get_figheight()  # inches -> figure fraction
        fig.text(0.01, bottom - 0.02, _label(note), ha="left", va="top", fontsize=7.5,
                 color="#333333")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={NOTE_KEY: note, "Software": "lxmert-bench"})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _order(variants: Sequence[str], present: Sequence[str]) -> list[str]:
    """The spec's variants that are present, in its order, then the others present."""
    return list(dict.fromkeys([*[v for v in variants if v in set(present)], *present]))


def _value_limits(values: Sequence[float]) -> tuple[float, float]:
    """A y range that makes the differences between ``values`` readable: a margin of 30% of
    their spread (at least half a point) on either side, within [0, 100]."""
    low, high = min(values), max(values)
    pad = max(0.5, (high - low) * 0.3)
    return max(0.0, low - pad), min(100.0, high + pad)


def plot_task_bars(frame: pd.DataFrame, spec: ReportSpec, out_dir: str | os.PathLike,
                   metric: str = MAIN_METRIC, note: str = "",
                   show_paper: bool = True) -> list[Path]:
    """One bar plot per task with runs done; returns the PNG paths. ``show_paper``: draw the
    paper's numbers (off for the synthetic benchmark, where they are not comparable and would
    stretch the axis)."""
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
        paper = [(i, p) for i, p in paper if p is not None] if show_paper else []
        if paper:
            ax.scatter([i for i, _ in paper], [p for _, p in paper], marker="D", s=45,
                       color="#c0392b", zorder=5, label="paper")
            ax.legend(loc="lower right", frameon=True)
        low, high = _value_limits(list(data["value"]) + [p for _, p in paper])
        ax.set_ylim(low, high)
        seeds = data.groupby("variant")["seed"].nunique()
        marks = (f"bar: mean over {_count_text(seeds)} seeds; error bar: ±1 std over seeds; "
                 "dot: one seed" + ("; red diamond: the paper's number" if paper else "")
                 + (f"; the axis starts at {low:.1f}, not 0" if low > 0 else ""))
        ax.set_xlim(-0.6, len(order) - 0.4)  # room for a missing first or last bar's note
        for i, v in enumerate(order):
            if v in missing:
                ax.text(i, 0.04, _label(missing[v]).replace(" (", "\n("), ha="center", va="bottom",
                        fontsize=8, color="#444444", transform=ax.get_xaxis_transform())
        ax.set_xlabel("")
        ax.set_ylabel(f"{TASK_LABELS[task]} {metric} (%)")
        ax.set_title(_label(f"{spec.title}: {TASK_LABELS[task]} (dev)"))
        ax.tick_params(axis="x", labelrotation=20)
        footer = "\n".join(t for t in (note, marks) if t)
        paths.append(_save(fig, _png(out_dir, "bars_", task), footer))
    return paths


def _count_text(counts: pd.Series) -> str:
    """'3', or '2-3' when variants have different numbers of seeds done."""
    low, high = int(counts.min()), int(counts.max())
    return str(low) if low == high else f"{low}-{high}"


def _lineplot(ax: plt.Axes, data: pd.DataFrame, x: str, **kw: object) -> None:
    """seaborn's lineplot, with a marker on every point when a line has only one (a line of one
    point draws nothing)."""
    keys = [k for k in ("variant", "stage", "series") if k in data]
    single = bool(len(data)) and int(data.groupby(keys)[x].nunique().min()) < 2
    sns.lineplot(data=data, x=x, y="value", ax=ax, marker="o" if single else None, **kw)


def _thin(part: pd.DataFrame) -> pd.DataFrame:
    """At most ~MAX_CURVE_POINTS evenly spaced points per (variant, stage) line."""
    groups = part.groupby(["variant", "stage"], sort=False)
    stride = -(-groups["step"].transform("size") // MAX_CURVE_POINTS)
    return part[groups.cumcount() % stride == 0]


def plot_training_curves(curves: pd.DataFrame, spec: ReportSpec, out_dir: str | os.PathLike,
                         series: str = "loss", note: str = "") -> list[Path]:
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
            _lineplot(ax, part[part["task"] == task], "step", hue="variant", hue_order=order,
                      errorbar="sd", estimator="mean")
            ax.set_title("LXMERT pretraining" if kind == "pretrain"
                         else f"{TASK_LABELS.get(task, task)} fine-tuning")
            ax.set_ylabel(series)
            ax.legend(fontsize=8, title=None)
        fig.suptitle(_label(spec.title), fontsize=10)
        marks = ("line: mean over seeds; band: ±1 std over seeds" if kind == "finetune"
                 else "line: the variant's pretraining stage")
        paths.append(_save(fig, _png(out_dir, "curves_", kind),
                           "\n".join(t for t in (note, f"training {series} per logged step; {marks}")
                                     if t)))
    return paths


def plot_stage_curves(curves: pd.DataFrame, spec: ReportSpec, out_dir: str | os.PathLike,
                      note: str = "") -> list[Path]:
    """Each stage's own log.jsonl: ``stages_pretrain.png`` (a row per pretraining stage: its
    training loss per task vs step, its validation metrics vs epoch) and, per task,
    ``stages_finetune_<task>.png`` (training loss vs step and validation metrics vs epoch, a
    line per fine-tuning stage, i.e. per variant and seed)."""
    out_dir = Path(out_dir)
    data = curves[curves["step"].notna() | curves["epoch"].notna()]
    data = data.assign(variant=data["variant"].map(_label))
    paths = []
    pre = data[data["kind"] == "pretrain"].drop_duplicates(["stage", "step", "epoch", "series"])
    if not pre.empty:
        stages = list(dict.fromkeys(pre["stage"]))
        fig, axes = plt.subplots(len(stages), 4, figsize=(20, 3.3 * len(stages)), squeeze=False)
        for row, stage in zip(axes, stages):
            part = pre[pre["stage"] == stage]
            names = ", ".join(_label(v) for v in dict.fromkeys(
                data.loc[(data["kind"] == "pretrain") & (data["stage"] == stage), "variant"]))
            train = _thin_series(part[part["series"].str.startswith("loss/")])
            valid = part[part["series"].str.contains("/") & ~part["series"].str.startswith("loss")]
            valid = valid.assign(series=valid["series"].str.split("/", n=1).str[1])  # the split
            accuracy = valid["series"].str.endswith("accuracy")
            reading = valid["series"].isin(IMAGE_READING)
            _stage_panel(row[0], train, "step", f"{names}: training loss per task", "loss")
            _stage_panel(row[1], valid[~accuracy & ~reading], "epoch",
                         f"{stage}: validation loss per task", "loss")
            _stage_panel(row[2], valid[reading], "epoch",
                         "does the text read the image? (masked LM, matched pairs)", "loss")
            _stage_panel(row[3], valid[accuracy], "epoch", "validation image-sentence matching",
                         "accuracy (%)")
        fig.tight_layout()
        paths.append(_save(fig, _png(out_dir, "stages_", "pretrain"), "\n".join(t for t in (
            note, "one row per pretraining stage: training loss of each task per logged step; "
            "validation loss of each task after each epoch; the matched pairs' masked-LM loss with "
            "their own image and with another image (equal while the text ignores the image); "
            "validation matching accuracy (%; 50 is chance)")
            if t)))
    fine = data[data["kind"] == "finetune"]
    for task in spec.tasks:
        part = fine[fine["task"] == task]
        if part.empty:
            continue
        part = part.assign(line=part["variant"] + " / seed " + part["seed"].astype(str))
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
        train = _thin_series(part[part["series"] == "loss"])
        valid = part[part["series"].str.endswith("/accuracy")]
        _stage_panel(axes[0][0], train, "step", f"{TASK_LABELS[task]} fine-tuning: training loss",
                     "loss", hue="line")
        _stage_panel(axes[0][1], valid, "epoch", f"{TASK_LABELS[task]}: validation accuracy",
                     "accuracy (%)", hue="line")
        fig.tight_layout()
        paths.append(_save(fig, _png(out_dir, "stages_finetune_", task), "\n".join(t for t in (
            note, "one line per fine-tuning stage (variant / seed): training loss per logged step, "
            "validation accuracy after each epoch") if t)))
    return paths


def _thin_series(part: pd.DataFrame) -> pd.DataFrame:
    if part.empty:
        return part
    groups = part.groupby(["stage", "series"], sort=False)
    stride = -(-groups["step"].transform("size") // MAX_CURVE_POINTS)
    return part[groups.cumcount() % stride == 0]


def _stage_panel(ax: plt.Axes, part: pd.DataFrame, x: str, title: str, ylabel: str,
                 hue: str = "series") -> None:
    ax.set_title(_label(title), fontsize=9)
    if part.empty:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        return
    points = part.groupby([hue, "stage"] if hue != "stage" else [hue])[x].nunique()
    sns.lineplot(data=part, x=x, y="value", hue=hue, ax=ax, errorbar=None,
                 marker="o" if int(points.min()) < 2 else None)
    ax.set_ylabel(ylabel)
    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, title=None)
