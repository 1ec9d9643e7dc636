"""Collect run directories into one long DataFrame (and ``results.jsonl``): the report's only input.

The harness hands over one :class:`ReportEntry` per fine-tuning run a report needs (variant x task x
seed) and a :class:`ReportSpec`; everything here reads files only (docs/internals.md), so a report
can be made from any later shell. Machine-readable rows come first; tables and plots are rendered
from them.

Speed matters on a big sweep (thousands of result files on a network filesystem): each file is read
with one ``open``/``read`` and ``json.loads``, rows are plain tuples, and the frame is built once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lxmert_bench.config import TASKS
from lxmert_bench.io import read_jsonl, write_jsonl
from lxmert_bench.report.paper import PAPER_TABLES
from lxmert_bench.store import DONE, FAILED, STATES, RunDir

MAIN_METRIC = "accuracy"  # the paper's Tables 3-5 column for all three tasks

# one row per (run, metric); non-done runs get one row with metric None, value NaN
COLUMNS = (
    "kind", "variant", "seed", "task", "metric", "value", "state", "stage", "pretrain_stage",
    "run_dir", "scores_file", "best_epoch", "device", "num_gpus", "gpu_hours", "precision",
    "total_s", "data_fingerprint", "code_version", "lxmert_bench_version", "torch_version",
    "python_version", "finished_at", "error",
)
CURVE_COLUMNS = ("variant", "seed", "kind", "task", "stage", "step", "epoch", "series", "value")


@dataclass(frozen=True)
class ReportEntry:
    """One fine-tuning run a report needs: ``variant`` on ``task`` with ``seed``.

    ``finetune_stage`` / ``pretrain_stage`` are stage ids ('finetune/<hash>'); ``state`` is the
    harness's view (one of ``store.STATES``) or None to read it from disk;
    ``run_dir`` defaults to ``<workdir>/runs/<finetune_stage>``.
    """

    variant: str
    seed: int
    task: str
    finetune_stage: str
    pretrain_stage: str | None = None
    state: str | None = None
    run_dir: Path | None = None
    bert_stage: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"ReportEntry {self.variant!r} seed {self.seed}: task {self.task!r}; "
                             f"expected one of {list(TASKS)}")
        if self.state is not None and self.state not in STATES:
            raise ValueError(f"ReportEntry {self.variant!r} {self.task} seed {self.seed}: state "
                             f"{self.state!r}; expected one of {list(STATES)} or None")

    def path(self, workdir: str | os.PathLike) -> Path:
        return Path(self.run_dir) if self.run_dir is not None else stage_path(workdir, self.finetune_stage)


@dataclass
class ReportSpec:
    """What one report shows: rows (variants, in order), columns (tasks) and the paper table beside."""

    name: str
    title: str
    variants: list[str]
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    reference: str | None = None  # 'table3' | 'table4' | 'table5' | None
    reference_variant: str | None = None  # the row others are tested against
    profile: str = "default"
    notes: dict[str, Any] = field(default_factory=dict)  # profile, spec path, seeds, --set
    # A spec with axes (spec.py): axis label -> its values as shown, and each variant (a cell) ->
    # (its declared variant or None, {axis label: value}); the report has a table per axis.
    axes: dict[str, list[str]] = field(default_factory=dict)
    cells: dict[str, tuple[str | None, dict[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"ReportSpec {self.name!r}"
        if not self.name:
            raise ValueError("ReportSpec: 'name' must not be empty")
        if not self.variants:
            raise ValueError(f"{where}: 'variants' must name at least one variant")
        dup = sorted({v for v in self.variants if list(self.variants).count(v) > 1})
        if dup:
            raise ValueError(f"{where}: 'variants' repeats {dup}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"{where}: 'tasks' {list(self.tasks)}; expected a non-empty subset of "
                             f"{list(TASKS)}")
        if self.reference is not None and self.reference not in PAPER_TABLES:
            raise ValueError(f"{where}: 'reference' {self.reference!r}; expected one of "
                             f"{sorted(PAPER_TABLES)} or None")
        if self.reference_variant is not None and self.reference_variant not in self.variants:
            raise ValueError(f"{where}: 'reference_variant' {self.reference_variant!r} is not one of "
                             f"the variants {list(self.variants)}")


def stage_path(workdir: str | os.PathLike, stage_id: str) -> Path:
    return Path(workdir) / "runs" / stage_id


def read_json_file(path: str | os.PathLike) -> Any | None:
    """Parsed JSON of ``path``; None when it does not exist; a ValueError naming file and line if bad."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = f"{e.lineno}:{e.colno}: " if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}:{pos}invalid JSON ({e}); expected a result/config object "
                         "(docs/internals.md)") from None


