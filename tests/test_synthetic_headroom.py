"""benchmarks/synthetic_headroom.py: the synthetic benchmark's text-only floor and the matching
ceiling of a rule on the detector's labels, on a small compact root.

What the design promises and the benchmark measures: text alone does not answer the questions
(VQA and GQA floors far below 100 %, NLVR2's exactly 50 % since every statement is true for half
of its pairs), while the labels of the boxes the model reads settle most matching pairs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lxmert_bench.data.synthetic import generate_synthetic

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "synthetic_headroom.py"


@pytest.fixture(scope="module")
def headroom():
    spec = importlib.util.spec_from_file_location("synthetic_headroom", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("headroom") / "data"
    generate_synthetic(out, images=400, design="compact", progress=False)
    return out


def test_text_alone_does_not_answer(headroom, root):
    floors = headroom.text_floors(root)
    assert set(floors) == {"VQA", "GQA", "NLVR2"}
    assert 20 < floors["VQA"] < 60 and 10 < floors["GQA"] < 45
    assert floors["NLVR2"] == pytest.approx(50.0)


def test_text_only_answers_fall_back_to_the_most_frequent_answer(headroom):
    train = [{"sent": "a?", "label": {"x": 1}}, {"sent": "a?", "label": {"y": 0.3}},
             {"sent": "b?", "label": {"y": 1}}, {"sent": "c?", "label": {"y": 0.6}}]
    dev = [{"id": 1, "sent": "a?"}, {"id": 2, "sent": "never seen?"}]
    assert headroom.text_only_answers(train, dev, "id") == {1: "x", 2: "y"}


def test_detected_labels_settle_most_matching_pairs(headroom, root):
    ceiling = headroom.matching_ceiling(root, boxes=16, design="compact")
    assert set(ceiling) == {"all", "captions", "questions"}
    assert ceiling["captions"] > 75 and ceiling["all"] > 70
    # reading fewer boxes loses objects (the rule says "not there" for them): the rule sees that
    assert headroom.matching_ceiling(root, boxes=1, design="compact")["all"] < ceiling["all"]


def test_named_classes_reads_plurals(headroom):
    assert headroom.named_classes("How many dogs are there? A red cup.") == {"dog", "cup"}
