"""The official evaluators' rules (issue 12), worked out by hand from LXMERT_FACTS.md §5:

- VQA ``vqaEval.py`` current master: when the ten human answers are not all the same, the humans'
  answers AND the prediction get the punctuation and digit/article steps; when all ten agree,
  neither side is processed (exact match). The 2016 version (``rule="2016"``) always processed the
  prediction and gave the humans only the punctuation step. ``\\d`` is ASCII-only, as the Python 2
  code's regexes are.
- GQA ``eval.py``: a question is open iff its structural type is ``query``, else binary.
- Both refuse a prediction set that misses questions.
"""

from __future__ import annotations

import shutil

import pytest

from lxmert_bench.metrics import (
    gqa_accuracy,
    gqa_scores,
    nlvr2_metrics,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_example_scores,
    vqa_scores,
)


def test_vqa_master_processes_the_humans_fully():
    # the examples: master 1.0 where the 2016 rule gave 0.6 and 0.0
    assert vqa_accuracy("two", ["two"] * 8 + ["2"] * 2) == 1.0
    assert vqa_accuracy("two", ["two"] * 8 + ["2"] * 2, rule="2016") == pytest.approx(0.6)
    dont_know = ["dont know"] * 8 + ["no"] * 2
    assert vqa_accuracy("dont know", dont_know) == 1.0
    assert vqa_accuracy("dont know", dont_know, rule="2016") == 0.0
    # articles on the humans' side are dropped too (master), not by 2016
    assert vqa_accuracy("the dog", ["the dog"] * 9 + ["dog"]) == 1.0
    assert vqa_accuracy("the dog", ["the dog"] * 9 + ["dog"], rule="2016") == pytest.approx(0.3)


def test_vqa_master_processes_neither_side_when_all_ten_agree():
    assert vqa_accuracy("t.v.", ["t.v."] * 10) == 1.0  # exact match
    assert vqa_accuracy("tv", ["t.v."] * 10) == 0.0  # no cleaning of either side
    assert vqa_accuracy("Blue", ["blue"] * 10) == 0.0  # not even lower-casing
    assert vqa_accuracy(" blue\n", ["blue"] * 10) == 1.0  # only whitespace is trimmed
    assert vqa_accuracy("Blue", ["blue"] * 10, rule="2016") == 1.0
    with pytest.raises(ValueError, match="rule"):
        vqa_accuracy("x", ["x"], rule="2021")


def test_vqa_digits_are_ascii_only():
    # full-width digits are not \d in Python 2's regexes: the period between them goes
    assert normalize_vqa_answer("３.５") == "３５"
    assert normalize_vqa_answer("3.5") == "3.5"
    # a comma between full-width digits is not a digit,digit comma: replaced by a space
    assert normalize_vqa_answer("１,０") == "１ ０"
    assert normalize_vqa_answer("1,0") == "10"


def test_incomplete_prediction_sets_are_refused():
    labels = {1: {"yes": 1.0}, 2: {"no": 1.0}, 3: {"2": 1.0}}
    with pytest.raises(ValueError, match=r"2 of 3 VQA questions have no prediction"):
        vqa_scores({1: "yes"}, labels)
    with pytest.raises(ValueError, match=r"1 of 3 VQA questions have no prediction"):
        vqa_example_scores({1: "yes", 2: "no"}, human_answers={q: ["yes"] * 10 for q in labels})
    with pytest.raises(ValueError, match=r"1 of 2 GQA questions have no prediction.*'b'"):
        gqa_accuracy({"a": "yes"}, {"a": "yes", "b": "no"})
    with pytest.raises(ValueError, match=r"1 of 2 NLVR2 examples have no prediction"):
        nlvr2_metrics({"dev-1-0-0": True}, {"dev-1-0-0": True, "dev-1-1-0": False})


def test_gqa_binary_and_open_by_structural_type():
    answers = {"a": "yes", "b": "left", "c": "no", "d": "red"}
    preds = {"a": "yes", "b": "left", "c": "yes", "d": "blue"}
    # "b" is a choose question ("left or right?"): binary by type though its answer is not yes/no;
    # "c" is a yes/no query-free verify; "d" a query
    types = {"a": "verify", "b": "choose", "c": "logical", "d": "query"}
    assert gqa_scores(preds, answers, structural_types=types) == pytest.approx(
        {"accuracy": 50.0, "binary": 100 * 2 / 3, "open": 0.0})
    # without the types: approximated by the answer (b counts as open)
    assert gqa_scores(preds, answers) == {"accuracy": 50.0, "binary": 50.0, "open": 50.0}
    with pytest.raises(ValueError, match="structural type.*'d'"):
        gqa_scores(preds, answers, structural_types={k: v for k, v in types.items() if k != "d"})


def test_gqa_fine_tuning_scores_by_structural_type_when_the_records_carry_it(tmp_path):
    from lxmert_bench.config import DataConfig
    from lxmert_bench.data.root import ensure_data_root
    from lxmert_bench.data.tasks import GQADataset
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.finetune import metric_notes, score

    data = DataConfig(root=str(tmp_path / "syn"), synthetic=True, synthetic_images=100)
    ensure_data_root(data)
    # without the official balanced files (tests/test_gqa_official.py scores with them)
    shutil.rmtree(tmp_path / "syn" / "gqa" / "questions")
    dev = GQADataset(data.root, ["testdev"], load_tokenizer(data))
    raw = dev.raw_examples
    predictions = {d["question_id"]: "yes" for d in raw}
    assert "approximated" in metric_notes("gqa", dev)["metric_notes"]["gqa binary/open"]
    by_answer, _ = score("gqa", predictions, dev)
    for d in raw:  # every question a query: all open, none binary
        d["types"] = {"structural": "query", "semantic": "attr"}
    assert "structural" in metric_notes("gqa", dev)["metric_notes"]["gqa binary/open"]
    by_type, _ = score("gqa", predictions, dev)
    assert "binary" not in by_type and by_type["open"] == by_type["accuracy"] == by_answer["accuracy"]
    assert "binary" in by_answer  # the synthetic yes/no answers counted as binary
