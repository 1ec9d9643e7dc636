"""The official GQA question and choices files, for the official evaluation (metrics.py).

    <root>/gqa/questions/{val,testdev}_balanced_questions.json   {questionId: question}
    <root>/gqa/questions/{val,testdev}_choices.json              {questionId: {"valid", "plausible"}}

These are the GQA release's own files (questions1.2.zip, choices), named by its tiers: LXMERT's
``valid`` split was made from ``val_balanced_questions.json``, ``testdev`` from
``testdev_balanced_questions.json``. LXMERT's processed JSONs (``gqa/{split}.json``) do not
carry the types, entailed questions and groups the official metrics need, so they are read
from these files when present; without them binary / open is approximated by the answer.
Only the fields the official evaluator reads are kept (:class:`metrics.GQAQuestion`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxmert_bench.metrics import GQAChoices, GQAQuestion

QUESTIONS_DIR = "gqa/questions"
# LXMERT split -> the official file's tier (the training split is never evaluated)
GQA_EVAL_TIERS = {"valid": "val", "testdev": "testdev"}


def questions_file(split: str) -> str | None:
    """The balanced question file of an LXMERT GQA split, relative to the root (None: none)."""
    tier = GQA_EVAL_TIERS.get(split)
    return None if tier is None else f"{QUESTIONS_DIR}/{tier}_balanced_questions.json"


def choices_file(split: str) -> str | None:
    tier = GQA_EVAL_TIERS.get(split)
    return None if tier is None else f"{QUESTIONS_DIR}/{tier}_choices.json"


class GQAFileError(ValueError):
    """A malformed official GQA file; the message names the file and the question."""


def _load(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GQAFileError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise GQAFileError(f"{path}: not UTF-8 text at byte {e.start}") from None
    except OSError as e:
        raise GQAFileError(f"{path}: cannot be read ({e.strerror})") from None


def _object(path: Path, data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise GQAFileError(f"{path}: expected a JSON object {{questionId: {what}}} (the official "
                           f"GQA format), got {type(data).__name__}")
    return data


def _field(path: Path, qid: str, record: Any, key: str, typ: type | tuple[type, ...],
           default: Any = ...) -> Any:
    """``record[key]`` (``key`` dotted for nested objects), checked for its type."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is not ...:
                return default
            raise GQAFileError(f"{path}: question {qid!r}: missing key {key!r}")
        value = value[part]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        names = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise GQAFileError(f"{path}: question {qid!r}: {key!r} should be {names}, got "
                           f"{value!r:.60}")
    return value


def read_balanced_questions(path: str | Path) -> dict[str, GQAQuestion]:
    """``{questionId: GQAQuestion}`` from an official ``*_balanced_questions.json``."""
    path = Path(path)
    out: dict[str, GQAQuestion] = {}
    for qid, q in _object(path, _load(path), "question").items():
        if not isinstance(q, dict):
            raise GQAFileError(f"{path}: question {qid!r}: expected an object, got "
                               f"{type(q).__name__}")
        entailed = _field(path, qid, q, "entailed", list, [])
        if not all(isinstance(e, str) for e in entailed):
            raise GQAFileError(f"{path}: question {qid!r}: 'entailed' should list question ids "
                               f"(strings), got {entailed!r:.60}")
        out[qid] = GQAQuestion(
            answer=_field(path, qid, q, "answer", str),
            structural=_field(path, qid, q, "types.structural", str),
            semantic=_field(path, qid, q, "types.semantic", str),
            detailed=_field(path, qid, q, "types.detailed", str, ""),
            entailed=tuple(entailed),
            global_group=_field(path, qid, q, "groups.global", (str, type(None)), None),
            balanced=_field(path, qid, q, "isBalanced", bool, True),
        )
    return out


def read_choices(path: str | Path) -> dict[str, GQAChoices]:
    """``{questionId: GQAChoices}`` from an official ``*_choices.json``."""
    path = Path(path)
    out: dict[str, GQAChoices] = {}
    for qid, c in _object(path, _load(path), '{"valid": [...], "plausible": [...]}').items():
        lists = {}
        for key in ("valid", "plausible"):
            values = _field(path, qid, c, key, list)
            if not all(isinstance(v, str) for v in values):
                raise GQAFileError(f"{path}: question {qid!r}: {key!r} should list answers "
                                   f"(strings)")
            lists[key] = frozenset(values)
        out[qid] = GQAChoices(**lists)
    return out


@dataclass(frozen=True)
class GQAEvalFiles:
    """One split's official files: the questions, and the choices when present."""

    split: str
    questions_path: Path
    questions: dict[str, GQAQuestion]
    choices_path: Path  # where the choices are looked for
    choices: dict[str, GQAChoices] | None


_CACHE: dict[tuple, GQAEvalFiles] = {}  # read once per process, not once per epoch


def load_gqa_eval_files(root: str | Path, split: str) -> GQAEvalFiles | None:
    """The official files of ``split`` under ``root``, or None when its balanced question file is
    not there (or the split has none). Raises :class:`GQAFileError` for malformed files."""
    rel_q, rel_c = questions_file(split), choices_file(split)
    if rel_q is None or rel_c is None:
        return None
    q_path, c_path = Path(root) / rel_q, Path(root) / rel_c
    if not q_path.is_file():
        return None
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else (str(p),)
                for p in (q_path, c_path))
    if key not in _CACHE:
        _CACHE.clear()
        choices = read_choices(c_path) if c_path.is_file() else None
        _CACHE[key] = GQAEvalFiles(split, q_path, read_balanced_questions(q_path), c_path, choices)
    return _CACHE[key]


def gqa_eval_problems(root: str | Path, split: str, json_path: str | Path) -> list[str]:
    """Problems with ``split``'s official files, checked before anything runs: malformed files,
    a question set that differs from the LXMERT split JSON ``json_path`` (the official metrics
    score the questions of the balanced file), balanced questions without choices. No files: no
    problem. (Answers that differ are no problem: the official metrics use the file's, and
    ``metric_notes`` counts them.)"""
    try:
        files = load_gqa_eval_files(root, split)
    except GQAFileError as e:
        return [str(e)]
    if files is None:
        return []
    problems: list[str] = []
    try:
        records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return problems  # the split JSON's own check reports it
    if not isinstance(records, list):
        return problems
    ids = {str(r.get("question_id")) for r in records if isinstance(r, dict)}
    missing = [q for q in ids if q not in files.questions]
    extra = [q for q in files.questions if q not in ids]
    if missing or extra:
        example = f"e.g. {missing[0]!r} only in {json_path}" if missing else \
            f"e.g. {extra[0]!r} only in the balanced file"
        problems.append(f"{files.questions_path}: holds {len(files.questions)} questions, "
                        f"{json_path} {len(ids)}; {len(missing)} of the split's are not in it and "
                        f"{len(extra)} of its are not in the split ({example}); the official "
                        f"metrics need the balanced file the split was made from")
    if files.choices is not None:
        no_choice = [q for q, d in files.questions.items() if d.balanced and q not in files.choices]
        if no_choice:
            problems.append(f"{files.choices_path}: {len(no_choice)} balanced questions of "
                            f"{files.questions_path.name} have no entry (e.g. {no_choice[0]!r})")
    return problems
