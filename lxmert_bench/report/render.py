"""``write_report``: run directories -> ``report.md`` + ``results.jsonl`` + PNG plots.

Everything is written into a temporary directory next to the report first and then moved into
place file by file (``report.md`` last), so a reader never sees a half-written report.
The provenance block says where every number came from, and says loudly when they come from a
small profile or the synthetic benchmark: those are never the paper's numbers.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from lxmert_bench import __version__
from lxmert_bench.config import FIXED_DIFFERENCES, switches
from lxmert_bench.io import atomic_write_text
from lxmert_bench.model.config import PRESETS
from lxmert_bench.owner import owned_temp_dir
from lxmert_bench.report.collect import (
    ReportEntry,
    ReportSpec,
    collect,
    read_configs,
    read_curves,
    read_json_file,
)
from lxmert_bench.report.plots import (
    plot_note,
    plot_stage_curves,
    plot_task_bars,
    plot_training_curves,
)
from lxmert_bench.report.significance import N_RESAMPLES, Comparison, compare_to_reference
from lxmert_bench.report.submissions import submissions_section
from lxmert_bench.report.tables import (
    PRETRAINING_DIAGNOSTICS,
    PRETRAINING_LOSSES,
    TASK_LABELS,
    Summary,
    axis_tables,
    detail_tables,
    main_table,
    main_table_legend,
    markdown_table,
    md_code,
    md_text,
    significance_table,
)
from lxmert_bench.store import DONE

# Where the paper and the official code differ (LXMERT_FACTS.md §9): (config key, what, paper,
# code), derived from the switches declared on the config fields (config.Switch), so a new switch
# is in every report. 'finetune.<task>.<key>' reads the fine-tuning config of that task.
SWITCHES: tuple[tuple[str, str, Any, Any], ...] = tuple(
    (s.key, s.what, s.paper, s.code) for s in switches() if s.key)
PLOT_PREFIXES = ("bars_", "curves_", "stages_")
# The layout of report.md (sections, tables, plot names). Bump it when that layout changes: the
# committed examples (results/examples/) must carry the current one (tests/test_examples.py).
REPORT_FORMAT = 3
REPORT_FORMAT_TEXT = "report format {}"


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[] (none)"
    if isinstance(value, float):
        return f"{round(value, 4):g}"
    return str(value)


def _by_value(per_variant: Mapping[str, Any], markdown_values: bool = False) -> str:
    """'x' when all variants agree, else 'x (A, B); y (C)'. Names and values are escaped as
    text, except values that are this module's own Markdown (``markdown_values``)."""
    groups: dict[str, list[str]] = {}
    for variant, value in per_variant.items():
        groups.setdefault(_fmt(value), []).append(md_text(variant))
    shown = {v: (v if markdown_values else md_text(v)) for v in groups}
    if len(groups) == 1:
        return shown[next(iter(groups))]
    return "; ".join(f"{shown[v]} ({', '.join(names)})" for v, names in groups.items())


def _switch_value(key: str, configs: Mapping[str, dict[str, Any]]) -> tuple[bool, Any]:
    """(applies, value) of one switch for one variant's configs."""
    pre = (configs.get("pretrain") or {}).get("pretrain") or {}
    if key == "bert_layers":
        if pre.get("init") == "bert":
            return True, pre.get("bert_layers")
        for name, cfg in configs.items():
            ft = cfg.get("finetune") or {}
            if name.startswith("finetune/") and (str(cfg.get("init_from") or "").startswith("bert/")
                                                 or ft.get("init_checkpoint")):
                return True, ft.get("bert_layers")
        return False, None
    section, *rest = key.split(".")
    if section == "pretrain":
        return (True, pre[rest[0]]) if rest[0] in pre else (False, None)
    task, field = rest
    ft = (configs.get(f"finetune/{task}") or {}).get("finetune") or {}
    return (True, ft[field]) if field in ft else (False, None)


