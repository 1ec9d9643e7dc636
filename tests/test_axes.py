"""Cartesian axes in specs: crossed with the variants into readably named cells, validated like
every other key, planned with stages shared between cells, noted by `plan`, a table per axis."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from markdown_it import MarkdownIt

from lxmert_bench.cli import main
from lxmert_bench.plan import make_plan, plan_notes
from lxmert_bench.report.collect import COLUMNS, ReportSpec
from lxmert_bench.report.harness import report_spec
from lxmert_bench.report.render import render_markdown
from lxmert_bench.report.tables import Summary, axis_tables
from lxmert_bench.spec import SpecError, load_spec

SPEC = """\
name: masking
base: {pretrain.qa_start: 0.5}
variants:
  Feat: {pretrain.visual_losses: [feat]}
  Feat + Label: {}
axes:
  pretrain.obj_mask_rate: [0.1, 0.15, 0.3]
tasks: [vqa, nlvr2]
seeds: [0]
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path, "test", overrides)
    return "\n".join(e.value.problems)


def test_axes_cross_the_variants_into_named_cells(tmp_path):
    spec = load_spec(write(tmp_path, SPEC), "test")
    assert [v.name for v in spec.variants] == [
        "Feat, obj_mask_rate=0.1", "Feat, obj_mask_rate=0.15", "Feat, obj_mask_rate=0.3",
        "Feat + Label, obj_mask_rate=0.1", "Feat + Label, obj_mask_rate=0.15",
        "Feat + Label, obj_mask_rate=0.3"]
    cell = spec.variant("Feat, obj_mask_rate=0.3")
    assert cell.group == "Feat" and cell.axis_values == (("pretrain.obj_mask_rate", 0.3),)
    s = spec.settings(cell)
    assert s["pretrain.obj_mask_rate"] == 0.3 and s["pretrain.visual_losses"] == ("feat",)
    assert s["pretrain.qa_start"] == 0.5  # base still applies
    assert spec.reference_variant == "Feat + Label, obj_mask_rate=0.3"  # the last cell


def test_axes_alone_and_labels_that_would_clash(tmp_path):
    spec = load_spec(write(tmp_path, """\
        name: lrs
        axes:
          pretrain.optim.lr: [0.0001, 5.0e-5]
          finetune.optim.lr: [1.0e-5]
          pretrain.visual_losses: [[feat], [obj, attr]]
        tasks: [vqa]
        """), "test")
    names = [v.name for v in spec.variants]
    assert names[0] == ("pretrain.optim.lr=0.0001, finetune.optim.lr=1e-05, "
                        "visual_losses=[feat]")
    assert len(names) == 4 and len(set(names)) == 4
    assert spec.variants[1].overrides["pretrain.visual_losses"] == ("obj", "attr")


BAD = [
    ("unknown axis key", SPEC.replace("pretrain.obj_mask_rate:", "pretrain.obj_mask_rat:"),
     None, ["spec.yaml:7", "axes.pretrain.obj_mask_rat", "unknown key",
            "did you mean 'pretrain.obj_mask_rate'"]),
    ("value out of range", SPEC.replace("[0.1, 0.15, 0.3]", "[0.1, 1.5]"), None,
     ["spec.yaml:7", "axes.pretrain.obj_mask_rate[1]", "within [0, 1]"]),
    ("value of a wrong type", SPEC.replace("[0.1, 0.15, 0.3]", "[0.1, high]"), None,
     ["axes.pretrain.obj_mask_rate[1]", "expected a number, got 'high'"]),
    ("not a list", SPEC.replace("[0.1, 0.15, 0.3]", "0.3"), None,
     ["spec.yaml:7", "axes.pretrain.obj_mask_rate", "non-empty list"]),
    ("empty list", SPEC.replace("[0.1, 0.15, 0.3]", "[]"), None,
     ["axes.pretrain.obj_mask_rate", "non-empty list"]),
    ("repeated value", SPEC.replace("[0.1, 0.15, 0.3]", "[0.1, 0.10]"), None,
     ["axes.pretrain.obj_mask_rate", "listed twice"]),
    ("not a mapping", SPEC.replace("  pretrain.obj_mask_rate: [0.1, 0.15, 0.3]\n",
                                   "  - pretrain.obj_mask_rate\n"), None,
     ["spec.yaml:6", "axes: expected a non-empty mapping"]),
    ("a variant sets an axis key", SPEC.replace("Feat + Label: {}",
                                                "Feat + Label: {pretrain.obj_mask_rate: 0.2}"),
     None, ["spec.yaml:5", "variant 'Feat + Label' sets pretrain.obj_mask_rate, which is an axis"]),
    ("--set on an axis key", SPEC, ["pretrain.obj_mask_rate=0.2"],
     ["--set pretrain.obj_mask_rate", "is an axis"]),
    ("reference_variant names no cell", SPEC + "reference_variant: Feat\n", None,
     ["reference_variant: 'Feat' is not a variant (with axes, a cell"]),
]


