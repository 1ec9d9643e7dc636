"""The report's figures say what they are: the profile, "synthetic benchmark, not comparable with
the paper" for synthetic data, what the dots, bars and error bars mean; their y axis is fitted to
the values (not stretched to the paper's numbers); a curve of one point is drawn with a marker.

The footer text is embedded in each PNG's ``Description`` text chunk, which is read back here
with Pillow; the figure objects are inspected by intercepting ``plots._save`` (the one place a
figure is written), not by mocking anything that draws."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lxmert_bench.metrics import IMAGE_READING
from lxmert_bench.report import ReportSpec, plots
from lxmert_bench.report.collect import COLUMNS, CURVE_COLUMNS
from lxmert_bench.report.plots import (
    NOTE_KEY,
    SYNTHETIC_NOTE,
    plot_note,
    plot_stage_curves,
    plot_task_bars,
    plot_training_curves,
)

SPEC = ReportSpec(name="vision_tasks", title="Vision pretraining tasks (LXMERT Table 5)",
                  variants=["No Vision Tasks", "Feat + Label"], tasks=["vqa", "nlvr2"],
                  reference="table5", reference_variant="Feat + Label", profile="demo")
ACC = {("No Vision Tasks", "vqa"): [50.1, 50.4, 49.9], ("Feat + Label", "vqa"): [55.0, 55.6, 54.8],
       ("No Vision Tasks", "nlvr2"): [50.0, 51.0, 50.5], ("Feat + Label", "nlvr2"): [58.0, 59.5, 57.0]}


def _frame() -> pd.DataFrame:
    rows = []
    for (variant, task), values in ACC.items():
        for seed, value in enumerate(values):
            row = dict.fromkeys(COLUMNS)
            row.update(kind="finetune", variant=variant, seed=seed, task=task, metric="accuracy",
                       value=value, state="done", stage=f"finetune/{variant[:2]}{task}{seed}")
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _curves(one_point: bool = False) -> pd.DataFrame:
    rows = []
    steps = [10] if one_point else [10, 20, 30]
    for variant in SPEC.variants:
        pre = f"pretrain/{variant[:2]}"
        for step in steps:
            rows.append((variant, None, "pretrain", "pretrain", pre, step, 1, "loss", 9.0 - step / 10))
            rows.append((variant, None, "pretrain", "pretrain", pre, step, 1, "loss/mlm", 3.0))
        for epoch in (1,) if one_point else (1, 2):
            rows.append((variant, None, "pretrain", "pretrain", pre, 30 * epoch, epoch,
                         "mscoco_minival/matched", 0.6))
            rows.append((variant, None, "pretrain", "pretrain", pre, 30 * epoch, epoch,
                         "mscoco_minival/matched_accuracy", 70.0 + epoch))
            for name, value in zip(IMAGE_READING, (0.8 - 0.1 * epoch, 0.95)):
                rows.append((variant, None, "pretrain", "pretrain", pre, 30 * epoch, epoch,
                             f"mscoco_minival/{name}", value))
        for task in SPEC.tasks:
            for seed in range(3):
                stage = f"finetune/{variant[:2]}{task}{seed}"
                for step in steps:
                    rows.append((variant, seed, "finetune", task, stage, step, 1, "loss", 1.0))
                rows.append((variant, seed, "finetune", task, stage, 30, 1, "valid/accuracy", 55.0))
    frame = pd.DataFrame.from_records(rows, columns=list(CURVE_COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def _description(path: Path) -> str:
    with Image.open(path) as image:
        return image.text[NOTE_KEY]


@pytest.fixture
def saved(monkeypatch):
    """The figures as they are handed to the writer: (file name, figure, footer)."""
    seen: list[tuple[str, object, str]] = []
    real = plots._save

    def spy(fig, path, note=""):
        seen.append((Path(path).name, fig, note))
        return real(fig, path, note)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def test_every_png_names_its_profile_and_that_synthetic_data_is_not_the_papers(tmp_path):
    note = plot_note("demo", synthetic=True)
    assert note == f"profile demo; {SYNTHETIC_NOTE}"
    assert SYNTHETIC_NOTE == "synthetic benchmark, not comparable with the paper"
    paths = (plot_task_bars(_frame(), SPEC, tmp_path, note=note, show_paper=False)
             + plot_training_curves(_curves(), SPEC, tmp_path, note=note)
             + plot_stage_curves(_curves(), SPEC, tmp_path, note=note))
    assert sorted(p.name for p in paths) == sorted([
        "bars_vqa.png", "bars_nlvr2.png", "curves_pretrain.png", "curves_finetune.png",
        "stages_pretrain.png", "stages_finetune_vqa.png", "stages_finetune_nlvr2.png"])
    for p in paths:
        text = _description(p)
        assert text.startswith("profile demo; synthetic benchmark, not comparable with the paper")
    real = plot_note("default", synthetic=False)
    assert real == "profile default" and SYNTHETIC_NOTE not in real


def test_bars_explain_their_marks_and_fit_the_axis_to_the_values(tmp_path, saved):
    plot_task_bars(_frame(), SPEC, tmp_path, note=plot_note("demo", True), show_paper=False)
    name, fig, note = saved[0]
    assert name == "bars_vqa.png"
    assert "bar: mean over 3 seeds" in note and "error bar: ±1 std over seeds" in note
    assert "dot: one seed" in note and "paper" not in note.split("\n")[1]
    low, high = fig.axes[0].get_ylim()
    # values 49.9 .. 55.6: the axis starts within a few points of them, not at 0 nor near the
    # paper's 79 (VQA) / 74.9 (NLVR2), and the note says it does not start at 0
    assert 45 < low < 49.9 and 55.6 < high < 60
    assert f"the axis starts at {low:.1f}, not 0" in note
    _, fig_nlvr2, _ = saved[1]
    low, _high = fig_nlvr2.axes[0].get_ylim()
    assert low > 45  # NLVR2's axis once started near 37


def test_real_data_bars_show_the_paper_and_say_so(tmp_path, saved):
    plot_task_bars(_frame(), SPEC, tmp_path, note=plot_note("default", False))
    _name, fig, note = saved[0]
    assert "red diamond: the paper's number" in note
    _low, high = fig.axes[0].get_ylim()
    assert high > 72  # room for the paper's VQA number of the Feat + Label row


def test_a_curve_of_one_point_has_a_marker(tmp_path, saved):
    plot_training_curves(_curves(one_point=True), SPEC, tmp_path)
    for _name, fig, _note in saved:
        for ax in fig.axes:
            for line in ax.get_lines():
                if len(line.get_xdata()) == 1:
                    assert line.get_marker() not in (None, "None", "", " ")
    assert any(len(line.get_xdata()) == 1 for _n, fig, _ in saved for ax in fig.axes
               for line in ax.get_lines())


def test_stage_curves_show_each_pretraining_stage_and_its_matching_accuracy(tmp_path, saved):
    plot_stage_curves(_curves(), SPEC, tmp_path, note="profile demo")
    name, fig, note = saved[0]
    assert name == "stages_pretrain.png"
    assert len(fig.axes) == 4 * len(SPEC.variants)  # a row of four panels per stage
    titles = [ax.get_title() for ax in fig.axes]
    assert any("matching" in t for t in titles)
    accuracy_axes = [ax for ax in fig.axes if "matching" in ax.get_title()]
    ys = [y for ax in accuracy_axes for line in ax.get_lines() for y in line.get_ydata()]
    assert 71.0 in ys and 72.0 in ys
    # the image-reading losses have a panel of their own, not the validation-loss panel's scale
    reading_axes = [ax for ax in fig.axes if "read the image" in ax.get_title()]
    assert len(reading_axes) == len(SPEC.variants)
    for ax in reading_axes:
        assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(IMAGE_READING)
    loss_axes = [ax for ax in fig.axes if "validation loss" in ax.get_title()]
    assert all(t.get_text() not in IMAGE_READING
               for ax in loss_axes for t in ax.get_legend().get_texts())
    assert "masked-LM loss with their own image and with another" in note
    assert "one row per pretraining stage" in note
