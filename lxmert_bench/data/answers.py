"""Answer tables: the pretraining QA table (``lxmert/all_ans.json``) and the task tables.

The pretraining table normalises answers with the official ``convert_ans`` (LXMERT_FACTS.md §3) so
that "Two.", "a dog" and "grey" from different QA sources meet as "2", "dog" and "gray". Fine-tuning
starts the task QA head from the pretrained one through :func:`qa_head_transfer_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lxmert_bench.io import read_json

# Whole-answer rewrites applied after the article / period stripping, as the official table does.
# ("a man" / "the man" are listed there too but the article stripping has already made them "man".)
ANSWER_REWRITES: dict[str, str] = {
    "a man": "man", "the man": "man", "a woman": "woman", "the woman": "woman",
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    "grey": "gray",
}
_ARTICLES = ("a ", "an ", "the ")  # stripped in this order, each at most once

# Which answer tables each fine-tuning task has (NLVR2 is a binary task without one).
TASK_ANSWER_FILES: dict[str, tuple[str, str]] = {
    "vqa": ("vqa/trainval_ans2label.json", "vqa/trainval_label2ans.json"),
    "gqa": ("gqa/trainval_ans2label.json", "gqa/trainval_label2ans.json"),
}
PRETRAIN_ANSWER_FILE = "lxmert/all_ans.json"


def convert_ans(ans: str) -> str:
    """The official answer normalisation: lower-case, drop one trailing '.', drop a leading
    "a " / "an " / "the ", then map number words one..ten to digits and grey to gray."""
    if not ans:
        return ""
    ans = ans.lower()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    for article in _ARTICLES:
        if ans.startswith(article):
            ans = ans[len(article):].strip()
    return ANSWER_REWRITES.get(ans, ans)


class AnswerTable:
    """The pretraining QA answers: ``all_ans.json`` is a list of ``{"ans": str, "dsets": [str]}``.

    ``dsets`` restricts the table to answers used by those QA sources (the official ``--qaSets``);
    None keeps all answers (the official default).
    """

    def __init__(self, entries: Sequence[dict[str, Any]], dsets: Iterable[str] | None = None,
                 source: str = "all_ans.json"):
        if not isinstance(entries, list):
            raise ValueError(f"{source}: expected a JSON list of {{\"ans\", \"dsets\"}} objects, "
                             f"got {type(entries).__name__}")
        keep = None if dsets is None else set(dsets)
        answers: list[str] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("ans"), str):
                raise ValueError(f"{source}: entry {i}: expected {{\"ans\": str, \"dsets\": [...]}}, "
                                 f"got {entry!r:.80}")
            tags = entry.get("dsets", [])
            if not isinstance(tags, list):
                raise ValueError(f"{source}: entry {i} ({entry['ans']!r}): 'dsets' should be a list")
            if keep is None or keep & set(tags):
                answers.append(entry["ans"])
        self.answers: list[str] = answers
        self._ids: dict[str, int] = {}
        for i, ans in enumerate(answers):
            if ans in self._ids:
                raise ValueError(f"{source}: answer {ans!r} appears twice (entries "
                                 f"{self._ids[ans]} and {i}); answers must be unique")
            self._ids[ans] = i

    @classmethod
    def load(cls, path: str | Path, dsets: Iterable[str] | None = None) -> AnswerTable:
        return cls(read_json(path), dsets=dsets, source=str(path))

    @classmethod
    def from_root(cls, root: str | Path, dsets: Iterable[str] | None = None) -> AnswerTable:
        return cls.load(Path(root) / PRETRAIN_ANSWER_FILE, dsets=dsets)

    convert_ans = staticmethod(convert_ans)

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def used(self, ans: str) -> bool:
        """Whether the (already normalised) answer is in the table."""
        return ans in self._ids

    def ans2label(self, ans: str) -> int:
        try:
            return self._ids[ans]
        except KeyError:
            raise KeyError(f"answer {ans!r} is not in the pretraining answer table") from None

    def label2ans(self, label: int) -> str:
        return self.answers[label]

    def normalise_label(self, label: dict[str, float]) -> dict[str, float]:
        """``{answer: score}`` with answers normalised and those outside the table dropped, as the
        official pretraining loader does (a later duplicate overwrites an earlier one's score)."""
        out: dict[str, float] = {}
        for ans, score in label.items():
            new = convert_ans(ans)
            if new in self._ids:
                out[new] = score
        return out


def load_task_answers(root: str | Path, task: str) -> tuple[dict[str, int], list[str]]:
    """A task's ``(ans2label, label2ans)`` from ``<root>/<task>/trainval_*.json``, checked to agree."""
    if task not in TASK_ANSWER_FILES:
        raise ValueError(f"task {task!r} has no answer table (known: {sorted(TASK_ANSWER_FILES)})")
    a2l_path, l2a_path = (Path(root) / p for p in TASK_ANSWER_FILES[task])
    ans2label = read_json(a2l_path)
    label2ans = read_json(l2a_path)
    if not isinstance(ans2label, dict):
        raise ValueError(f"{a2l_path}: expected a JSON object answer -> label id, "
                         f"got {type(ans2label).__name__}")
    if not isinstance(label2ans, list):
        raise ValueError(f"{l2a_path}: expected a JSON list of answers (index = label id), "
                         f"got {type(label2ans).__name__}")
    if len(ans2label) != len(label2ans):
        raise ValueError(f"{a2l_path} has {len(ans2label)} answers but {l2a_path} has "
                         f"{len(label2ans)}; the two tables must match")
    for ans, label in ans2label.items():
        if not isinstance(label, int) or not 0 <= label < len(label2ans) or label2ans[label] != ans:
            found = label2ans[label] if isinstance(label, int) and 0 <= label < len(label2ans) else None
            raise ValueError(f"{a2l_path}: answer {ans!r} -> {label!r}, but {l2a_path}[{label!r}] is "
                             f"{found!r}; the two tables must match")
    return ans2label, label2ans


def qa_head_transfer_rows(
    task_label2ans: Sequence[str], pretrain_table: AnswerTable,
) -> tuple[list[int], list[int]]:
    """Rows of the pretrained QA head to copy into the task head (official ``load_lxmert_qa``).

    Returns ``(task_rows, pretrain_rows)``: task row ``task_rows[i]`` starts from pretrained row
    ``pretrain_rows[i]``. Task answers missing from the table after ``convert_ans`` are not listed;
    the caller zeroes their rows (weight and bias), as the official code does.
    """
    task_rows: list[int] = []
    pretrain_rows: list[int] = []
    for label, ans in enumerate(task_label2ans):
        new = convert_ans(ans)
        if pretrain_table.used(new):
            task_rows.append(label)
            pretrain_rows.append(pretrain_table.ans2label(new))
    return task_rows, pretrain_rows
