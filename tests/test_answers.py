"""Answer tables: the official convert_ans, the pretraining table, task tables, QA-head transfer."""

from __future__ import annotations

import json

import pytest

from lxmert_bench.data.answers import (
    AnswerTable,
    convert_ans,
    load_task_answers,
    qa_head_transfer_rows,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"), ("two", "2"), ("ten", "10"), ("eleven", "eleven"), ("zero", "zero"),
    ("Grey", "gray"), ("grey.", "gray"), ("A dog.", "dog"), ("an apple", "apple"),
    ("The cat", "cat"), ("the man", "man"), ("A woman.", "woman"),
    ("a the dog", "dog"),  # the official strips "a ", then "the " (each once, in that order)
    ("the a dog", "a dog"),  # ... so "the " first leaves "a " in place
    ("Yes", "yes"), ("", ""), (".", ""), ("a", "a"), ("another", "another"),
    ("New York.", "new york"), ("1.5", "1.5"), ("the end.", "end"),
])
def test_convert_ans_follows_the_official_rules(raw: str, expected: str) -> None:
    assert convert_ans(raw) == expected


def _table(tmp_path, entries) -> AnswerTable:
    path = tmp_path / "all_ans.json"
    path.write_text(json.dumps(entries))
    return AnswerTable.load(path)


def test_answer_table_ids_and_qa_set_restriction(tmp_path) -> None:
    entries = [{"ans": "yes", "dsets": ["vqa", "gqa"]}, {"ans": "2", "dsets": ["vqa"]},
               {"ans": "dog", "dsets": ["visual7w"]}, {"ans": "left", "dsets": ["gqa"]}]
    table = _table(tmp_path, entries)
    assert len(table) == table.num_answers == 4
    assert [table.label2ans(table.ans2label(a)) for a in table.answers] == table.answers
    assert table.ans2label("dog") == 2 and table.used("left") and not table.used("Dog")
    with pytest.raises(KeyError, match="'cat' is not in"):
        table.ans2label("cat")
    gqa_only = AnswerTable(entries, dsets=["gqa"])
    assert gqa_only.answers == ["yes", "left"]
    assert gqa_only.ans2label("left") == 1


def test_normalise_label_converts_and_drops_unknown_answers(tmp_path) -> None:
    table = _table(tmp_path, [{"ans": a, "dsets": ["vqa"]} for a in ("2", "dog", "gray")])
    assert table.normalise_label({"Two.": 1, "A dog.": 0.3, "cat": 0.9, "Grey": 0.6}) == \
        {"2": 1, "dog": 0.3, "gray": 0.6}
    assert table.normalise_label({"zebra": 1.0}) == {}


@pytest.mark.parametrize("content, message", [
    ({"ans": "x"}, "expected a JSON list"),
    ([{"ans": "x", "dsets": ["vqa"]}, {"answer": "y"}], r"entry 1: expected"),
    ([{"ans": "x", "dsets": "vqa"}], r"entry 0 \('x'\): 'dsets' should be a list"),
    ([{"ans": "x", "dsets": []}, {"ans": "x", "dsets": []}], "appears twice"),
])
def test_bad_answer_table_names_file_and_entry(tmp_path, content, message) -> None:
    path = tmp_path / "all_ans.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as err:
        AnswerTable.load(path)
    assert str(path) in str(err.value)


def _write_task_tables(root, ans2label, label2ans) -> None:
    (root / "vqa").mkdir(parents=True, exist_ok=True)
    (root / "vqa" / "trainval_ans2label.json").write_text(json.dumps(ans2label))
    (root / "vqa" / "trainval_label2ans.json").write_text(json.dumps(label2ans))


def test_load_task_answers_checks_the_two_tables_agree(tmp_path) -> None:
    _write_task_tables(tmp_path, {"yes": 0, "no": 1, "2": 2}, ["yes", "no", "2"])
    ans2label, label2ans = load_task_answers(tmp_path, "vqa")
    assert all(label2ans[ans2label[a]] == a for a in ans2label)

    _write_task_tables(tmp_path, {"yes": 0, "no": 2, "2": 1}, ["yes", "no", "2"])
    with pytest.raises(ValueError, match=r"'no' -> 2, but .*trainval_label2ans.json\[2\] is '2'"):
        load_task_answers(tmp_path, "vqa")
    _write_task_tables(tmp_path, {"yes": 0}, ["yes", "no"])
    with pytest.raises(ValueError, match="has 1 answers but .* has 2"):
        load_task_answers(tmp_path, "vqa")
    with pytest.raises(FileNotFoundError, match="gqa/trainval_ans2label.json"):
        load_task_answers(tmp_path, "gqa")
    with pytest.raises(ValueError, match="task 'nlvr2' has no answer table"):
        load_task_answers(tmp_path, "nlvr2")


def test_qa_head_transfer_maps_normalised_answers_and_skips_the_rest(tmp_path) -> None:
    table = _table(tmp_path, [{"ans": a, "dsets": ["vqa"]} for a in ("no", "yes", "2", "dog")])
    task_label2ans = ["yes", "Two", "zebra", "the dog", "", "no"]
    task_rows, pretrain_rows = qa_head_transfer_rows(task_label2ans, table)
    assert task_rows == [0, 1, 3, 5]  # "zebra" and "" stay unmapped (the caller zeroes them)
    assert pretrain_rows == [1, 2, 3, 0]
    assert [table.label2ans(p) for p in pretrain_rows] == [
        convert_ans(task_label2ans[t]) for t in task_rows]