def _follows(values: set[str], paper: Any, code: Any) -> str:
    paper, code = _fmt(paper), _fmt(code)
    if values == {paper} and paper == code:
        return "both"
    if values == {paper}:
        return "paper"
    if values == {code}:
        return "official code"
    return "mixed" if len(values) > 1 else "neither"


def switches_table(configs: Mapping[str, Mapping[str, dict[str, Any]]]) -> str:
    rows = []
    for key, what, paper, code in SWITCHES:
        used = {}
        for variant, cfgs in configs.items():
            applies, value = _switch_value(key, cfgs)
            if applies:
                used[variant] = value
        if not used:
            continue
        values = {_fmt(v) for v in used.values()}
        rows.append([what, f"`{key}`", md_text(_fmt(paper)), md_text(_fmt(code)), _by_value(used),
                     _follows(values, paper, code)])
    if not rows:
        return "_No run config.json found yet: switches unknown._"
    headers = ["Switch", "config key", "paper", "official code", "these runs", "follows"]
    return markdown_table(headers, rows, ["left"] * len(headers))


README_SWITCHES_BEGIN = "<!-- paper-vs-code switches: generated by report.render.readme_switches() -->"
README_SWITCHES_END = "<!-- end of paper-vs-code switches -->"


def readme_switches() -> str:
    """The README's table of where the paper and the official code disagree, from the same
    declarations as the report's list (a test keeps the README equal to it)."""
    rows = [["config key", "what", "paper", "official code (default)", "values"], ["---"] * 5]
    rows += [[f"`{s.key}`" if s.key else "— (none)", s.what, _fmt(s.paper), _fmt(s.code), s.values]
             for s in (*switches(), *FIXED_DIFFERENCES)]
    lines = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join([README_SWITCHES_BEGIN, *lines, README_SWITCHES_END])


def model_description(model: Mapping[str, Any]) -> str:
    """The preset the model is, or the nearest preset and what differs (e.g. the demo profile's
    ``tiny`` preset with smaller features and label heads)."""
    def differences(preset: Any) -> dict[str, Any]:
        return {k: v for k, v in model.items() if asdict(preset).get(k, v) != v}

    name, diff = min(((n, differences(p)) for n, p in PRESETS.items()), key=lambda nd: len(nd[1]))
    if not diff:
        return f"`{name}` preset"
    if len(diff) <= 6:
        return f"`{name}` preset with " + ", ".join(f"`{k}={v}`" for k, v in diff.items())
    return (f"custom (hidden {model.get('hidden_size')}, layers L/R/X "
            f"{model.get('l_layers')}/{model.get('r_layers')}/{model.get('x_layers')})")


def _distinct(values: pd.Series) -> list[str]:
    return [str(v) for v in dict.fromkeys(values.dropna()) if str(v)]


def fingerprints(frame: pd.DataFrame, configs: Mapping[str, Mapping[str, dict[str, Any]]]) -> list[str]:
    """Data fingerprints of the finished runs, else of the planned ones (their config.json)."""
    found = _distinct(frame["data_fingerprint"])
    planned = [str((c.get("data") or {}).get("fingerprint") or "") for cfgs in configs.values()
               for c in cfgs.values()]
    return found or [f for f in dict.fromkeys(planned) if f]


def is_synthetic(frame: pd.DataFrame, configs: Mapping[str, Mapping[str, dict[str, Any]]]) -> bool:
    from_configs = any(((c.get("data") or {}).get("synthetic") is True)
                       for cfgs in configs.values() for c in cfgs.values())
    return from_configs or any(f.startswith("synthetic") for f in fingerprints(frame, configs))