def _error_message(run_dir: str) -> str | None:
    path = os.path.join(run_dir, "error.json")
    try:
        err = read_json_file(path)
    except ValueError:
        return f"unreadable {path}"
    if not isinstance(err, dict):
        return None
    text = str(err.get("error") or err.get("type") or "").strip()
    first = text.splitlines()[0] if text else ""
    kind = err.get("type")
    msg = f"{kind}: {first}" if kind and first and not first.startswith(str(kind)) else first
    return msg[:200] or None


def _code_text(result: dict[str, Any]) -> Any:
    """The declared code version with the exact code it ran (git commit, sources hash)."""
    version, code = result.get("code_version"), result.get("code")
    if not isinstance(code, dict):
        return version
    exact = []
    if code.get("git_commit"):
        exact.append(f"git {str(code['git_commit'])[:10]}" + ("+dirty" if code.get("git_dirty")
                                                               else ""))
    if code.get("source_hash"):
        exact.append(f"sources {code['source_hash']}")
    return f"{version} ({', '.join(exact)})" if exact else version


def _result_rows(result: Any, path: str, kind: str, variant: str, seed: int | None, task: str,
                 stage: str, pretrain_stage: str | None, run_dir: str) -> list[tuple]:
    """Rows of one finished run; a ValueError naming the file and key when the schema is broken."""
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object (result.json schema in docs/internals.md), "
                         f"got {type(result).__name__}")
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"{path}: key 'metrics' must be a non-empty object of numbers "
                         f"(docs/internals.md), got {metrics!r:.80}")
    if kind == "finetune":
        if "task" in result and result["task"] != task:
            raise ValueError(f"{path}: key 'task' is {result['task']!r} but the report entry "
                             f"({variant!r}, seed {seed}) expects {task!r}")
        if "seed" in result and result["seed"] != seed:
            raise ValueError(f"{path}: key 'seed' is {result['seed']!r} but the report entry "
                             f"({variant!r}, {task}) expects {seed!r}")
    else:
        seed = result.get("seed", seed)
    versions = result.get("versions") or {}
    timings = result.get("timings") or {}
    scores = (result.get("predictions") or {}).get("scores")
    common = (
        DONE, stage, pretrain_stage, run_dir,
        os.path.join(run_dir, scores) if scores else None,
        result.get("best_epoch"), result.get("device"), result.get("num_gpus"),
        result.get("gpu_hours"), result.get("precision"), timings.get("total_s"),
        result.get("data_fingerprint"), _code_text(result),
        versions.get("lxmert_bench"), versions.get("torch"), versions.get("python"),
        result.get("finished_at"), None,
    )
    if kind == "pretrain":  # its diagnostics sit beside the losses (train/pretrain.py)
        metrics = {**metrics, "matched_accuracy": result.get("matched_accuracy"),
                   **(result.get("image_reading") or {})}
    rows = []
    for metric, value in metrics.items():
        if value is None:
            continue  # a metric the run could not compute (e.g. GQA binary without the types)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: key 'metrics.{metric}' must be a number, got {value!r:.80}")
        rows.append((kind, variant, seed, task, metric, float(value), *common))
    return rows


def _open_row(kind: str, variant: str, seed: int | None, task: str, state: str, stage: str,
                 pretrain_stage: str | None, run_dir: str, error: str | None) -> tuple:
    rest = (None,) * (len(COLUMNS) - 11)
    return (kind, variant, seed, task, None, math.nan, state, stage, pretrain_stage, run_dir,
            *rest, error)


def _run_rows(kind: str, variant: str, seed: int | None, task: str, stage: str,
              pretrain_stage: str | None, run_dir: str, state: str | None) -> list[tuple]:
    path = os.path.join(run_dir, "result.json")
    try:
        result = read_json_file(path)
        if result is not None:  # result.json exists iff the run is done, whatever a scheduler says
            return _result_rows(result, path, kind, variant, seed, task, stage, pretrain_stage,
                                run_dir)
    except ValueError as e:  # a torn or foreign result.json: a failed cell, named, not a crash
        return [_open_row(kind, variant, seed, task, FAILED, stage, pretrain_stage, run_dir,
                             str(e)[:300])]
    if state is None:
        state = RunDir.at(run_dir).disk_state()
    if state == DONE:  # said to be done, yet no result.json: never show it as a number
        state, error = FAILED, f"{path}: not found, though the run was said to be done"
    else:
        error = _error_message(run_dir) if state == FAILED else None
    return [_open_row(kind, variant, seed, task, state, stage, pretrain_stage, run_dir, error)]


