"""The report's list of test-split predictions (leaderboard files; the paper's Table 2).

Read from each fine-tuning's ``predictions/test_predictions.json`` (train/finetune.py, written at
the end of the stage and again by ``lxmert-bench predict``), so files written after the stage
finished are listed too.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lxmert_bench.io import read_json
from lxmert_bench.report.tables import TASK_LABELS, markdown_table, md_code, md_text

MANIFEST = Path("predictions") / "test_predictions.json"


def submissions_section(frame: pd.DataFrame) -> list[str]:
    """Markdown lines: a table of every test prediction file of the report's fine-tunings (split,
    leaderboard, file, examples, local score when the split's answers are released) and the
    splits that were absent; [] when the frame has no fine-tuning run."""
    if frame.empty or "run_dir" not in frame:
        return []
    runs = (frame[frame["kind"] == "finetune"][["variant", "task", "seed", "run_dir"]]
            .dropna(subset=["run_dir"]).drop_duplicates("run_dir"))
    if runs.empty:
        return []
    rows, absent, unread = [], {}, 0
    for run in runs.itertuples(index=False):
        path = Path(run.run_dir) / MANIFEST
        if not path.is_file():
            unread += 1
            continue
        try:
            manifest = read_json(path)
            splits, missing = dict(manifest["splits"]), dict(manifest.get("absent", {}))
        except (ValueError, KeyError, TypeError):
            unread += 1
            continue
        for split, entry in splits.items():
            scored = ", ".join(f"{k} {v:.2f}" for k, v in (entry.get("metrics") or {}).items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool))
            rows.append([md_text(run.variant), TASK_LABELS.get(run.task, run.task), str(run.seed),
                         md_text(entry.get("leaderboard", split)),
                         md_code(Path(run.run_dir) / entry["file"]),
                         f"{entry.get('examples', '?')} of {entry.get('records', '?')}",
                         md_text(scored or "—")])
        for split, why in missing.items():
            absent.setdefault(f"{run.task} {split}", md_text(why))
    out = ["## Test-split predictions (leaderboard files)", ""]
    if rows:
        out += [markdown_table(["Variant", "Task", "Seed", "Split", "File", "Examples",
                                "Local score (released answers)"], rows,
                               align=("left",) * 5 + ("right", "left")), ""]
        out += ["Files in each leaderboard's format (VQA `[{question_id, answer}]`, GQA "
                "`[{questionId, prediction}]`, NLVR² `identifier,True|False` CSV), predicted from "
                "each run's best dev epoch (`checkpoints/best.pt`).", ""]
    for what, why in absent.items():
        out.append(f"- **absent:** {md_text(what)}: {why}")
    if absent:
        out.append("")
    if unread:
        out += [f"{unread} fine-tuning run(s) without test predictions yet (unfinished, or finished "
                "before test splits were predicted): `lxmert-bench predict SPEC` writes them.", ""]
    return out