def warning_block(spec: ReportSpec, synthetic: bool, fingerprints: Sequence[str]) -> str:
    if spec.profile == "default" and not synthetic:
        return ""
    why = []
    if spec.profile != "default":
        why.append(f"the {md_code(spec.profile)} profile (not the paper's setup)")
    if synthetic:
        fp = ", ".join(md_code(f) for f in fingerprints if f.startswith("synthetic")) or "synthetic"
        why.append(f"the **synthetic** benchmark (data {fp}), not VQA / GQA / NLVR²")
    return (
        "> **⚠️ NOT THE PAPER'S NUMBERS.** These runs used " + " and ".join(why) + ". "
        "They only show that every code path runs; they say nothing about LXMERT. "
        "The *paper* columns are the published numbers, printed for the layout only: "
        "the two are not comparable.\n"
    )


def execution_settings(configs: Mapping[str, Mapping[str, dict[str, Any]]]) -> list[str]:
    """How the stages ran, as their config.json says: torch.compile mode and TF32 (issue 13's
    switches, provenance), each distinct setting once."""
    found = {(str(c.get("compile", "auto")), bool(c.get("tf32", True)))
             for cfgs in configs.values() for c in cfgs.values()}
    return [f"torch.compile {mode}, TF32 {'allowed' if tf32 else 'off'} (CUDA)"
            for mode, tf32 in sorted(found)]


def provenance(spec: ReportSpec, frame: pd.DataFrame,
               configs: Mapping[str, Mapping[str, dict[str, Any]]], synthetic: bool) -> str:
    done = frame[frame["state"] == DONE]
    stages = done.drop_duplicates("stage")
    lines = [f"- **Profile:** {md_code(spec.profile)}" + (" (the paper's setup)" if spec.profile == "default"
                                                    else " — **not** the paper's setup")]
    fps = fingerprints(frame, configs)
    if fps or synthetic:
        kind = "SYNTHETIC benchmark" if synthetic else "real data"
        lines.append(f"- **Data:** {kind}; fingerprint " + (", ".join(md_code(f) for f in fps) or "unknown"))
    else:
        lines.append("- **Data:** unknown (no run has a config.json or result.json yet)")
    models = {v: model_description(c["model"]) for v, cfgs in configs.items()
              for c in list(cfgs.values())[:1] if isinstance(c.get("model"), dict)}
    lines.append("- **Model:** " + (_by_value(models, markdown_values=True) if models
                                    else "unknown (no config.json yet)"))
    lines.append("- **Code version:** " + (", ".join(md_code(c) for c in _distinct(frame["code_version"]))
                                             or "unknown"))
    soft = []
    for col, name in (("torch_version", "torch"), ("python_version", "python"),
                      ("lxmert_bench_version", "lxmert-bench")):
        vals = _distinct(frame[col])
        if vals:
            soft.append(f"{name} {md_text(', '.join(vals))}")
    lines.append("- **Software:** " + ("; ".join(soft) or "unknown"))
    hw = Counter()
    for _, r in stages.iterrows():
        gpus = r["num_gpus"] if isinstance(r["num_gpus"], (int, float)) and not pd.isna(r["num_gpus"]) else 0
        where = f"{r['device']} × {int(gpus)} GPU" if gpus else str(r["device"])
        hw[f"{where}, {r['precision']}"] += 1
    lines.append("- **Hardware:** " + ("; ".join(f"{md_text(k)} ({n} stages)" for k, n in hw.items())
                                       or "unknown (no run done yet)"))
    gpu_h = float(pd.to_numeric(stages["gpu_hours"], errors="coerce").fillna(0).sum())
    wall_h = float(pd.to_numeric(stages["total_s"], errors="coerce").fillna(0).sum()) / 3600
    lines.append(f"- **Compute:** {gpu_h:.2f} GPU-hours, {wall_h:.2f} h of run time, over "
                 f"{len(stages)} finished stages (shared pretraining counted once)")
    lines.append("- **Runs:** " + _state_summary(frame))
    lines.append("- **Execution** (changes numbers within rounding only; not in stage ids): "
                 + (", ".join(md_text(e) for e in execution_settings(configs)) or "unknown"))
    for key, value in spec.notes.items():
        if value not in (None, "", [], {}, ()):
            lines.append(f"- **{md_text(key)}:** {md_text(_fmt(value))}")
    return "\n".join(lines)


