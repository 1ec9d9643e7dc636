"""JSON Lines through one home (io.py, on the `jsonlines` package): log.jsonl, results.jsonl and
submissions.jsonl are written and read by these helpers, with a torn last line tolerated where a
writer may have been killed, and every other bad line named by file and line."""

from __future__ import annotations

import json
import threading

import pandas as pd
import pytest

from lxmert_bench.io import (
    append_jsonl,
    iter_jsonl_objects,
    jsonl_line,
    read_jsonl,
    write_jsonl,
)
from lxmert_bench.report.collect import read_results_jsonl, write_results_jsonl


def test_lines_are_json_objects_one_per_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1, "loss": 2.5})
    append_jsonl(path, {"step": 2, "name": "Feat + Label ✓"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(ln) for ln in lines] == [{"step": 1, "loss": 2.5},
                                                {"step": 2, "name": "Feat + Label ✓"}]
    assert jsonl_line({"a": 1}) == '{"a": 1}\n'  # the spacing json.dumps writes
    assert read_jsonl(path) == [json.loads(ln) for ln in lines]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_torn_last_line_only_is_tolerated(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with pytest.raises(ValueError, match=r"log\.jsonl:4: invalid JSON line"):
        read_jsonl(path, torn_last_ok=False)
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: invalid JSON line"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    # a follower of a live log skips what is not an object and never stops
    assert list(iter_jsonl_objects([b'{"a": 1}', b"{torn", b"[1]", b'{"b": 2}'])) == [
        {"a": 1}, {"b": 2}]


def test_concurrent_appends_never_interleave_a_line(tmp_path):
    path = tmp_path / "submissions.jsonl"
    payload = "x" * 2000

    def writer(k: int) -> None:
        for i in range(50):
            append_jsonl(path, {"writer": k, "i": i, "pad": payload})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_jsonl(path, torn_last_ok=False)
    assert len(records) == 200 and all(r["pad"] == payload for r in records)


def test_write_jsonl_replaces_the_whole_file(tmp_path):
    path = tmp_path / "results.jsonl"
    write_jsonl(path, [{"a": 1}, {"a": 2}])
    write_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 3}]
    assert not [p for p in tmp_path.iterdir() if p.name != "results.jsonl"]  # no temporaries


def test_results_jsonl_round_trip_with_missing_values(tmp_path):
    frame = pd.DataFrame({"variant": ["A", "B"], "seed": pd.array([0, None], dtype="Int64"),
                          "value": [51.5, float("nan")], "error": [None, "boom"]})
    path = tmp_path / "results.jsonl"
    write_results_jsonl(frame, path)
    rows = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert rows[1]["value"] is None and rows[1]["seed"] is None  # null, never NaN
    back = read_results_jsonl(path)
    assert list(back["variant"]) == ["A", "B"] and back["seed"].tolist()[0] == 0
    assert back["value"].iloc[0] == 51.5 and pd.isna(back["value"].iloc[1])
