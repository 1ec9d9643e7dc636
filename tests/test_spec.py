"""Spec validation: every kind of bad spec is refused before anything runs, naming file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.spec import SCHEMA, SpecError, load_profile, load_spec, parse_set

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: good
title: A good spec
reference: table5
reference_variant: B
variants:
  A: {pretrain.visual_losses: [feat]}
  B: {}
tasks: [vqa, nlvr2]
seeds: [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(path: Path, profile: str | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path, profile, overrides)
    return "\n".join(e.value.problems)


def test_good_spec_loads(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "good"
    assert [v.name for v in spec.variants] == ["A", "B"]
    assert spec.variant("A").overrides == {"pretrain.visual_losses": ("feat",)}
    assert spec.tasks == ("vqa", "nlvr2") and spec.seeds == (0, 1)


@pytest.mark.parametrize("shipped", ["vision_tasks", "bert_init", "qa_pretraining"])
@pytest.mark.parametrize("profile", ["default", "demo", "test"])
def test_shipped_specs_are_valid(shipped, profile):
    spec = load_spec(REPO / "ablations" / f"{shipped}.yaml", profile)
    assert spec.reference in ("table3", "table4", "table5")
    assert spec.reference_variant in [v.name for v in spec.variants]


def test_fine_tunings_after_a_pretraining_without_qa_do_not_load_a_qa_head(tmp_path):
    """Table 4's P20 rows pretrain without the QA task, so there is no QA head to transfer: their
    VQA/GQA fine-tunings start like the official --loadLXMERT (they failed with 'no pretrained QA
    head' when planned with the default load_qa_head: true); P10+QA10's keep loading it."""
    from lxmert_bench.plan import make_plan

    plan = make_plan(load_spec(REPO / "ablations" / "qa_pretraining.yaml", "test"), tmp_path)
    loads = {(e.variant, e.task): plan.stages[e.finetune].config.finetune.load_qa_head
             for e in plan.entries if e.task != "nlvr2"}
    assert loads == {(v, t): v.startswith("P10+QA10") for v, t in loads}, loads
    assert {v for v, _ in loads} == {"P20 + DA", "P20 + FT", "P10+QA10 + DA", "P10+QA10 + FT"}


# (description, spec text, --set overrides, expected fragments of the message)
BAD_SPECS = [
    ("unknown top-level key with did-you-mean",
     GOOD.replace("seeds:", "seedz:"), None, ["spec.yaml:9", "seedz", "did you mean 'seeds'"]),
    ("unknown override key with did-you-mean",
     GOOD.replace("pretrain.visual_losses", "pretrain.visual_loss"), None,
     ["spec.yaml:6", "variants.A.pretrain.visual_loss", "did you mean 'pretrain.visual_losses'"]),
    ("wrong type for a number",
     GOOD.replace("B: {}", "B: {pretrain.optim.lr: fast}"), None,
     ["spec.yaml:7", "pretrain.optim.lr", "expected a number", "'fast'"]),
    ("wrong type for a boolean",
     GOOD.replace("B: {}", "B: {pretrain.qa: maybe}"), None, ["pretrain.qa", "expected a boolean"]),
    ("bad value: unknown visual loss",
     GOOD.replace("[feat]", "[feat, depth]"), None, ["pretrain.visual_losses", "depth", "subset of ['obj', 'attr', 'feat']"]),
    ("bad value: rate out of range",
     GOOD.replace("B: {}", "B: {pretrain.word_mask_rate: 1.5}"), None, ["word_mask_rate", "[0, 1]"]),
    ("bad value: negative batch size",
     GOOD.replace("B: {}", "B: {finetune.optim.batch_size: -4}"), None, ["batch_size", "positive"]),
    ("bad literal value",
     GOOD.replace("B: {}", "B: {pretrain.obj_mask_mode: blur}"), None,
     ["obj_mask_mode", "one of 'official', 'zero'"]),
    ("unknown task with did-you-mean",
     GOOD.replace("[vqa, nlvr2]", "[vqa, nlvr]"), None, ["tasks[1]", "'nlvr'", "did you mean 'nlvr2'"]),
    ("duplicate variant names (YAML mapping)",
     GOOD.replace("  B: {}", "  B: {}\n  A: {}"), None, ["duplicate key 'A'"]),
    ("duplicate variant names (list form)",
     "name: x\nvariants:\n  - {name: A, set: {}}\n  - {name: A, set: {}}\n", None,
     ["variants[1]", "duplicate variant name 'A'"]),
    ("missing variants", "name: x\ntasks: [vqa]\n", None, ["variants: missing"]),
    ("missing name", GOOD.replace("name: good\n", ""), None, ["name: missing"]),
    ("bad name characters", GOOD.replace("name: good", "name: 'my spec!'"), None, ["name:", "my spec!"]),
    ("unknown reference table", GOOD.replace("table5", "table9"), None, ["reference", "table9"]),
    ("reference variant not a variant", GOOD.replace("reference_variant: B", "reference_variant: C"),
     None, ["reference_variant", "'C' is not a variant"]),
    ("seeds not integers", GOOD.replace("[0, 1]", "[0, one]"), None, ["seeds", "list of integers"]),
    ("repeated seed", GOOD.replace("[0, 1]", "[1, 1]"), None, ["seeds", "listed twice"]),
    ("invalid YAML syntax", GOOD.replace("tasks: [vqa, nlvr2]", "tasks: [vqa, nlvr2"), None,
     ["invalid YAML"]),
    ("top level not a mapping", "- a\n- b\n", None, ["expected a mapping"]),
    ("variant overrides not a mapping", GOOD.replace("B: {}", "B: [1, 2]"), None,
     ["variants.B", "expected a mapping"]),
    ("unknown model preset", GOOD.replace("B: {}", "B: {model.preset: huge}"), None,
     ["model.preset", "unknown model preset 'huge'"]),
    ("hidden size not divisible by heads", GOOD.replace("B: {}", "B: {model.hidden_size: 100}"),
     None, ["hidden_size 100", "num_attention_heads 12"]),
    ("NLVR2 with a BCE loss", GOOD.replace("B: {}", "B: {finetune.loss: bce}"), None,
     ["finetune.nlvr2.loss must be 'ce'"]),
    ("bad --set key", GOOD, ["pretrain.optim.lrr=1e-4"], ["--set", "did you mean 'pretrain.optim.lr'"]),
    ("--set without '='", GOOD, ["pretrain.optim.lr"], ["expected key=value"]),
    ("--set wrong type", GOOD, ["seed_pretraining=1", "pretrain.optim.epochs=two"],
     ["pretrain.optim.epochs", "expected an integer"]),
]


@pytest.mark.parametrize("desc,text,overrides,fragments", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_refused_with_a_clear_message(tmp_path, desc, text, overrides, fragments):
    msg = problems_of(write(tmp_path, text), overrides=overrides)
    for frag in fragments:
        assert frag in msg, f"{desc}: {frag!r} not in:\n{msg}"


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("seeds:", "seedz:").replace("[vqa, nlvr2]", "[vqa, xyz]")
    msg = problems_of(write(tmp_path, text))
    assert "seedz" in msg and "xyz" in msg


def test_missing_spec_file(tmp_path):
    assert "file not found" in problems_of(tmp_path / "nope.yaml")


def test_unknown_profile_with_did_you_mean(tmp_path):
    msg = problems_of(write(tmp_path, GOOD), profile="dmeo")
    assert "unknown profile" in msg and "did you mean 'demo'" in msg


def test_bad_profile_file(tmp_path):
    prof = write(tmp_path, "name: p\nexecutor: cloud\noverrides: {model.presett: tiny}\n", "p.yaml")
    with pytest.raises(SpecError) as e:
        load_profile(str(prof))
    msg = "\n".join(e.value.problems)
    assert "executor" in msg and "cloud" in msg and "model.presett" in msg and "p.yaml:3" in msg


def test_precedence_profile_base_variant_set(tmp_path):
    text = GOOD.replace("reference: table5", "reference: table5\nbase: {pretrain.optim.epochs: 7}")
    text = text.replace("B: {}", "B: {pretrain.optim.epochs: 9}")
    spec = load_spec(write(tmp_path, text), "demo", ["pretrain.optim.lr=5e-5"])
    a, b = spec.settings(spec.variant("A")), spec.settings(spec.variant("B"))
    assert a["model.preset"] == "tiny"  # profile
    assert a["pretrain.optim.epochs"] == 7  # base beats profile
    assert b["pretrain.optim.epochs"] == 9  # variant beats base
    assert a["pretrain.optim.lr"] == 5e-5 and isinstance(a["pretrain.optim.lr"], float)  # --set


def test_parse_set_reads_yaml_values():
    assert parse_set(["a=1", "b=[obj, feat]", "c=true", "d=5e-5", "e=text"]) == {
        "a": 1, "b": ["obj", "feat"], "c": True, "d": 5e-5, "e": "text"}


def test_schema_covers_every_paper_switch():
    for key in ("pretrain.feat_loss", "pretrain.label_targets", "pretrain.obj_mask_mode",
                "pretrain.qa_start", "pretrain.bert_layers", "pretrain.init", "finetune.gqa.loss",
                "model.x_layers", "data.root", "pretrain.enabled"):
        assert key in SCHEMA


def test_cli_exit_code_2_and_nothing_written(tmp_path, capsys):
    bad = write(tmp_path, GOOD.replace("seeds:", "seedz:"))
    workdir = tmp_path / "wd"
    code = main(["run", str(bad), "--workdir", str(workdir), "--profile", "test"])
    assert code == 2
    err = capsys.readouterr().err
    assert "seedz" in err and str(bad) in err
    assert not workdir.exists()


def test_cli_missing_data_root_exit_2(tmp_path, capsys):
    spec = write(tmp_path, GOOD)
    workdir = tmp_path / "wd"
    code = main(["run", str(spec), "--workdir", str(workdir),
                 "--set", f"data.root={tmp_path / 'no-such-data'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "no-such-data" in err and "directory not found" in err
    assert not (workdir / "runs").exists()


def test_cli_synthetic_root_of_another_generator_version_exit_2(tmp_path, capsys):
    """A synthetic benchmark written by another generator version would not be what the data
    fingerprint says: refused before anything is submitted, naming the file and both versions."""
    import json

    from lxmert_bench.data.synthetic import GENERATOR_VERSION

    root = tmp_path / "syn"
    root.mkdir()
    summary = {"generator_version": "0", "images": 120, "seed": 0}
    (root / "synthetic.json").write_text(json.dumps(summary))
    spec = write(tmp_path, GOOD)
    workdir = tmp_path / "wd"
    code = main(["run", str(spec), "--workdir", str(workdir), "--profile", "test",
                 "--set", f"data.root={root}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "synthetic.json" in err and str(root) in err
    assert f"'generator_version': '{GENERATOR_VERSION}'" in err
    assert not (workdir / "runs").exists()
    assert json.loads((root / "synthetic.json").read_text()) == summary  # left as it was
