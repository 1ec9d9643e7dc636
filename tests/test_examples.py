"""The example reports committed under results/examples/<spec>/ (made by results/make_examples.sh
from a demo run) are whole and current: report.md parses, carries this version's report-format
stamp, shows the main results table and every plot it names (PNG files that exist and say their
profile and that the synthetic benchmark is not the paper's), and its results.jsonl reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from PIL import Image

from lxmert_bench.io import read_jsonl
from lxmert_bench.report.plots import NOTE_KEY, SYNTHETIC_NOTE
from lxmert_bench.report.render import REPORT_FORMAT, REPORT_FORMAT_TEXT

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "results" / "examples"
SHIPPED = {p.stem for p in (REPO / "ablations").glob("*.yaml")}
FOUND = sorted(p for p in EXAMPLES.iterdir() if p.is_dir()) if EXAMPLES.is_dir() else []


def test_examples_are_committed_for_shipped_specs():
    assert FOUND, f"no example report under {EXAMPLES} (results/make_examples.sh makes them)"
    assert {p.name for p in FOUND} <= SHIPPED
    assert (REPO / "results" / "README.md").is_file()


@pytest.mark.parametrize("example", FOUND, ids=[p.name for p in FOUND])
def test_example_report_is_whole_and_current(example):
    text = (example / "report.md").read_text(encoding="utf-8")
    assert REPORT_FORMAT_TEXT.format(REPORT_FORMAT) in text, (
        f"{example}/report.md is of an older report format: rebuild it with "
        f"results/make_examples.sh {example.name}")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headers = [tok.content for i, tok in enumerate(tokens)
               if tok.type == "inline" and tokens[i - 1].type == "th_open"]
    assert any(h.endswith("↑") for h in headers), "no main results table"
    assert "demo" in text and "NOT THE PAPER'S NUMBERS" in text
    images = [child.attrs["src"] for tok in tokens for child in (tok.children or [])
              if child.type == "image"]
    assert images, "the report names no plot"
    for name in images:
        path = example / name
        assert path.is_file(), f"{example}/report.md shows {name}, which is not there"
        with Image.open(path) as image:
            assert image.format == "PNG"
            note = image.text.get(NOTE_KEY, "")
        assert note.startswith("profile demo") and SYNTHETIC_NOTE in note, name
    rows = read_jsonl(example / "results.jsonl", torn_last_ok=False)
    assert rows and {"variant", "task", "value", "state"} <= set(rows[0])