@pytest.mark.parametrize("text,overrides,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_axes_are_refused_naming_file_line_and_key(tmp_path, text, overrides, fragments):
    message = problems_of(write(tmp_path, text), overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_cli_exit_2_on_a_bad_axis(tmp_path, capsys):
    bad = write(tmp_path, SPEC.replace("[0.1, 0.15, 0.3]", "[0.1, 1.5]"))
    assert main(["plan", str(bad), "--workdir", str(tmp_path / "wd"), "--profile", "test"]) == 2
    err = capsys.readouterr().err
    assert "axes.pretrain.obj_mask_rate[1]" in err and "Traceback" not in err


def test_cells_share_the_stages_they_have_in_common(tmp_path):
    """An axis on a fine-tuning key: every cell of a variant fine-tunes from one pretraining."""
    spec = load_spec(write(tmp_path, SPEC.replace("pretrain.obj_mask_rate: [0.1, 0.15, 0.3]",
                                                  "finetune.optim.lr: [1.0e-5, 5.0e-5, 1.0e-4]")),
                     "test")
    plan = make_plan(spec, tmp_path / "wd")
    kinds = [st.kind for st in plan.stages.values()]
    assert kinds.count("pretrain") == 2  # one per declared variant, not one per cell
    assert kinds.count("finetune") == 2 * 3 * 2  # variants x lr x tasks
    pre = {e.variant: e.pretrain for e in plan.entries}
    assert pre["Feat, lr=1e-05"] == pre["Feat, lr=0.0001"] != pre["Feat + Label, lr=1e-05"]
    # a cell at the default is the same stage as the variant planned without axes
    plain = load_spec(write(tmp_path, SPEC.replace(
        "axes:\n  pretrain.obj_mask_rate: [0.1, 0.15, 0.3]\n", ""), "plain.yaml"), "test")
    crossed = load_spec(write(tmp_path, SPEC), "test")
    both = make_plan([plain, crossed], tmp_path / "wd")
    by_cell = {(e.spec, e.variant, e.task): e.finetune for e in both.entries}
    assert by_cell[("masking", "Feat", "vqa")] == by_cell[("masking", "Feat, obj_mask_rate=0.15",
                                                           "vqa")]
    assert len({e.pretrain for e in both.entries}) == 6  # 2 variants x 3 rates, 0.15 shared


def test_plan_notes_a_mask_rate_with_the_official_weight(tmp_path, capsys):
    spec = load_spec(write(tmp_path, SPEC), "test")
    notes = plan_notes(make_plan(spec, tmp_path / "wd"))
    rate_notes = [n for n in notes if "obj_mask_rate" in n]
    assert len(rate_notes) == 2  # 0.1 and 0.3; 0.15 is the official rate
    assert "0.3" in rate_notes[1] and "visual_loss_weight stays the official constant 1/0.15" \
        in rate_notes[1]
    weighted = load_spec(write(tmp_path, SPEC.replace("{pretrain.qa_start: 0.5}",
                                                      "{pretrain.visual_loss_weight: 1.0}"),
                                 "weighted.yaml"), "test")
    assert not [n for n in plan_notes(make_plan(weighted, tmp_path / "wd")) if "obj_mask" in n]
    no_visual = load_spec(write(tmp_path, """\
        name: nv
        variants: {None: {pretrain.visual_losses: [], pretrain.obj_mask_rate: 0.3}}
        tasks: [vqa]
        """, "nv.yaml"), "test")
    assert not [n for n in plan_notes(make_plan(no_visual, tmp_path / "wd")) if "obj_mask" in n]
    # and `plan` prints it (a synthetic data root: the test profile's)
    assert main(["plan", str(tmp_path / "spec.yaml"), "--workdir", str(tmp_path / "wd"),
                 "--profile", "test"]) == 0
    assert "pretrain.obj_mask_rate is 0.1" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "spec.yaml"), "--workdir", str(tmp_path / "wd"),
                 "--profile", "test", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert [n for n in notes if "obj_mask_rate is 0.3" in n]


def _frame(rows: list[tuple[str, str, float | None, str]]) -> pd.DataFrame:
    """A collected frame: (variant, task, accuracy or None, state) per fine-tuning run."""
    out = []
    for i, (variant, task, acc, state) in enumerate(rows):
        row = dict.fromkeys(COLUMNS)
        row.update(kind="finetune", variant=variant, seed=0, task=task, state=state,
                   metric="accuracy" if acc is not None else None,
                   value=acc if acc is not None else math.nan, stage=f"finetune/{i:012d}",
                   device="cpu", precision="fp32", num_gpus=0, gpu_hours=0.0, total_s=1.0,
                   data_fingerprint="synthetic-v1-600-0", code_version="v")
        out.append(row)
    return pd.DataFrame(out, columns=list(COLUMNS))


def test_a_table_per_axis_in_the_report(tmp_path):
    spec = load_spec(write(tmp_path, SPEC.replace("tasks: [vqa, nlvr2]", "tasks: [vqa]")), "test")
    rspec = report_spec(spec)
    assert rspec.axes == {"obj_mask_rate": ["0.1", "0.15", "0.3"]}
    assert rspec.cells["Feat, obj_mask_rate=0.3"] == ("Feat", {"obj_mask_rate": "0.3"})
    acc = {"0.1": 60.0, "0.15": 62.0, "0.3": 61.0}
    frame = _frame([(f"Feat, obj_mask_rate={r}", "vqa", a, "done") for r, a in acc.items()]
                   + [("Feat + Label, obj_mask_rate=0.1", "vqa", 70.0, "done"),
                      ("Feat + Label, obj_mask_rate=0.15", "vqa", None, "failed")])
    [(title, table)] = axis_tables(Summary(frame), rspec).items()
    assert title == "Per axis: obj_mask_rate"
    lines = table.splitlines()
    assert [c.strip().replace("\\_", "_") for c in lines[0].strip("|").split("|")] == [
        "Variant", "VQA obj_mask_rate=0.1", "VQA obj_mask_rate=0.15", "VQA obj_mask_rate=0.3"]
    feat = [c.strip() for c in lines[2].strip("|").split("|")]
    assert feat == ["Feat", "60.00 (n=1)", "**62.00** (n=1)", "61.00 (n=1)"]
    both = [c.strip() for c in lines[3].strip("|").split("|")]
    assert both[0] == "Feat + Label" and both[1] == "**70.00** (n=1)"
    assert both[2].startswith("failed") and both[3] == "— (no runs)"
    text = render_markdown(rspec, frame, {}, {}, [])
    assert "<h3>Per axis: obj_mask_rate</h3>" in MarkdownIt().render(text)


def test_a_spec_without_axes_has_no_axis_table():
    rspec = ReportSpec("x", "X", ["A"], ["vqa"])
    assert axis_tables(Summary(_frame([("A", "vqa", 50.0, "done")])), rspec) == {}
