"""The official GQA evaluation (issue 12): the challenge evaluator's metrics over the balanced
question and choices files, read from ``gqa/questions/`` under the data root, used by the GQA
fine-tuning evaluation and named in the report; without the files binary / open is approximated
by the answer and the report says so.

Expected values are worked out by hand from the rules of the official ``eval.py`` (the GQA
authors' evaluator, which is not installable here):
- only ``isBalanced`` questions are scored, by exact string match with ``answer``;
- open iff ``types.structural == "query"``, else binary;
- consistency: over the correctly answered questions with entailed questions (``entailed``
  minus the question itself), the mean accuracy over those entailed questions;
- validity / plausibility: the prediction in the choices' ``valid`` / ``plausible`` list, but
  checked against color / material / shape when ``types.detailed`` contains "Common";
- distribution: per ``groups.global`` (None left out), sum over the gold answers a of
  (predicted count of a - gold count)^2 / gold count, weighted by the group's questions, / 100.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from lxmert_bench.data.gqa_questions import (
    GQAFileError,
    gqa_eval_problems,
    load_gqa_eval_files,
    read_balanced_questions,
    read_choices,
)
from lxmert_bench.metrics import GQAChoices, GQAQuestion, gqa_distribution, gqa_official_metrics

Q, C = GQAQuestion, GQAChoices


def _choices(valid: list[str], plausible: list[str]) -> GQAChoices:
    return C(frozenset(valid), frozenset(plausible))


QUESTIONS = {
    # q1 right; entails itself (skipped) and q3 (wrong): consistency 0
    "q1": Q("yes", "verify", "obj", "existC", ("q1", "q3")),
    # q2 right; entails the unbalanced q6 (wrong) and q7 (right): consistency 1/2
    "q2": Q("red", "query", "attr", "queryAttr", ("q6", "q7"), "color"),
    # q3 a choose question: binary although its answer is not yes/no; wrong, invalid
    "q3": Q("left", "choose", "rel", "chooseRel", ("q1",)),
    # q4 wrong, not a valid answer, its entailed id "zz" is not in the file
    "q4": Q("blue", "query", "attr", "queryAttr", ("q2", "zz"), "color"),
    # q5 "what do they have in common?": valid by the evaluator's special case
    "q5": Q("color", "compare", "attr", "twoCommon"),
    # q6 not balanced: not scored, not in the distribution, but an entailed question
    "q6": Q("dog", "query", "obj", "queryObject", (), "animal", balanced=False),
    # q7 right; its only entailed id is not in the file: not counted
    "q7": Q("cat", "query", "cat", "queryObject", ("zz",), "animal"),
}
PREDICTIONS = {"q1": "yes", "q2": "red", "q3": "under", "q4": "pink", "q5": "material",
               "q6": "cat", "q7": "cat"}
CHOICES = {
    "q1": _choices(["yes", "no"], ["no"]),
    "q2": _choices(["red", "blue", "green"], ["red"]),
    "q3": _choices(["left", "right"], ["left"]),
    "q4": _choices(["red", "blue"], ["blue"]),
    "q5": _choices(["yes", "no"], ["yes"]),
    "q7": _choices(["cat", "dog"], ["cat"]),
}


def test_official_metrics_worked_out_by_hand():
    got = gqa_official_metrics(PREDICTIONS, QUESTIONS, CHOICES)
    # scored: q1 q2 q3 q4 q5 q7; right: q1 q2 q7
    # distribution: color gold {red 1, blue 1}, predicted {red 1, pink 1}: chi 0 + 1 = 1 over 2
    # questions; animal (q6 left out) gold {cat 1}, predicted {cat 1}: chi 0 over 1 question
    assert got == pytest.approx({
        "accuracy": 100 * 3 / 6,
        "binary": 100 * 1 / 3,  # q1 q3 q5
        "open": 100 * 2 / 3,  # q2 q4 q7
        "consistency": 100 * (0.0 + 0.5) / 2,  # q1 and q2 (right, with entailed questions)
        "validity": 100 * 4 / 6,  # q3 "under" and q4 "pink" are not valid; q5 by the special case
        "plausibility": 100 * 3 / 6,  # q2, q5 ("material": common), q7
        "distribution": (1 * 2 + 0 * 1) / 3 / 100,
        "structural/choose": 0.0, "structural/compare": 0.0, "structural/query": 100 * 2 / 3,
        "structural/verify": 100.0,
        "semantic/attr": 100 * 1 / 3, "semantic/cat": 100.0, "semantic/obj": 100.0,
        "semantic/rel": 0.0,
    })


def test_distribution_counts_only_gold_answers_and_weights_groups():
    # group a: gold {x 2, y 1}, predicted {x 1, z 2}: (1-2)^2/2 + (0-1)^2/1 = 1.5 over 3 questions;
    # group b: gold {u 1}, predicted {u 1}: 0 over 1 question -> (1.5 * 3 + 0) / 4 / 100
    assert gqa_distribution({"a": {"x": 2, "y": 1}, "b": {"u": 1}},
                            {"a": {"x": 1, "z": 2}, "b": {"u": 1}}) == pytest.approx(4.5 / 4 / 100)
    assert gqa_distribution({}, {}) is None


def test_metrics_without_inputs_are_left_out_not_zero():
    questions = {"a": Q("yes", "verify", "obj"), "b": Q("no", "logical", "obj")}
    got = gqa_official_metrics({"a": "yes", "b": "yes"}, questions)
    # no open question, no entailed question, no choices, no global group
    assert got == {"accuracy": 50.0, "binary": 50.0, "structural/logical": 0.0,
                   "structural/verify": 100.0, "semantic/obj": 50.0}
    # entailed questions exist but no question with them is right: the official 0
    questions["a"] = Q("yes", "verify", "obj", entailed=("b",))
    assert gqa_official_metrics({"a": "no", "b": "no"}, questions)["consistency"] == 0.0


def test_incomplete_predictions_and_choices_are_refused():
    with pytest.raises(ValueError, match=r"1 of 7 GQA questions have no prediction.*'q6'"):
        gqa_official_metrics({k: v for k, v in PREDICTIONS.items() if k != "q6"}, QUESTIONS)
    with pytest.raises(ValueError, match=r"1 of 6 GQA questions have no entry in the choices.*'q7'"):
        gqa_official_metrics(PREDICTIONS, QUESTIONS, {k: v for k, v in CHOICES.items() if k != "q7"})


# ---------------------------------------------------------------------------------------------
# the reader
def _official_question(answer: str, structural: str = "query", **extra) -> dict:
    return {"question": "What is it?", "imageId": "n1", "answer": answer, "isBalanced": True,
            "types": {"structural": structural, "semantic": "attr", "detailed": "queryAttr"},
            "groups": {"global": "color", "local": "10q-x"}, "entailed": [], "equivalent": [],
            **extra}


def test_reader_keeps_the_fields_the_evaluator_reads(tmp_path):
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps({"01": _official_question("red", entailed=["02"]),
                                "02": {**_official_question("yes", "verify"), "isBalanced": False,
                                       "groups": {"global": None, "local": "x"}}}))
    assert read_balanced_questions(path) == {
        "01": Q("red", "query", "attr", "queryAttr", ("02",), "color", True),
        "02": Q("yes", "verify", "attr", "queryAttr", (), None, False)}
    choices = tmp_path / "testdev_choices.json"
    choices.write_text(json.dumps({"01": {"valid": ["red", "blue"], "plausible": ["red"]}}))
    assert read_choices(choices) == {"01": _choices(["red", "blue"], ["red"])}


@pytest.mark.parametrize("text, message", [
    ('{"01": {"answer": "red",\n  }', r"questions\.json:2:3: invalid JSON"),
    ('[{"answer": "red"}]', r"expected a JSON object \{questionId: question\}.*got list"),
    ('{"01": {"answer": "red", "types": {"semantic": "attr"}}}',
     r"question '01': missing key 'types.structural'"),
    ('{"01": {"answer": 3, "types": {"structural": "query", "semantic": "attr"}}}',
     r"question '01': 'answer' should be str, got 3"),
    ('{"01": {"answer": "a", "entailed": [1], "types": {"structural": "query", "semantic": "a"}}}',
     r"question '01': 'entailed' should list question ids"),
])
def test_reader_errors_name_the_file_and_question(tmp_path, text, message):
    path = tmp_path / "val_balanced_questions.json"
    path.write_text(text)
    with pytest.raises(GQAFileError, match=message) as e:
        read_balanced_questions(path)
    assert str(path) in str(e.value)


def test_choices_errors_name_the_file_and_question(tmp_path):
    path = tmp_path / "val_choices.json"
    path.write_text('{"01": {"valid": ["a"]}}')
    with pytest.raises(GQAFileError, match=r"val_choices\.json: question '01': missing key 'plausible'"):
        read_choices(path)


# ---------------------------------------------------------------------------------------------
# the synthetic benchmark writes them; the fine-tuning evaluation uses them
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from lxmert_bench.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("gqa") / "syn"
    generate_synthetic(root, images=120, seed=0, progress=False)
    return root


def test_synthetic_official_files_match_the_splits_and_leave_the_rest_alone(synthetic, tmp_path,
                                                                           monkeypatch):
    import lxmert_bench.data.synthetic as syn

    for split, tier in (("valid", "val"), ("testdev", "testdev")):
        records = json.loads((synthetic / "gqa" / f"{split}.json").read_text())
        raw = json.loads((synthetic / f"gqa/questions/{tier}_balanced_questions.json").read_text())
        assert list(raw) == [d["question_id"] for d in records]
        for d in records:
            q = raw[d["question_id"]]
            assert (q["question"], q["imageId"], {q["answer"]: 1.0}) == (d["sent"], d["img_id"],
                                                                          d["label"])
            assert q["isBalanced"] and q["types"]["structural"] in (
                "query", "verify", "logical", "choose", "compare")
            if d["sent"].endswith("small or big?"):  # binary by type, though not yes/no
                assert q["types"]["structural"] == "choose" and q["answer"] in ("small", "big")
        files = load_gqa_eval_files(synthetic, split)
        assert files is not None and files.choices is not None
        assert all(q.answer in files.choices[k].plausible for k, q in files.questions.items())
        assert any(q.entailed for q in files.questions.values())
        assert gqa_eval_problems(synthetic, split, synthetic / "gqa" / f"{split}.json") == []
    # every other file is byte for byte what the generator writes without the new files
    monkeypatch.setattr(syn, "write_gqa_official_files", lambda out, gqa_task: None)
    syn.generate_synthetic(tmp_path / "without", images=120, seed=0, progress=False)
    files = {str(p.relative_to(synthetic)): p.read_bytes() for p in synthetic.rglob("*")
             if p.is_file() and "questions" not in p.parts}
    without = {str(p.relative_to(tmp_path / "without")): p.read_bytes()
               for p in (tmp_path / "without").rglob("*") if p.is_file()}
    assert files == without


def _dev(root: Path, **kw):
    from lxmert_bench.config import DataConfig
    from lxmert_bench.data.tasks import GQADataset
    from lxmert_bench.train.common import load_tokenizer

    data = DataConfig(root=str(root), synthetic=True, synthetic_images=120)
    return GQADataset(root, ["testdev"], load_tokenizer(data), **kw)


def test_fine_tuning_evaluation_uses_the_official_files(synthetic, tmp_path):
    from lxmert_bench.train.finetune import metric_notes, score

    dev = _dev(synthetic)
    raw = json.loads((synthetic / "gqa/questions/testdev_balanced_questions.json").read_text())
    predictions = {d["question_id"]: "yes" for d in dev.raw_examples}
    metrics, scores = score("gqa", predictions, dev)
    binary = [q for q in raw.values() if q["types"]["structural"] != "query"]
    assert any(q["answer"] not in ("yes", "no") for q in binary)  # choose questions
    assert metrics["binary"] == pytest.approx(
        100 * sum(q["answer"] == "yes" for q in binary) / len(binary))
    assert metrics["open"] == 0.0  # no open question has the answer yes
    assert metrics["accuracy"] == pytest.approx(100 * sum(scores.values()) / len(scores))
    for key in ("consistency", "validity", "plausibility", "distribution", "structural/choose",
                "semantic/attr"):
        assert key in metrics
    notes = metric_notes("gqa", dev)["metric_notes"]
    assert notes["gqa binary/open"] == "by structural type (official eval.py)"
    assert "testdev_balanced_questions.json" in notes["gqa official metrics"]
    assert "grounding not computed" in notes["gqa official metrics"]

    # fewer images loaded: the metrics cover the loaded questions, and the note says how many
    few = _dev(synthetic, image_limit=2)
    few_metrics, _ = score("gqa", {d["question_id"]: "yes" for d in few.raw_examples}, few)
    assert f"over {len(few)} of its {len(raw)} questions" in metric_notes(
        "gqa", few)["metric_notes"]["gqa official metrics"]
    assert few_metrics["accuracy"] == pytest.approx(
        100 * sum(d["label"].get("yes", 0) for d in few.raw_examples) / len(few))

    # without the files: binary / open by the answer, said so
    bare = tmp_path / "bare"
    shutil.copytree(synthetic, bare, ignore=shutil.ignore_patterns("questions", ".stores"))
    dev_bare = _dev(bare)
    by_answer, _ = score("gqa", predictions, dev_bare)
    assert set(by_answer) == {"accuracy", "binary", "open"}
    assert by_answer["open"] == 0.0 and by_answer["binary"] != metrics["binary"]
    notes = metric_notes("gqa", dev_bare)["metric_notes"]
    assert notes["gqa binary/open"].startswith("approximated by the gold answer")
    assert notes["gqa official metrics"] == (
        "not computed: no official gqa/questions/testdev_balanced_questions.json under data.root")


@pytest.mark.usefixtures("one_thread")
def test_a_gqa_fine_tuning_stage_records_the_official_metrics(synthetic, tmp_path):
    from dataclasses import replace

    from lxmert_bench.config import TASK_DEFAULTS, DataConfig, OptimConfig, RunConfig
    from lxmert_bench.model import LxmertConfig
    from lxmert_bench.store import RunDir
    from lxmert_bench.train.stages import run_stage

    ft = replace(TASK_DEFAULTS["gqa"], optim=OptimConfig(batch_size=16, epochs=1, max_steps=2))
    data = DataConfig(root=str(synthetic), synthetic=True, synthetic_images=120,
                      fingerprint="synthetic-test")
    cfg = RunConfig(kind="finetune", seed=0, model=LxmertConfig.preset("test"), data=data,
                    finetune=ft, log_every=1, checkpoint_every=100, device="cpu",
                    code_version="test")
    rd = RunDir(tmp_path, cfg.stage_id)
    rd.write_config(cfg)
    result = run_stage(rd)
    metrics = result["metrics"]
    assert {"accuracy", "binary", "open", "consistency", "validity", "plausibility",
            "distribution", "structural/query", "semantic/rel"} <= set(metrics)
    # the official metrics of the kept (best) predictions, recomputed from the written files
    rows = json.loads((rd.path / result["predictions"]["dev"]).read_text())
    predictions = {r["questionId"]: r["prediction"] for r in rows}
    files = load_gqa_eval_files(synthetic, "testdev")
    assert files is not None
    # (the local accuracy equals the official one: the files hold the same questions and answers)
    assert metrics == pytest.approx(gqa_official_metrics(predictions, files.questions, files.choices))
    assert result["metric_notes"]["gqa binary/open"] == "by structural type (official eval.py)"


def test_plan_refuses_malformed_or_mismatched_official_files(synthetic, tmp_path, capsys):
    from lxmert_bench.cli import main

    root = tmp_path / "root"
    shutil.copytree(synthetic, root, ignore=shutil.ignore_patterns(".stores"))
    spec = tmp_path / "g.yaml"
    spec.write_text(textwrap.dedent("""\
        name: g
        variants:
          Only: {pretrain.enabled: false}
        tasks: [gqa]
        seeds: [0]
        """))
    args = ["plan", str(spec), "--profile", "test", "--workdir", str(tmp_path / "wd"),
            "--set", f"data.root={root}"]
    assert main(args) == 0
    questions = root / "gqa/questions/testdev_balanced_questions.json"
    text = questions.read_text()
    questions.write_text(text[:-10])
    capsys.readouterr()
    assert main(args) == 2
    assert f"{questions}:1:" in capsys.readouterr().err
    raw = json.loads(text)
    dropped = next(iter(raw))
    questions.write_text(json.dumps({k: v for k, v in raw.items() if k != dropped}))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{questions}: holds {len(raw) - 1} questions" in err and repr(dropped) in err
    # an answer that differs from the split JSON's label is no reason to refuse: the official
    # metrics use the file's answers, and the notes count them
    raw[dropped]["answer"] = "purple"
    questions.write_text(json.dumps(raw))
    assert main(args) == 0
    from lxmert_bench.train.finetune import metric_notes

    assert "(1 of whose answers differ from the split JSON's labels)" in metric_notes(
        "gqa", _dev(root))["metric_notes"]["gqa official metrics"]


# ---------------------------------------------------------------------------------------------
# the report
def _gqa_run(workdir: Path, variant: str, metrics: dict, notes: dict | None) -> str:
    from lxmert_bench.config import TASK_DEFAULTS, DataConfig, RunConfig

    stage = f"finetune/{variant.lower():0<12}"
    run = workdir / "runs" / stage
    run.mkdir(parents=True)
    cfg = RunConfig(kind="finetune", seed=0, finetune=TASK_DEFAULTS["gqa"],
                    data=DataConfig(root="data", synthetic=True, fingerprint="synthetic-v2-120-0"))
    (run / "config.json").write_text(cfg.to_json())
    result = {"stage_id": stage, "kind": "finetune", "seed": 0, "task": "gqa", "metrics": metrics,
              **({"metric_notes": notes} if notes else {})}
    (run / "result.json").write_text(json.dumps(result))
    return stage


def test_report_shows_the_official_metrics_and_says_how_binary_open_was_split(tmp_path):
    from lxmert_bench.report.collect import ReportEntry, ReportSpec, collect
    from lxmert_bench.report.render import gqa_notes
    from lxmert_bench.report.tables import Summary, detail_tables

    official = {"accuracy": 50.0, "binary": 60.0, "open": 40.0, "consistency": 70.0,
                "validity": 90.0, "plausibility": 80.0, "distribution": 0.5,
                "structural/query": 40.0, "structural/choose": 65.0, "semantic/attr": 45.0}
    worse = {**official, "distribution": 0.9, "validity": 85.0}
    approx = {"accuracy": 48.0, "binary": 70.0, "open": 30.0}
    rule = "approximated by the gold answer (yes/no): the question files carry no structural types"
    entries = [
        ReportEntry("A", 0, "gqa", _gqa_run(tmp_path, "A", official, {
            "gqa binary/open": "by structural type (official eval.py)",
            "gqa official metrics": "official eval.py rules on testdev_balanced_questions.json"})),
        ReportEntry("B", 0, "gqa", _gqa_run(tmp_path, "B", worse, None)),
        ReportEntry("C", 0, "gqa", _gqa_run(tmp_path, "C", approx, {
            "gqa binary/open": rule, "gqa official metrics": "not computed: no official "
            "gqa/questions/testdev_balanced_questions.json under data.root"})),
    ]
    spec = ReportSpec(name="g", title="g", variants=["A", "B", "C"], tasks=["gqa"])
    frame = collect(entries, tmp_path)
    tables = detail_tables(Summary(frame), spec)
    assert list(tables) == ["GQA", "GQA accuracy per structural type",
                            "GQA accuracy per semantic type"]
    header, *rows = [line for line in tables["GQA"].splitlines() if not line.startswith("|-")]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Variant", "accuracy ↑", "binary ↑", "open ↑", "consistency ↑", "validity ↑",
        "plausibility ↑", "distribution ↓"]
    by_variant = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    assert by_variant["A"][7].startswith("**0.50**")  # lower distribution is better
    assert by_variant["B"][7].startswith("0.90") and by_variant["C"][7] == "—"
    structural = tables["GQA accuracy per structural type"].splitlines()[0]
    assert [c.strip() for c in structural.strip("|").split("|")] == ["Variant", "choose ↑", "query ↑"]
    notes = "\n".join(gqa_notes(frame))
    assert f"**Binary / open:** {rule} (1 run)" in notes
    assert "by structural type (official eval.py) (1 run)" in notes
    assert "not recorded" in notes  # B: a run without notes
    assert r"testdev\_balanced\_questions.json under data.root (1 run)" in notes  # Markdown-escaped
    from lxmert_bench.report.render import render_markdown

    markdown = render_markdown(spec, frame, {}, {}, [])
    gqa = markdown.split("### GQA\n", 1)[1].split("### ", 1)[0]
    assert notes in gqa
