"""Task metrics as the official evaluators compute them, and the official submission formats.

* VQA: answer normalisation and leave-one-out accuracy of ``vqaEval.py`` (GT-Vision-Lab/VQA,
  current master: punctuation list with ``{ } - !``, both sides processed unless all ten humans
  agree, ASCII-only digits as its Python 2 regexes; per-type accuracies from the per-question
  mean; the superseded 2016 rule as ``rule="2016"``); and the soft-score accuracy of the official
  LXMERT local evaluator.
* GQA: exact-match top-1 accuracy (the official LXMERT local evaluator); binary / open by the
  question's structural type (official ``eval.py``) when known, else approximated by the answer;
  with the official balanced question (and choices) files, the challenge evaluator's metrics
  (:func:`gqa_official_metrics`: consistency, validity, plausibility, distribution, per type).
* NLVR2: accuracy and consistency as ``lil-lab/nlvr nlvr2/eval/metrics.py``.
* Pretraining diagnostics: the names of the image-reading losses (``IMAGE_READING``), which the
  pretraining stage logs and the report plots, and of all its diagnostics
  (``PRETRAIN_DIAGNOSTICS``, with the matching accuracy), which the report tabulates.

A prediction set that misses questions is refused (ValueError), as the official evaluators do.

Per-example functions return scores in [0, 1]; aggregate metrics are percentages (0-100), the unit
of ``result.json``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lxmert_bench.io import atomic_write_text

# Does the language side read the image? The validation masked-LM loss of the matched pairs with
# their own image and with another (train/pretrain.py ``image_reading``): equal while the masked
# words are guessed from the text alone, apart once the model grounds them in the objects.
IMAGE_READING = ("mlm_own_image", "mlm_other_image")
# A pretraining stage's diagnostics, kept in result.json beside its losses (``matched_accuracy``,
# ``image_reading``) and tabulated apart from them: the image-sentence matching accuracy (%) on
# the validation split and the image-reading losses.
PRETRAIN_DIAGNOSTICS = ("matched_accuracy", *IMAGE_READING)


# ---------------------------------------------------------------------------------------------
# VQA answer normalisation (vqaEval.py)

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # sic: the official table maps this one the wrong way round; kept for identical scores
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
# re.ASCII: under Python 2 (the official code) these patterns' \d is [0-9] only
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)", re.ASCII)
# The official pattern "(?!<=\d)(\.)(?!\d)" means a lookbehind but is a lookahead for "<=digit",
# which never matches at a ".": so any period not followed by a digit goes ("5." -> "5").
_PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
# The official call passes re.UNICODE (= 32) positionally as sub's ``count``: at most 32 periods.
_PERIOD_MAX = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval ``processPunctuation``: a mark touching a space (or any text with a digit,digit
    comma) is deleted, otherwise replaced by a space; periods not before a digit are deleted."""
    out = text
    drop_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        # the official test looks at the input text, not at the partly cleaned one
        if drop_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def process_digit_article(text: str) -> str:
    """vqaEval ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    restore apostrophes of contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _trim(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """An answer as ``vqaEval.py`` cleans it before comparing (both steps)."""
    return process_digit_article(process_punctuation(_trim(text)))


# ---------------------------------------------------------------------------------------------
# VQA accuracy


VQA_RULES = ("master", "2016")


def vqa_accuracy(prediction: str, human_answers: Sequence[str], rule: str = "master") -> float:
    """Official VQA accuracy of one answer in [0, 1]: the mean over the leave-one-out subsets of
    the human answers of ``min(#matches / 3, 1)``. 1/2/3/4+ matching humans (of 10) give
    0.3/0.6/0.9/1.0.

    ``rule="master"`` (the current official ``vqaEval.py``): when the human answers differ, they
    and the prediction are fully normalised; when all agree, neither is (exact match).
    ``rule="2016"`` (superseded): the prediction always normalised, the humans given only the
    punctuation step and only when they differ."""
    if rule not in VQA_RULES:
        raise ValueError(f"VQA accuracy rule {rule!r}: expected one of {list(VQA_RULES)}")
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    gts = [_trim(g) for g in human_answers]
    differ = len(set(gts)) > 1
    if rule == "master":
        pred = normalize_vqa_answer(prediction) if differ else _trim(prediction)
        if differ:
            gts = [normalize_vqa_answer(g) for g in gts]
    else:
        pred = normalize_vqa_answer(prediction)
        gts = [process_punctuation(g) for g in human_answers] if len(set(human_answers)) > 1 \
            else list(human_answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # leaving out answer i removes its own match from the count
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def _check_keys(predictions: Mapping, labels: Mapping, what: str, unit: str = "questions") -> None:
    """Every prediction has a label, and every labelled question a prediction (the official
    evaluators refuse an incomplete set rather than score the questions present)."""
    extra = [k for k in predictions if k not in labels]
    if extra:
        raise KeyError(f"{len(extra)} {what} prediction(s) have no label, e.g. id {extra[0]!r}")
    _check_complete(predictions, labels, what, unit)


def _check_complete(predictions: Mapping, labels: Mapping, what: str, unit: str) -> None:
    missing = [k for k in labels if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(labels)} {what} {unit} have no prediction "
                         f"(e.g. id {missing[0]!r}); the official evaluator scores complete sets only")


def vqa_example_scores(
    predictions: Mapping[Hashable, str],
    labels: Mapping[Hashable, Mapping[str, float]] | None = None,
    human_answers: Mapping[Hashable, Sequence[str]] | None = None,
    rule: str = "master",
) -> dict[Hashable, float]:
    """Per-question VQA score in [0, 1]: with ``human_answers`` the official leave-one-out
    accuracy (``rule``: see :func:`vqa_accuracy`), otherwise the soft score
    ``labels[qid].get(answer, 0)`` (official local)."""
    if (labels is None) == (human_answers is None):
        raise ValueError("give exactly one of labels (soft scores) or human_answers")
    if human_answers is not None:
        _check_keys(predictions, human_answers, "VQA")
        return {q: vqa_accuracy(a, human_answers[q], rule) for q, a in predictions.items()}
    _check_keys(predictions, labels, "VQA")
    return {q: float(labels[q].get(a, 0.0)) for q, a in predictions.items()}


def vqa_soft_accuracy(predictions: Mapping[Hashable, str],
                      labels: Mapping[Hashable, Mapping[str, float]]) -> float:
    """Official LXMERT ``VQAEvaluator.evaluate``: mean soft score of the predicted answers, in
    percent. Every labelled question needs a prediction (that evaluator would average over the
    questions present; the official VQA evaluator refuses such a set, and so do we)."""
    scores = vqa_example_scores(predictions, labels=labels)
    return 100.0 * sum(scores.values()) / len(scores) if scores else 0.0


def vqa_scores(
    predictions: Mapping[Hashable, str],
    labels: Mapping[Hashable, Mapping[str, float]] | None = None,
    answer_types: Mapping[Hashable, str] | None = None,
    human_answers: Mapping[Hashable, Sequence[str]] | None = None,
    rule: str = "master",
) -> dict[str, float]:
    """``{"accuracy": …, "yes/no": …, "number": …, "other": …}`` in percent.

    Soft-score accuracy from ``labels``, or official accuracy from ``human_answers``. Per-type keys
    appear for the types in ``answer_types`` (``{qid: "yes/no" | "number" | "other"}``).
    """
    scores = vqa_example_scores(predictions, labels, human_answers, rule)
    out = {"accuracy": 100.0 * sum(scores.values()) / len(scores) if scores else 0.0}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for q, s in scores.items():
            if q not in answer_types:
                raise KeyError(f"VQA question {q!r} has no answer type")
            by_type.setdefault(answer_types[q], []).append(s)
        for t in sorted(by_type):
            out[t] = 100.0 * sum(by_type[t]) / len(by_type[t])
    return out


# ---------------------------------------------------------------------------------------------
# GQA and NLVR2


def gqa_example_scores(predictions: Mapping[Hashable, str],
                       answers: Mapping[Hashable, str | Mapping[str, float]]) -> dict[Hashable, float]:
    """1.0 when the prediction is the gold answer (a string, or an ``{answer: score}`` label as in
    the official GQA JSONs, scored as ``label.get(prediction, 0)``), else 0.0."""
    _check_keys(predictions, answers, "GQA")
    out = {}
    for q, a in predictions.items():
        gold = answers[q]
        out[q] = float(gold.get(a, 0.0)) if isinstance(gold, Mapping) else float(a == gold)
    return out


def gqa_accuracy(predictions: Mapping[Hashable, str],
                 answers: Mapping[Hashable, str | Mapping[str, float]]) -> float:
    """Official LXMERT local GQA evaluator: top-1 exact-match accuracy in percent."""
    scores = gqa_example_scores(predictions, answers)
    return 100.0 * sum(scores.values()) / len(scores) if scores else 0.0


def gqa_scores(predictions: Mapping[Hashable, str],
               answers: Mapping[Hashable, str | Mapping[str, float]],
               structural_types: Mapping[Hashable, str] | None = None) -> dict[str, float]:
    """``accuracy`` plus ``binary`` / ``open`` in percent.

    With ``structural_types`` (``{qid: "query" | "verify" | "logical" | "choose" | "compare"}``,
    the balanced question files' ``types.structural``) a question is open iff its type is
    ``query``, as the official ``eval.py``. Without them (the LXMERT JSONs do not carry them) the
    split is approximated: binary iff the gold answer is yes/no (see :func:`gqa_binary_rule`)."""
    scores = gqa_example_scores(predictions, answers)
    out = {"accuracy": 100.0 * sum(scores.values()) / len(scores) if scores else 0.0}
    if structural_types is not None:
        unknown = [q for q in scores if q not in structural_types]
        if unknown:
            raise ValueError(f"{len(unknown)} GQA question(s) have no structural type, e.g. "
                             f"{unknown[0]!r}")
    groups: dict[str, list[float]] = {"binary": [], "open": []}
    for q, s in scores.items():
        if structural_types is not None:
            groups["open" if structural_types[q] == "query" else "binary"].append(s)
            continue
        gold = answers[q]
        gold_answers = set(gold) if isinstance(gold, Mapping) else {gold}
        groups["binary" if gold_answers <= {"yes", "no"} else "open"].append(s)
    for name, values in groups.items():
        if values:
            out[name] = 100.0 * sum(values) / len(values)
    return out


def gqa_binary_rule(structural_types: Mapping[Hashable, str] | None) -> str:
    """How :func:`gqa_scores` split binary / open, in words for result.json and reports."""
    if structural_types is not None:
        return "by structural type (official eval.py)"
    return ("approximated by the gold answer (yes/no): the question files carry no structural "
            "types")


# ---------------------------------------------------------------------------------------------
# GQA: the official challenge evaluator (eval.py, distributed by the GQA authors) over the
# balanced question files. Its rules, re-implemented here:
# - only questions with ``isBalanced`` are scored; a question is right iff the prediction equals
#   its ``answer`` string exactly (no normalisation);
# - open iff ``types.structural == "query"``, else binary (verify, logical, choose, compare);
# - consistency: for each correctly answered question with entailed questions (``entailed``
#   without itself), the accuracy over those; averaged over such questions;
# - validity / plausibility: the prediction is in the choices file's ``valid`` / ``plausible``
#   list, except that a question whose ``types.detailed`` contains "Common" ("what do they have in
#   common?") checks against color / material / shape instead;
# - distribution: per ``groups.global`` (None: left out) the chi-square sum over the gold answers
#   a of (predicted count of a - gold count of a)^2 / gold count of a, averaged over the groups
#   weighted by their question counts, divided by 100 (lower is better; not a percentage);
# - accuracy per structural and per semantic type; grounding needs attention maps (not here).


@dataclass(frozen=True)
class GQAQuestion:
    """The fields of one balanced-file question that the official evaluator reads."""

    answer: str
    structural: str  # types.structural: query | verify | logical | choose | compare
    semantic: str  # types.semantic: attr | cat | global | obj | rel
    detailed: str = ""  # types.detailed, e.g. "twoCommon"
    entailed: tuple[str, ...] = ()
    global_group: str | None = None  # groups.global
    balanced: bool = True  # isBalanced


@dataclass(frozen=True)
class GQAChoices:
    """One question's entry of the official ``*_choices.json``."""

    valid: frozenset[str]
    plausible: frozenset[str]


GQA_OPEN_TYPE = "query"
_GQA_COMMON_ANSWERS = frozenset({"color", "material", "shape"})


def _gqa_belongs(answer: str, group: frozenset[str], question: GQAQuestion) -> bool:
    # the official evaluator's special case for "what do both have in common?" questions
    if "Common" in question.detailed:
        group = _GQA_COMMON_ANSWERS
    return answer in group


def gqa_distribution(gold: Mapping[str, Mapping[str, int]],
                     predicted: Mapping[str, Mapping[str, int]]) -> float | None:
    """The official distribution score from per-group answer counts ``{group: {answer: n}}``
    (None without any group). Predicted answers that are no gold answer of the group do not
    count, as in the official chi-square."""
    weighted, total = 0.0, 0
    for group, counts in gold.items():
        pred = predicted.get(group, {})
        chi = sum((pred.get(a, 0) - e) ** 2 / e for a, e in counts.items())
        n = sum(counts.values())
        weighted += chi * n
        total += n
    return weighted / total / 100 if total else None


def _percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def gqa_official_metrics(predictions: Mapping[str, str], questions: Mapping[str, GQAQuestion],
                         choices: Mapping[str, GQAChoices] | None = None) -> dict[str, float]:
    """The official GQA metrics, percentages except ``distribution``:

    ``accuracy``, ``binary``, ``open``, ``consistency``, ``validity`` and ``plausibility`` (with
    ``choices``), ``distribution``, and ``structural/<type>``, ``semantic/<type>`` accuracies.

    Every question needs a prediction (entailed ones too, as with the official
    ``--consistency``). A metric with nothing to average is left out rather than reported as the
    official script's 0: binary/open without such questions, consistency when no question has an
    entailed question in ``questions``, distribution without global groups. Entailed ids outside
    ``questions`` are skipped (the official script reads them from ``*_all_questions.json``)."""
    _check_complete(predictions, questions, "GQA", "questions")
    scored = {q: d for q, d in questions.items() if d.balanced}
    if choices is not None:
        missing = [q for q in scored if q not in choices]
        if missing:
            raise ValueError(f"{len(missing)} of {len(scored)} GQA questions have no entry in the "
                             f"choices (e.g. id {missing[0]!r})")
    right = {q: float(predictions[q] == d.answer) for q, d in questions.items()}
    by: dict[str, list[float]] = {}
    validity: list[float] = []
    plausibility: list[float] = []
    consistency: list[float] = []
    any_entailed = False
    gold_dist: dict[str, Counter] = {}
    pred_dist: dict[str, Counter] = {}
    for q, d in scored.items():
        s = right[q]
        for key in ("accuracy", "open" if d.structural == GQA_OPEN_TYPE else "binary",
                    f"structural/{d.structural}", f"semantic/{d.semantic}"):
            by.setdefault(key, []).append(s)
        if choices is not None:
            validity.append(float(_gqa_belongs(predictions[q], choices[q].valid, d)))
            plausibility.append(float(_gqa_belongs(predictions[q], choices[q].plausible, d)))
        entailed = [e for e in d.entailed if e != q and e in questions]
        any_entailed = any_entailed or bool(entailed)
        if s and entailed:
            consistency.append(sum(right[e] for e in entailed) / len(entailed))
        if d.global_group is not None:
            gold_dist.setdefault(d.global_group, Counter())[d.answer] += 1
            pred_dist.setdefault(d.global_group, Counter())[predictions[q]] += 1
    out = {k: _percent(v) for k, v in by.items() if k in ("accuracy", "binary", "open")}
    if not scored:
        out["accuracy"] = 0.0
    if any_entailed:  # the official average of an empty list is 0: no question right
        out["consistency"] = _percent(consistency) if consistency else 0.0
    if choices is not None and scored:
        out["validity"] = _percent(validity)
        out["plausibility"] = _percent(plausibility)
    distribution = gqa_distribution(gold_dist, pred_dist)
    if distribution is not None:
        out["distribution"] = distribution
    for prefix in ("structural/", "semantic/"):
        out.update({k: _percent(by[k]) for k in sorted(by) if k.startswith(prefix)})
    return out


def _as_bool(value: Any, what: str) -> bool:
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # numpy / torch scalars from an argmax
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{what}: expected a boolean (True/False, 1/0, 'True'/'False'), got {value!r}")


def nlvr2_group(identifier: str) -> str:
    """The sentence an NLVR2 example belongs to: its identifier without the 3rd dash field (the
    image-pair id), ``dev-850-0-1`` -> ``dev-850-1``."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} should look like split-set-pair-sentence")
    return "-".join(parts[:2] + parts[3:])


def nlvr2_example_scores(predictions: Mapping[str, bool | int],
                         labels: Mapping[str, bool | int]) -> dict[str, float]:
    _check_complete(predictions, labels, "NLVR2", "examples")
    return {k: float(_as_bool(predictions[k], f"prediction for {k}") == _as_bool(v, f"label of {k}"))
            for k, v in labels.items()}


def nlvr2_metrics(predictions: Mapping[str, bool | int],
                  labels: Mapping[str, bool | int]) -> dict[str, float]:
    """Official NLVR2 ``accuracy`` (their "precision") and ``consistency`` in percent, over the
    labelled examples (each needs a prediction). A sentence is consistent when all of its image
    pairs are right; consistency is the share of consistent sentences."""
    scores = nlvr2_example_scores(predictions, labels)
    if not scores:
        return {"accuracy": 0.0, "consistency": 0.0}
    consistent: dict[str, bool] = {}
    for k, s in scores.items():
        group = nlvr2_group(k)
        consistent[group] = consistent.get(group, True) and s == 1.0
    return {"accuracy": 100.0 * sum(scores.values()) / len(scores),
            "consistency": 100.0 * sum(consistent.values()) / len(consistent)}


# ---------------------------------------------------------------------------------------------
# Submission files


def write_vqa_predictions(path: str | os.PathLike, predictions: Mapping[Any, str]) -> None:
    """VQA server format: ``[{"question_id": int, "answer": str}, ...]``."""
    rows = []
    for qid, answer in predictions.items():
        try:
            qid_int = int(qid)
        except (TypeError, ValueError):
            raise ValueError(f"VQA question_id must be an integer, got {qid!r}") from None
        rows.append({"question_id": qid_int, "answer": str(answer)})
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def write_gqa_predictions(path: str | os.PathLike, predictions: Mapping[Any, str]) -> None:
    """GQA server format: ``[{"questionId": str, "prediction": str}, ...]``."""
    rows = [{"questionId": str(qid), "prediction": str(answer)} for qid, answer in predictions.items()]
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def write_nlvr2_predictions(path: str | os.PathLike, predictions: Mapping[str, bool | int]) -> None:
    """NLVR2 format read by the official ``metrics.py``: CSV lines ``identifier,True|False``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for identifier, value in predictions.items():
        if "," in identifier:
            raise ValueError(f"NLVR2 identifier {identifier!r} contains a comma")
        writer.writerow([identifier, str(_as_bool(value, f"prediction for {identifier}"))])
    atomic_write_text(path, buf.getvalue())
