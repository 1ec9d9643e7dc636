"""Official VQA / GQA / NLVR2 metrics on hand-computed examples, and the submission files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lxmert_bench.metrics import (
    gqa_accuracy,
    gqa_scores,
    nlvr2_group,
    nlvr2_metrics,
    normalize_vqa_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_example_scores,
    vqa_scores,
    vqa_soft_accuracy,
    write_gqa_predictions,
    write_nlvr2_predictions,
    write_vqa_predictions,
)


@pytest.mark.parametrize("raw, clean", [
    ("Two", "2"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("the dog", "dog"),
    ("A  red car.", "red car"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Im", "im"),  # the official table's capitalised keys never match after lower-casing
    ("yes!", "yes"),
    ("hello, world", "hello world"),  # mark next to a space: deleted
    ("black/white", "black white"),  # mark between letters: becomes a space
    ("1,000", "1000"),  # a digit,digit comma: every mark is deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("5.", "5"),
    ("t.v.", "tv"),
    ("man's", "man's"),  # apostrophes are not punctuation here
    ("\tThe Cat\n", "cat"),
    ("(left)", "left"),
    ("one-way", "1 way"),  # '-' -> space, then number words
])
def test_vqa_normalisation(raw, clean):
    assert normalize_vqa_answer(raw) == clean


def test_punctuation_step_alone():
    assert process_punctuation("t.v.") == "tv"
    assert process_punctuation("the dog?") == "the dog "  # no lower-casing or article removal
    assert process_punctuation("." * 40) == "." * 8  # the official sub() stops after 32


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                         (7, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k, expected):
    humans = ["blue"] * k + ["red", "green", "navy", "teal", "cyan", "gray", "pink", "gold",
                             "tan", "plum"][: 10 - k]
    # ten identical answers: master compares unprocessed strings (tests/test_official_metrics.py)
    assert vqa_accuracy("Blue" if k < 10 else "blue", humans) == pytest.approx(expected)
    assert vqa_accuracy("Blue", humans, rule="2016") == pytest.approx(expected)


def test_2016_rule_humans_get_only_punctuation_and_only_when_they_differ():
    rule = "2016"
    # differing answers: "t.v." is cleaned to "tv", so all ten match the prediction
    assert vqa_accuracy("TV", ["t.v."] * 3 + ["tv"] * 7, rule=rule) == 1.0
    assert vqa_accuracy("TV", ["t.v."] * 3 + ["tv"] * 7) == 1.0  # master too
    # ten identical answers are left as they are: "t.v." never equals the cleaned prediction
    assert vqa_accuracy("t.v.", ["t.v."] * 10, rule=rule) == 0.0
    # no number-word or article step on the humans: "two" and "the dog" never match
    assert vqa_accuracy("two", ["two"] * 4 + ["2"] * 6, rule=rule) == 1.0
    assert vqa_accuracy("two", ["two"] * 8 + ["2"] * 2, rule=rule) == pytest.approx(0.6)
    assert vqa_accuracy("the dog", ["the dog"] * 9 + ["dog"], rule=rule) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("x", [])


def test_soft_scores_equal_official_accuracy_of_the_same_matches():
    humans = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 3 + ["dark red"] * 7}
    preds = {1: "yes", 2: "two", 3: "red"}
    official = vqa_example_scores(preds, human_answers=humans)
    assert official == pytest.approx({1: 1.0, 2: 0.6, 3: 0.9})
    labels = {1: {"yes": 1.0}, 2: {"2": 0.6, "3": 1.0}, 3: {"red": 0.9, "dark red": 1.0}}
    soft = vqa_example_scores({1: "yes", 2: "2", 3: "red"}, labels=labels)
    assert soft == pytest.approx(official)


def test_vqa_soft_accuracy_and_per_type():
    labels = {10: {"yes": 1.0}, 11: {"2": 0.6, "3": 0.3}, 12: {"red": 0.9}, 13: {"no": 1.0}}
    preds = {10: "yes", 11: "3", 12: "blue", 13: "no"}
    assert vqa_soft_accuracy(preds, labels) == pytest.approx(100 * (1 + 0.3 + 0 + 1) / 4)
    types = {10: "yes/no", 11: "number", 12: "other", 13: "yes/no"}
    scores = vqa_scores(preds, labels, answer_types=types)
    assert scores == pytest.approx({"accuracy": 57.5, "yes/no": 100.0, "number": 30.0,
                                    "other": 0.0})
    with pytest.raises(KeyError, match="1 VQA prediction.*no label, e.g. id 99"):
        vqa_soft_accuracy({**preds, 99: "yes"}, labels)
    with pytest.raises(ValueError, match="exactly one of"):
        vqa_scores(preds)


def test_gqa():
    answers = {"a": "yes", "b": "pipe", "c": "no", "d": "left"}
    preds = {"a": "yes", "b": "pipe", "c": "yes", "d": "right"}
    assert gqa_accuracy(preds, answers) == 50.0
    labels = {k: {v: 1.0} for k, v in answers.items()}  # the JSONs' {answer: 1.0} form
    assert gqa_accuracy(preds, labels) == 50.0
    assert gqa_scores(preds, answers) == {"accuracy": 50.0, "binary": 50.0, "open": 50.0}
    with pytest.raises(KeyError, match="GQA"):
        gqa_accuracy({"zz": "yes"}, answers)


def test_nlvr2_accuracy_and_consistency():
    assert nlvr2_group("dev-850-0-1") == "dev-850-1"
    labels = {
        "dev-850-0-1": True, "dev-850-1-1": "True", "dev-850-2-1": False,  # sentence dev-850-1
        "dev-850-0-0": 1, "dev-850-1-0": "false",                       # sentence dev-850-0
        "dev-7-3-2": 0,                                                 # sentence dev-7-2
    }
    preds = {
        "dev-850-0-1": 1, "dev-850-1-1": True, "dev-850-2-1": True,  # one wrong: inconsistent
        "dev-850-0-0": np.bool_(True), "dev-850-1-0": np.int64(0),
        "dev-7-3-2": False,
    }
    m = nlvr2_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(100 * 5 / 6)
    assert m["consistency"] == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="1 of 6 NLVR2 examples have no prediction.*'dev-7-3-2'"):
        nlvr2_metrics({k: v for k, v in preds.items() if k != "dev-7-3-2"}, labels)
    with pytest.raises(ValueError, match="prediction for dev-7-3-2: expected a boolean"):
        nlvr2_metrics({**preds, "dev-7-3-2": "maybe"}, labels)


def test_submission_files_parse_back(tmp_path):
    write_vqa_predictions(tmp_path / "vqa.json", {"458752000": "net", 262148000: "2"})
    assert json.loads((tmp_path / "vqa.json").read_text()) == [
        {"question_id": 458752000, "answer": "net"}, {"question_id": 262148000, "answer": "2"}]
    write_gqa_predictions(tmp_path / "gqa.json", {"07333408": "pipe", 201: "yes"})
    assert json.loads((tmp_path / "gqa.json").read_text()) == [
        {"questionId": "07333408", "prediction": "pipe"}, {"questionId": "201", "prediction": "yes"}]
    write_nlvr2_predictions(tmp_path / "nlvr2.csv", {"test1-0-1-0": True, "test1-0-0-0": 0})
    text = (tmp_path / "nlvr2.csv").read_text()
    assert text == "test1-0-1-0,True\ntest1-0-0-0,False\n"
    # read as the official metrics.py does: line.strip().split(",")
    assert dict(line.strip().split(",") for line in text.splitlines()) == {
        "test1-0-1-0": "True", "test1-0-0-0": "False"}
    assert list(csv.reader(text.splitlines()))[0] == ["test1-0-1-0", "True"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqa.json", "nlvr2.csv", "vqa.json"]
    with pytest.raises(ValueError, match="question_id must be an integer, got 'q1'"):
        write_vqa_predictions(tmp_path / "bad.json", {"q1": "yes"})
    assert not (tmp_path / "bad.json").exists()
