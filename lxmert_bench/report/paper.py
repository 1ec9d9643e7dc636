"""The paper's numbers (Tan & Bansal 2019, Tables 2-5; LXMERT_FACTS.md §6), printed beside ours.

Values are keyed by table, row name and ``(task, metric)``, with the metric names of ``result.json``
(``accuracy``, ``yes/no``, ``number``, ``other``, ``binary``, ``open``, ``consistency``).
Tables 3-5 are dev-set accuracies (VQA minival, GQA testdev, NLVR² dev); Table 2 is the test sets,
so it is never comparable with a dev-set run and is kept for reference only.
A missing value (the paper's "–") is ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Cell = tuple[str, str]  # (task, metric)


@dataclass(frozen=True)
class PaperTable:
    key: str
    caption: str
    split: str  # which split the numbers are on
    rows: dict[str, dict[Cell, float | None]] = field(default_factory=dict)


def _dev(vqa: float | None, gqa: float | None, nlvr2: float | None) -> dict[Cell, float | None]:
    return {("vqa", "accuracy"): vqa, ("gqa", "accuracy"): gqa, ("nlvr2", "accuracy"): nlvr2}


def _test(vqa: tuple, gqa: tuple, nlvr2: tuple) -> dict[Cell, float | None]:
    """Table 2's columns: VQA binary/number/other/accu, GQA binary/open/accu, NLVR² cons/accu."""
    keys = [("vqa", "yes/no"), ("vqa", "number"), ("vqa", "other"), ("vqa", "accuracy"),
            ("gqa", "binary"), ("gqa", "open"), ("gqa", "accuracy"),
            ("nlvr2", "consistency"), ("nlvr2", "accuracy")]
    return dict(zip(keys, (*vqa, *gqa, *nlvr2), strict=True))


_ = None  # the paper's "–"

PAPER_TABLES: dict[str, PaperTable] = {
    "table2": PaperTable("table2", "Table 2: test results", "VQA/GQA test-standard, NLVR² Test-U", {
        "Human": _test((_, _, _, _), (91.2, 87.4, 89.3), (_, 96.3)),
        "Image Only": _test((_, _, _, _), (36.1, 1.74, 17.8), (7.40, 51.9)),
        "Language Only": _test((66.8, 31.8, 27.6, 44.3), (61.9, 22.7, 41.1), (4.20, 51.1)),
        "State-of-the-Art": _test((85.8, 53.7, 60.7, 70.4), (76.0, 40.4, 57.1), (12.0, 53.5)),
        "LXMERT": _test((88.2, 54.2, 63.1, 72.5), (77.8, 45.0, 60.3), (42.1, 76.2)),
    }),
    "table3": PaperTable("table3", "Table 3: BERT initialisation and pretraining", "dev", {
        "LSTM + BUTD": _dev(63.1, 50.0, 52.6),
        "BERT + BUTD": _dev(62.8, 52.1, 51.9),
        "BERT + 1 CrossAtt": _dev(64.6, 55.5, 52.4),
        "BERT + 2 CrossAtt": _dev(65.8, 56.1, 50.9),
        "BERT + 3 CrossAtt": _dev(66.4, 56.6, 50.9),
        "BERT + 4 CrossAtt": _dev(66.4, 56.0, 50.9),
        "BERT + 5 CrossAtt": _dev(66.5, 56.3, 50.9),
        "Train + BERT": _dev(65.5, 56.2, 50.9),
        "Train + scratch": _dev(65.1, 50.0, 50.9),
        "Pre-train + BERT": _dev(68.8, 58.3, 70.1),
        "Pre-train + scratch": _dev(69.9, 60.0, 74.9),
    }),
    "table4": PaperTable("table4", "Table 4: image-QA pretraining", "dev", {
        "P20 + DA": _dev(68.0, 58.1, _),
        "P20 + FT": _dev(68.9, 58.2, 72.4),
        "P10+QA10 + DA": _dev(69.1, 59.2, _),
        "P10+QA10 + FT": _dev(69.9, 60.0, 74.9),
    }),
    "table5": PaperTable("table5", "Table 5: vision pretraining tasks", "dev", {
        "No Vision Tasks": _dev(66.3, 57.1, 50.9),
        "Feat": _dev(69.2, 59.5, 72.9),
        "Label": _dev(69.5, 59.3, 73.5),
        "Feat + Label": _dev(69.9, 60.0, 74.9),
    }),
}

# The official code's README (GitHub version, 20 epochs): local validation accuracy.
OFFICIAL_CODE_DEV: dict[Cell, float] = {
    ("vqa", "accuracy"): 69.90, ("gqa", "accuracy"): 59.80, ("nlvr2", "accuracy"): 74.95,
}


def normalize_row_name(name: str) -> str:
    """A row name with case, spacing, hyphens, bold marks, numbering ('4. ') and '²' ignored."""
    s = name.strip().replace("**", "").replace("²", "2").lower()
    s = re.sub(r"^\d+\.\s*", "", s)
    return re.sub(r"[\s\-_]+", "", s)


def paper_table(key: str) -> PaperTable:
    """The paper table named ``key`` ('table2' ... 'table5'; 'Table 5' and '5' work too)."""
    k = re.sub(r"\s+", "", str(key)).lower()
    k = k if k.startswith("table") else f"table{k}"
    if k not in PAPER_TABLES:
        raise KeyError(f"unknown paper table {key!r}; known: {sorted(PAPER_TABLES)}")
    return PAPER_TABLES[k]


def paper_row(table: str, row: str) -> dict[Cell, float | None] | None:
    """The paper's numbers of ``row`` in ``table``, or None when the paper has no such row."""
    wanted = normalize_row_name(row)
    for name, values in paper_table(table).rows.items():
        if normalize_row_name(name) == wanted:
            return values
    return None


def paper_row_name(table: str, row: str) -> str | None:
    """The paper's own spelling of ``row`` (None when absent)."""
    wanted = normalize_row_name(row)
    return next((n for n in paper_table(table).rows if normalize_row_name(n) == wanted), None)


def paper_value(table: str | None, row: str, task: str, metric: str = "accuracy") -> float | None:
    """One number of the paper, or None (no table, no such row, or the paper's '–')."""
    if table is None:
        return None
    values = paper_row(table, row)
    return None if values is None else values.get((task, metric))