GQA_NOTE_KEYS = {"gqa binary/open": "Binary / open", "gqa official metrics": "Official metrics"}


def gqa_notes(frame: pd.DataFrame) -> list[str]:
    """How the GQA runs computed binary / open and the official metrics (their result.json
    ``metric_notes``): by structural type from the official balanced question files, or
    approximated by the answer when those files were absent."""
    runs = frame[(frame["task"] == "gqa") & (frame["state"] == DONE)].drop_duplicates("stage")
    notes: dict[str, Counter] = {k: Counter() for k in GQA_NOTE_KEYS}
    for run_dir in runs["run_dir"]:
        try:
            result = read_json_file(Path(run_dir) / "result.json") or {}
        except ValueError:
            continue  # collect() already reported it as a failed cell
        recorded = result.get("metric_notes") if isinstance(result, dict) else None
        recorded = recorded if isinstance(recorded, dict) else {}
        for key in GQA_NOTE_KEYS:
            notes[key][str(recorded.get(key, "not recorded (a run of an older version)"))] += 1
    lines = []
    for key, label in GQA_NOTE_KEYS.items():
        for text, n in notes[key].items():
            lines.append(f"- **{label}:** {md_text(text)} ({n} run{'' if n == 1 else 's'})")
    return [*lines, ""] if lines else []


def _state_summary(frame: pd.DataFrame) -> str:
    parts = []
    for kind, label in (("finetune", "fine-tuning"), ("pretrain", "pretraining"),
                        ("bert", "text-only BERT")):
        runs = frame[frame["kind"] == kind].drop_duplicates("stage")
        if runs.empty:
            continue
        counts = Counter(runs["state"])
        rest = ", ".join(f"{n} {s}" for s, n in counts.items() if s != DONE)
        parts.append(f"{label} {counts.get('done', 0)}/{len(runs)} done" + (f" ({rest})" if rest else ""))
    return "; ".join(parts) or "none"


def not_done_table(frame: pd.DataFrame) -> str:
    runs = frame[frame["state"] != DONE].drop_duplicates(["variant", "stage"])
    if runs.empty:
        return ""
    rows = []
    for _, r in runs.iterrows():
        seed = "" if pd.isna(r["seed"]) else str(r["seed"])
        error = r["error"] if isinstance(r["error"], str) else ""
        rows.append([md_text(r["variant"]), md_text(TASK_LABELS.get(r["task"], r["task"])), seed,
                     md_text(r["state"]), md_code(r["stage"]), md_text(error)])
    headers = ["Variant", "Task", "Seed", "State", "Stage", "Error"]
    return markdown_table(headers, rows, ["left"] * len(headers))