def collect(entries: Sequence[ReportEntry], workdir: str | os.PathLike,
            results_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per (run, metric) for every entry's fine-tuning run, plus one per (variant,
    pretraining stage, loss) with ``kind == 'pretrain'`` and ``task == 'pretrain'`` (and likewise
    ``kind == 'bert'`` for a text-only BERT stage).

    Runs that are not done keep one row with ``metric`` None and their ``state`` (``store.STATES``;
    failed, with the reason, when said to be done without a result.json), so no cell is ever
    silently dropped. When ``results_path`` is given the rows are also written there as JSON lines,
    atomically.
    """
    rows: list[tuple] = []
    upstream: dict[tuple[str, str, str], None] = {}  # (kind, variant, stage)
    for e in entries:
        run_dir = str(e.path(workdir))
        rows += _run_rows("finetune", e.variant, e.seed, e.task, e.finetune_stage,
                          e.pretrain_stage, run_dir, e.state)
        if e.pretrain_stage:
            upstream[("pretrain", e.variant, e.pretrain_stage)] = None
        if e.bert_stage:
            upstream[("bert", e.variant, e.bert_stage)] = None
    # an upstream stage is read once however many variants/seeds/tasks share it
    cache: dict[str, list[tuple]] = {}
    for kind, variant, stage in upstream:
        if stage not in cache:
            cache[stage] = _run_rows(kind, "", None, kind, stage,
                                     stage if kind == "pretrain" else None,
                                     str(stage_path(workdir, stage)), None)
        rows += [(r[0], variant, *r[2:]) for r in cache[stage]]
    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")
    if results_path is not None:
        write_results_jsonl(frame, results_path)
    return frame


def write_results_jsonl(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """``frame`` as JSON lines (one object per row; NaN as null), written atomically."""
    # pandas turns NaN into null and numpy scalars into numbers; jsonlines writes the lines
    records = json.loads(frame.to_json(orient="records", force_ascii=False)) if len(frame) else []
    write_jsonl(path, records)


def read_results_jsonl(path: str | os.PathLike) -> pd.DataFrame:
    """The frame written by :func:`write_results_jsonl` (for re-rendering without the run dirs)."""
    frame = pd.DataFrame.from_records(read_jsonl(path, torn_last_ok=False))
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------------
# training curves (log.jsonl)
# ------------------------------------------------------------------------------------------------
def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one ``log.jsonl``. A torn last line (a run killed mid-write) is skipped;
    a bad line anywhere else is an error naming the file and line."""
    return read_jsonl(path, hint="; expected one object per line (docs/internals.md)")


def _curve_rows(records: Iterable[dict[str, Any]], head: tuple) -> list[tuple]:
    rows = []
    for rec in records:
        step, epoch = rec.get("step"), rec.get("epoch")
        if isinstance(rec.get("metrics"), dict) and "split" in rec:  # an evaluation
            for name, value in rec["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append((*head, step, epoch, f"{rec['split']}/{name}", float(value)))
            continue
        loss = rec.get("loss")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            rows.append((*head, step, epoch, "loss", float(loss)))
        for name, value in (rec.get("losses") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((*head, step, epoch, f"loss/{name}", float(value)))
    return rows


def read_curves(entries: Sequence[ReportEntry], workdir: str | os.PathLike) -> pd.DataFrame:
    """Training curves in long form (columns ``CURVE_COLUMNS``): ``series`` is 'loss',
    'loss/<task>' (pretraining losses) or '<split>/<metric>' (evaluations); ``kind`` is 'pretrain'
    (one copy per variant using the stage) or 'finetune'."""
    rows: list[tuple] = []
    seen_pretrain: dict[tuple[str, str], None] = {}
    for e in entries:
        head = (e.variant, e.seed, "finetune", e.task, e.finetune_stage)
        rows += _curve_rows(read_log(e.path(workdir) / "log.jsonl"), head)
        if e.pretrain_stage:
            seen_pretrain[(e.variant, e.pretrain_stage)] = None
    logs: dict[str, list[dict[str, Any]]] = {}
    for variant, stage in seen_pretrain:
        if stage not in logs:
            logs[stage] = read_log(stage_path(workdir, stage) / "log.jsonl")
        rows += _curve_rows(logs[stage], (variant, None, "pretrain", "pretrain", stage))
    frame = pd.DataFrame.from_records(rows, columns=list(CURVE_COLUMNS))
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------------
# run configs (for the provenance block: model preset, switches where paper and code differ)
# ------------------------------------------------------------------------------------------------
def read_configs(entries: Sequence[ReportEntry], workdir: str | os.PathLike
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant: ``{'finetune/<task>': config, 'pretrain': config}`` from the first run of each
    that has a ``config.json`` (a pending run may not have one yet)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in entries:
        mine = out.setdefault(e.variant, {})
        key = f"finetune/{e.task}"
        if key not in mine:
            cfg = read_json_file(e.path(workdir) / "config.json")
            if cfg is not None:
                mine[key] = _check_config(cfg, e.path(workdir) / "config.json")
        if e.pretrain_stage and "pretrain" not in mine:
            path = stage_path(workdir, e.pretrain_stage) / "config.json"
            cfg = read_json_file(path)
            if cfg is not None:
                mine["pretrain"] = _check_config(cfg, path)
    return out


def _check_config(cfg: Any, path: Path) -> dict[str, Any]:
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"{path}: expected a RunConfig object with a 'kind' key (config.json)")
    return cfg