# ------------------------------------------------------------------------------------------------
def render_markdown(spec: ReportSpec, frame: pd.DataFrame,
                    configs: Mapping[str, Mapping[str, dict[str, Any]]],
                    comparisons: Mapping[tuple[str, str], Comparison],
                    plots: Sequence[str], n_resamples: int = N_RESAMPLES) -> str:
    """The whole report.md text (plots as relative links)."""
    summary = Summary(frame)
    synthetic = is_synthetic(frame, configs)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# {md_text(spec.title)}", ""]
    warning = warning_block(spec, synthetic, fingerprints(frame, configs))
    if warning:
        out += [warning]
    out += [f"Spec `{spec.name}`; generated {now} by lxmert-bench {__version__} "
            f"({REPORT_FORMAT_TEXT.format(REPORT_FORMAT)}) from the run "
            "directories (the rows behind every number are in [`results.jsonl`](results.jsonl)).", ""]
    out += ["## Provenance", "", provenance(spec, frame, configs, synthetic), ""]
    out += ["### Where the paper and the official code differ", "",
            "The choices these runs made (what each switch means: docs/paper_vs_code.md in the "
            "lxmert-bench repository), read from their `config.json`:", "",
            switches_table(configs), ""]
    out += ["## Results (dev sets: VQA minival, GQA testdev, NLVR² dev)", "",
            main_table(summary, spec, comparisons), "",
            main_table_legend(spec, bool(comparisons), n_resamples), ""]
    if comparisons:
        out += [f"### Significance vs. *{md_text(spec.reference_variant)}*", "",
                significance_table(comparisons), "",
                f"Paired by seed (t-test) or by dev example (bootstrap, {n_resamples:,} resamples, "
                "fixed seed); Δ and its 95% CI in accuracy points, variant minus reference.", ""]
    for title, table in axis_tables(summary, spec).items():
        out += [f"### {md_text(title)}", "", table, "",
                "Dev-set accuracy (%) of each cell, as in the table above; a row holds everything "
                "but this axis fixed, its best per task in **bold**.", ""]
    out += ["## Details", ""]
    for title, table in detail_tables(summary, spec).items():
        out += [f"### {title}", "", table, ""]
        if title == "GQA":
            out += gqa_notes(frame)
        if title == PRETRAINING_LOSSES:
            out += ["— : a task the variant does not train. *total* sums the losses of the tasks a "
                    "variant trains, so it is not comparable across rows (never bold).", ""]
        if title == PRETRAINING_DIAGNOSTICS:
            out += ["*matching accuracy*: image-sentence matching on the validation pairs (half "
                    "matched, half with another image's sentence; chance 50 %). *masked LM, own / "
                    "another image*: the masked-LM loss of the matched pairs with their own image "
                    "and with another one; equal while masked words are guessed from the text "
                    "alone, apart once the language side reads the objects.", ""]
    out += submissions_section(frame)
    if plots:
        out += ["## Plots", ""]
        for name in plots:
            out += [f"![{Path(name).stem}]({name})", ""]
    missing = not_done_table(frame)
    if missing:
        out += ["## Runs not done", "", missing, ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(spec: ReportSpec, entries: Sequence[ReportEntry], workdir: str | os.PathLike,
                 out_dir: str | os.PathLike, n_resamples: int = N_RESAMPLES) -> Path:
    """Collect, test, tabulate and plot; write ``report.md``, ``results.jsonl`` and the PNGs into
    ``out_dir`` (each moved into place whole, report.md last). Returns the report's path."""
    out_dir = Path(out_dir)
    tmp = owned_temp_dir(out_dir / "report.md")  # .report.md.tmp-<host>-<pid>
    try:
        frame = collect(entries, workdir, results_path=tmp / "results.jsonl")
        curves = read_curves(entries, workdir)
        configs = read_configs(entries, workdir)
        comparisons = compare_to_reference(frame, spec, n_resamples=n_resamples)
        note = plot_note(spec.profile, is_synthetic(frame, configs))
        pngs = (plot_task_bars(frame, spec, tmp, note=note,
                               show_paper=not is_synthetic(frame, configs))
                + plot_training_curves(curves, spec, tmp, note=note)
                + plot_stage_curves(curves, spec, tmp, note=note))
        text = render_markdown(spec, frame, configs, comparisons, [p.name for p in pngs],
                               n_resamples)
        atomic_write_text(tmp / "report.md", text)
        for old in out_dir.glob("*.png"):  # plots of an earlier report that this one no longer has
            if old.name.startswith(PLOT_PREFIXES) and not (tmp / old.name).exists():
                old.unlink()
        for name in [p.name for p in pngs] + ["results.jsonl", "report.md"]:
            os.replace(tmp / name, out_dir / name)  # each written 0666 & ~umask by io.py
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "report.md"
