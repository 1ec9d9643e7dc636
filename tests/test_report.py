"""Reports from fake-but-realistic run directories written here by hand, following the result.json
schema of docs/internals.md; the Markdown is checked with a real parser (markdown-it-py)."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from markdown_it import MarkdownIt

from lxmert_bench.config import TASK_DEFAULTS, DataConfig, PretrainConfig, RunConfig
from lxmert_bench.launch import stage_statuses
from lxmert_bench.model.config import LxmertConfig
from lxmert_bench.report import (
    ReportEntry,
    ReportSpec,
    collect,
    compare_to_reference,
    paper_row,
    paper_value,
    read_configs,
    read_curves,
    read_results_jsonl,
    write_report,
)
from lxmert_bench.report.collect import read_log
from lxmert_bench.report.harness import report_entries
from lxmert_bench.report.harness import report_spec as harness_report_spec
from lxmert_bench.report.paper import normalize_row_name, paper_table
from lxmert_bench.report.plots import plot_task_bars, plot_training_curves
from lxmert_bench.report.render import render_markdown, switches_table
from lxmert_bench.report.significance import (
    BOOTSTRAP,
    NONE,
    T_TEST,
    compare,
    paired_bootstrap,
    paired_t_test,
)
from lxmert_bench.report.tables import Summary, detail_tables, main_table
from lxmert_bench.store import RunDir

SYNTHETIC_FP = "synthetic-v1-600-0"
VISUAL = {"No Vision Tasks": [], "Feat": ["feat"], "Label": ["obj", "attr"],
          "Feat + Label": ["obj", "attr", "feat"]}
N_EXAMPLES = 400


# ------------------------------------------------------------------------------------------------
# building run directories
# ------------------------------------------------------------------------------------------------
def _hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _scores(accuracy: float, shift: int = 0) -> dict[str, float]:
    """0/1 per-example scores whose mean is ``accuracy`` %; ``shift`` rotates which are right."""
    right = round(accuracy * N_EXAMPLES / 100)
    return {f"ex{i:04d}": float((i + shift) % N_EXAMPLES < right) for i in range(N_EXAMPLES)}


def _common(fingerprint: str) -> dict:
    synthetic = fingerprint.startswith("synthetic")
    return dict(model=LxmertConfig.preset("tiny"), code_version="0.1.0+abcd1234",
                data=DataConfig(root="data", synthetic=synthetic, fingerprint=fingerprint))


def write_pretrain(workdir: Path, variant: str, fingerprint: str = SYNTHETIC_FP,
                   state: str = "done") -> str:
    stage = f"pretrain/{_hash('pretrain', variant)}"
    run = workdir / "runs" / stage
    run.mkdir(parents=True)
    visual = VISUAL.get(variant, ["obj", "attr", "feat"])
    cfg = RunConfig(kind="pretrain", seed=9595,
                    pretrain=PretrainConfig(visual_losses=tuple(visual), qa_start=0.5),
                    **_common(fingerprint))
    (run / "config.json").write_text(cfg.to_json())
    losses = {"mlm": 2.0, "matched": 0.5, "qa": 3.0, **{v: 1.0 for v in visual}}
    with open(run / "log.jsonl", "w") as f:
        for step in range(0, 50, 10):
            ls = {k: v * (1 - step / 100) for k, v in losses.items()}
            f.write(json.dumps({"step": step, "epoch": step // 20, "lr": 1e-4, "loss": sum(ls.values()),
                                "losses": ls, "samples_per_s": 100.0, "time": 1.0}) + "\n")
    if state == "done":
        result = {"stage_id": stage, "kind": "pretrain", "config_hash": stage[-12:], "seed": 9595,
                  "metrics": {"loss": sum(losses.values()) * 0.5,
                              **{k: v * 0.5 for k, v in losses.items()}},
                  "timings": {"train_s": 3000.0, "eval_s": 600.0, "total_s": 3600.0},
                  "device": "cuda", "num_gpus": 4, "gpu_hours": 4.0, "precision": "bf16",
                  "versions": {"lxmert_bench": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
                  "data_fingerprint": fingerprint, "code_version": "0.1.0+abcd1234",
                  # diagnostics beside the losses; No Vision Tasks has none (an older result)
                  **PRETRAIN_DIAGNOSTICS.get(variant, {})}
        (run / "result.json").write_text(json.dumps(result))
    return stage


PRETRAIN_DIAGNOSTICS = {
    "Feat + Label": {"matched_accuracy": 81.25,
                     "image_reading": {"mlm_own_image": 0.5, "mlm_other_image": 0.75}},
    "Label": {"matched_accuracy": 55.0, "image_reading": None},
    "Feat": {"matched_accuracy": 50.0},
}


def write_finetune(workdir: Path, variant: str, task: str, seed: int, state: str,
                   accuracy: float | None = None, pretrain: str | None = None,
                   fingerprint: str = SYNTHETIC_FP, shift: int = 0) -> str:
    stage = f"finetune/{_hash(variant, task, seed)}"
    run = workdir / "runs" / stage
    run.mkdir(parents=True)
    cfg = RunConfig(kind="finetune", seed=seed, finetune=TASK_DEFAULTS[task], init_from=pretrain,
                    **_common(fingerprint))
    (run / "config.json").write_text(cfg.to_json())
    if state in ("running", "done", "failed"):
        with open(run / "log.jsonl", "w") as f:
            for step in range(0, 30, 5):
                f.write(json.dumps({"step": step, "epoch": step // 10, "lr": 5e-5,
                                    "loss": 2.0 - step / 20 + seed * 0.01, "losses": {},
                                    "samples_per_s": 50.0, "time": 0.5}) + "\n")
            f.write(json.dumps({"step": 30, "epoch": 3, "split": "valid",
                                "metrics": {"accuracy": accuracy or 0.0}}) + "\n")
    if state == "failed":
        (run / "error.json").write_text(json.dumps({
            "error": "CUDA out of memory. Tried to allocate 2.00 GiB", "type": "OutOfMemoryError",
            "traceback": "Traceback ...", "time": "2026-11-23T07:00:00Z", "stage_id": stage}))
    if state == "done":
        assert accuracy is not None
        metrics = {"accuracy": accuracy}
        if task == "vqa":
            metrics.update({"yes/no": accuracy + 15, "number": accuracy - 17, "other": accuracy - 7})
        elif task == "gqa":
            metrics.update({"binary": accuracy + 17, "open": accuracy - 15})
        else:
            metrics["consistency"] = accuracy - 33
        (run / "predictions").mkdir()
        (run / "predictions" / "dev_scores.json").write_text(json.dumps(_scores(accuracy, shift)))
        result = {
            "stage_id": stage, "kind": "finetune", "config_hash": stage[-12:], "seed": seed,
            "task": task, "metrics": metrics, "last_metrics": metrics, "best_epoch": 3,
            "history": [{"epoch": 3, "metrics": metrics}],
            "predictions": {"dev": "predictions/dev_predict.json",
                            "scores": "predictions/dev_scores.json"},
            "steps": 30, "samples": 960, "samples_per_s": 50.0,
            "timings": {"train_s": 300.0, "eval_s": 60.0, "total_s": 360.0},
            "device": "cuda", "num_gpus": 1, "gpu_hours": 0.1, "precision": "bf16",
            "versions": {"lxmert_bench": "0.1.0", "torch": "2.13.0", "python": "3.11.7"},
            "data_fingerprint": fingerprint, "code_version": "0.1.0+abcd1234",
            "finished_at": "2026-11-23T07:00:00Z",
        }
        (run / "result.json").write_text(json.dumps(result))
    return stage


# Table 5 with known answers, 3 seeds. (variant, task) -> [(seed, state, accuracy)]
REF = "Feat + Label"
CELLS: dict[tuple[str, str], list[tuple[int, str, float | None]]] = {
    (REF, "vqa"): [(0, "done", 70.0), (1, "done", 70.5), (2, "done", 69.5)],
    (REF, "gqa"): [(0, "done", 60.0), (1, "done", 60.25), (2, "done", 59.75)],
    (REF, "nlvr2"): [(0, "done", 75.0), (1, "done", 74.5), (2, "done", 75.5)],
    # clearly worse on VQA (3 seeds: t-test), identical on GQA, one NLVR2 seed failed (bootstrap)
    ("Label", "vqa"): [(0, "done", 66.0), (1, "done", 66.75), (2, "done", 65.25)],
    ("Label", "gqa"): [(0, "done", 60.0), (1, "done", 60.25), (2, "done", 59.75)],
    ("Label", "nlvr2"): [(0, "done", 60.0), (1, "done", 61.0), (2, "failed", None)],
    # a running seed; no GQA runs at all; NLVR2 the best
    ("Feat", "vqa"): [(0, "done", 69.0), (1, "done", 69.5), (2, "running", None)],
    ("Feat", "nlvr2"): [(0, "done", 76.0), (1, "done", 76.5), (2, "done", 77.0)],
    # nothing started yet on VQA; done elsewhere
    ("No Vision Tasks", "vqa"): [(0, "to run", None), (1, "to run", None), (2, "to run", None)],
    ("No Vision Tasks", "gqa"): [(0, "done", 57.0), (1, "done", 57.5), (2, "done", 56.5)],
    ("No Vision Tasks", "nlvr2"): [(0, "done", 51.0), (1, "done", 50.5), (2, "done", 50.0)],
}
SPEC = ReportSpec(name="vision_tasks", title="Vision pretraining tasks (LXMERT Table 5)",
                  variants=["No Vision Tasks", "Feat", "Label", "Feat + Label"],
                  tasks=["vqa", "gqa", "nlvr2"], reference="table5", reference_variant=REF,
                  profile="demo", notes={"seeds": [0, 1, 2]})


def build_table5(workdir: Path, fingerprint: str = SYNTHETIC_FP) -> list[ReportEntry]:
    pre = {v: write_pretrain(workdir, v, fingerprint) for v in SPEC.variants}
    entries = []
    for (variant, task), runs in CELLS.items():
        for seed, state, acc in runs:
            stage = write_finetune(workdir, variant, task, seed, state, acc, pre[variant], fingerprint)
            # the harness's view: 'done' runs say done; the others say what the scheduler says
            entries.append(ReportEntry(variant, seed, task, stage, pre[variant], state))
    return entries


@pytest.fixture(scope="module")
def table5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ReportEntry]]:
    workdir = tmp_path_factory.mktemp("work")
    return workdir, build_table5(workdir)


@pytest.fixture(scope="module")
def frame(table5):
    workdir, entries = table5
    return collect(entries, workdir)


@pytest.fixture(scope="module")
def report(table5, tmp_path_factory) -> Path:
    workdir, entries = table5
    return write_report(SPEC, entries, workdir, tmp_path_factory.mktemp("out") / "vision_tasks",
                        n_resamples=2000)


# ------------------------------------------------------------------------------------------------
# Markdown parsing with a real parser
# ------------------------------------------------------------------------------------------------
def parse_tables(markdown: str) -> list[list[list[str]]]:
    """Every table in ``markdown`` as rows of cell source text (header row first)."""
    tokens = MarkdownIt().enable("table").parse(markdown)
    tables, rows, row = [], None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
        elif tok.type == "table_close":
            tables.append(rows)
    return tables


def cell(table: list[list[str]], row_name: str, column: str) -> str:
    header = table[0]
    for r in table[1:]:
        if r[0] == row_name:
            return r[header.index(column)]
    raise KeyError(row_name)


def fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ------------------------------------------------------------------------------------------------
# paper numbers
# ------------------------------------------------------------------------------------------------
def test_paper_lookup_is_tolerant_of_spelling():
    assert paper_value("table5", "feat+label", "vqa") == 69.9
    assert paper_value("table5", "4. Feat + Label", "nlvr2") == 74.9
    assert paper_value("table4", "P10 + QA10 + FT", "gqa") == 60.0
    assert paper_value("table3", "pretrain + scratch", "nlvr2") == 74.9
    assert paper_value("Table 3", "BERT + 1 crossatt", "vqa") == 64.6
    assert paper_value("table4", "P20 + DA", "nlvr2") is None  # the paper's "–"
    assert paper_value("table5", "Not a row", "vqa") is None
    assert paper_value(None, "Feat", "vqa") is None
    assert paper_row("table2", "lxmert")[("nlvr2", "consistency")] == 42.1
    assert normalize_row_name("**NLVR²**") == "nlvr2"
    with pytest.raises(KeyError, match="table9"):
        paper_table("table9")


def test_every_shipped_ablation_variant_is_a_paper_row():
    import yaml

    for path in sorted(Path(__file__).parents[1].joinpath("ablations").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for variant in spec["variants"]:
            assert paper_row(spec["reference"], variant) is not None, (path.name, variant)


# ------------------------------------------------------------------------------------------------
# collect
# ------------------------------------------------------------------------------------------------
def test_collect_rows_states_and_results_jsonl(table5, tmp_path):
    workdir, entries = table5
    out = tmp_path / "results.jsonl"
    frame = collect(entries, workdir, results_path=out)
    ft = frame[frame["kind"] == "finetune"]
    # one row per metric of each done run (vqa 4, gqa 3, nlvr2 2), one per run not done
    done = [(v, t) for (v, t), runs in CELLS.items() for _s, st, _a in runs if st == "done"]
    not_done = [st for runs in CELLS.values() for _s, st, _a in runs if st != "done"]
    per_task = {"vqa": 4, "gqa": 3, "nlvr2": 2}
    assert len(ft) == sum(per_task[t] for _v, t in done) + len(not_done)
    row = ft[(ft["variant"] == "Label") & (ft["task"] == "vqa") & (ft["seed"] == 1)
             & (ft["metric"] == "accuracy")].iloc[0]
    assert row["value"] == 66.75 and row["state"] == "done" and row["device"] == "cuda"
    assert row["data_fingerprint"] == SYNTHETIC_FP and row["torch_version"] == "2.13.0"
    assert row["pretrain_stage"].startswith("pretrain/") and row["gpu_hours"] == 0.1
    failed = ft[ft["state"] == "failed"].iloc[0]
    assert failed["variant"] == "Label" and "OutOfMemoryError: CUDA out of memory" in failed["error"]
    assert sorted(ft.loc[ft["metric"].isna(), "state"]) == sorted(not_done)
    # pretraining losses: one set per variant, its own seed
    pre = frame[frame["kind"] == "pretrain"]
    assert set(pre["variant"]) == set(SPEC.variants)
    assert set(pre.loc[pre["variant"] == "Label", "metric"]) == {"loss", "mlm", "matched", "qa", "obj",
                                                                 "attr", "matched_accuracy"}
    # and its diagnostics, read from beside the losses (image_reading: None adds nothing)
    fl = pre[pre["variant"] == "Feat + Label"].set_index("metric")["value"]
    assert (fl["matched_accuracy"], fl["mlm_own_image"], fl["mlm_other_image"]) == (81.25, 0.5, 0.75)
    assert set(pre["seed"]) == {9595}
    # results.jsonl: one JSON object per row, readable back into the same frame
    lines = out.read_text().splitlines()
    assert len(lines) == len(frame)
    assert json.loads(lines[0])["variant"] == frame.iloc[0]["variant"]
    back = read_results_jsonl(out)
    assert list(back.columns) == list(frame.columns)
    assert back["value"].sum() == pytest.approx(frame["value"].sum())


def test_collect_reads_state_from_disk_and_never_trusts_done_without_result(tmp_path):
    pre = write_pretrain(tmp_path, "Feat")
    done = write_finetune(tmp_path, "Feat", "vqa", 0, "done", 68.0, pre)
    running = write_finetune(tmp_path, "Feat", "vqa", 1, "running", None, pre)
    failed = write_finetune(tmp_path, "Feat", "vqa", 2, "failed", None, pre)
    pending = write_finetune(tmp_path, "Feat", "vqa", 3, "to run", None, pre)
    entries = [ReportEntry("Feat", i, "vqa", s, pre) for i, s in enumerate((done, running, failed, pending))]
    entries.append(ReportEntry("Feat", 4, "vqa", "finetune/000000000000", pre, state="done"))
    with RunDir(tmp_path, running).execution_lock():  # a live process executes seed 1
        frame = collect(entries, tmp_path)
    states = frame[frame["kind"] == "finetune"].drop_duplicates("stage").set_index("seed")["state"]
    assert states.to_dict() == {0: "done", 1: "running", 2: "failed", 3: "to run", 4: "failed"}
    missing = frame[frame["seed"] == 4].iloc[0]
    assert "result.json: not found, though the run was said to be done" in missing["error"]
    # the same run directories without the lock: started, nobody runs it, no error: interrupted
    again = collect(entries, tmp_path)
    assert again[again["seed"] == 1].iloc[0]["state"] == "interrupted"


def test_collect_errors_name_the_file_and_key(tmp_path):
    """A broken result.json is a failed cell whose error names the file and key (a report never
    crashes on one, and never shows it as a number)."""
    stage = write_finetune(tmp_path, "Feat", "vqa", 0, "done", 68.0)
    result_path = tmp_path / "runs" / stage / "result.json"
    entry = ReportEntry("Feat", 0, "vqa", stage)
    good = json.loads(result_path.read_text())

    def error_of_broken() -> str:
        frame = collect([entry], tmp_path)
        (row,) = frame.to_dict("records")
        assert row["state"] == "failed" and row["metric"] is None
        return row["error"]

    result_path.write_text(json.dumps({**good, "metrics": {"accuracy": "high"}}))
    assert re.search(r"result\.json: key 'metrics\.accuracy' must be a number", error_of_broken())
    result_path.write_text(json.dumps({k: v for k, v in good.items() if k != "metrics"}))
    assert re.search(r"result\.json: key 'metrics'", error_of_broken())
    result_path.write_text(json.dumps({**good, "task": "gqa"}))
    assert re.search(r"key 'task' is 'gqa' but the report entry .* expects 'vqa'", error_of_broken())
    result_path.write_text('{\n  "metrics": {\n    "accuracy": 1,,\n')
    assert re.search(r"result\.json:3:\d+: invalid JSON", error_of_broken())


def test_report_inputs_are_validated():
    with pytest.raises(ValueError, match="task 'coco'"):
        ReportEntry("Feat", 0, "coco", "finetune/abc")
    with pytest.raises(ValueError, match="state 'lost'"):
        ReportEntry("Feat", 0, "vqa", "finetune/abc", state="lost")
    with pytest.raises(ValueError, match="'reference_variant' 'Nope'"):
        ReportSpec("x", "X", ["A"], reference_variant="Nope")
    with pytest.raises(ValueError, match="'reference' 'table7'"):
        ReportSpec("x", "X", ["A"], reference="table7")
    with pytest.raises(ValueError, match="repeats"):
        ReportSpec("x", "X", ["A", "A"])


def test_log_reading_tolerates_a_torn_last_line_only(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    log.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: invalid JSON line"):
        read_log(log)


def test_curves_and_configs(table5):
    workdir, entries = table5
    curves = read_curves(entries, workdir)
    ft = curves[(curves["kind"] == "finetune") & (curves["series"] == "loss")]
    # done, running and failed runs logged 6 training lines each; pending ones nothing
    logged = sum(1 for runs in CELLS.values() for _s, st, _a in runs if st != "to run")
    assert len(ft) == 6 * logged
    pre = curves[(curves["kind"] == "pretrain") & (curves["variant"] == "Feat")]
    assert set(pre["series"]) == {"loss", "loss/mlm", "loss/matched", "loss/qa", "loss/feat"}
    assert "valid/accuracy" in set(curves["series"])
    configs = read_configs(entries, workdir)
    assert configs["Label"]["pretrain"]["pretrain"]["visual_losses"] == ["obj", "attr"]
    assert configs["Feat"].keys() == {"finetune/vqa", "finetune/nlvr2", "pretrain"}


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def test_main_table_layout_statistics_bold_and_paper(frame):
    comparisons = compare_to_reference(frame, SPEC, n_resamples=2000)
    md = main_table(Summary(frame), SPEC, comparisons)
    [table] = parse_tables(md)
    assert len(table) == 1 + len(SPEC.variants)  # header + one row per variant
    assert all(len(r) == 1 + 2 * len(SPEC.tasks) for r in table)
    assert table[0] == ["Variant", "VQA ↑", "VQA paper", "GQA ↑", "GQA paper", "NLVR² ↑", "NLVR² paper"]
    assert [r[0] for r in table[1:]] == ["No Vision Tasks", "Feat", "Label", "Feat + Label (ref.)"]
    # mean ± sample std over seeds, best in bold (ref VQA is the best VQA row)
    ref_vqa = [a for _s, _st, a in CELLS[(REF, "vqa")]]
    assert cell(table, "Feat + Label (ref.)", "VQA ↑") == f"**{fmt(ref_vqa)}** (n=3)"
    label_vqa = [a for _s, _st, a in CELLS[("Label", "vqa")]]
    assert cell(table, "Label", "VQA ↑") == f"{fmt(label_vqa)}† (n=3)"
    # Feat has the best NLVR2 mean: bold there, and the ref is not
    assert cell(table, "Feat", "NLVR² ↑").startswith("**76.50 ± 0.50**")
    assert not cell(table, "Feat + Label (ref.)", "NLVR² ↑").startswith("**")
    # GQA: ref and Label tie for best: both bold; identical -> no mark
    assert cell(table, "Label", "GQA ↑") == "**60.00 ± 0.25** (n=3)"
    # the paper's numbers beside ours
    assert cell(table, "No Vision Tasks", "VQA paper") == "66.3"
    assert cell(table, "Feat + Label (ref.)", "NLVR² paper") == "74.9"
    assert cell(table, "Label", "GQA paper") == "59.3"


def test_partial_results_say_their_state(frame):
    [table] = parse_tables(main_table(Summary(frame), SPEC))
    assert cell(table, "Feat", "VQA ↑") == "69.25 ± 0.35 (n=2) · running (2/3 done)"
    assert cell(table, "Feat", "GQA ↑") == "— (no runs)"
    assert cell(table, "No Vision Tasks", "VQA ↑") == "to run (0/3 done)"
    assert cell(table, "Label", "NLVR² ↑") == "60.50 ± 0.71 (n=2) · failed (2/3 done)"


def test_detail_tables(frame):
    tables = detail_tables(Summary(frame), SPEC)
    assert list(tables) == ["VQA per answer type", "GQA", "NLVR² accuracy and consistency",
                            "Pretraining losses (final validation loss per task)",
                            "Pretraining: matching accuracy and image reading (final validation)"]
    [vqa] = parse_tables(tables["VQA per answer type"])
    assert vqa[0] == ["Variant", "accuracy ↑", "yes/no ↑", "number ↑", "other ↑"]
    assert len(vqa) == 1 + len(SPEC.variants)
    assert cell(vqa, "Label", "number ↑") == f"{fmt([49.0, 49.75, 48.25])} (n=3)"
    [nlvr] = parse_tables(tables["NLVR² accuracy and consistency"])
    assert cell(nlvr, "Feat", "consistency ↑").startswith("**43.50 ± 0.50**")
    [pre] = parse_tables(tables["Pretraining losses (final validation loss per task)"])
    assert pre[0][:2] == ["Variant", "total ↓"]
    # totals sum different task sets: never bold; per-task losses are compared
    assert cell(pre, "No Vision Tasks", "total ↓") == "2.750 (n=1)"
    assert cell(pre, "Feat + Label", "total ↓") == "4.250 (n=1)"
    assert cell(pre, "No Vision Tasks", "RoI feat ↓") == "—"  # done, but has no such loss
    assert cell(pre, "Feat + Label", "RoI feat ↓") == "**0.500** (n=1)"  # ties with Feat
    assert cell(pre, "Label", "RoI feat ↓") == "—"
    assert not any("matching accuracy" in h for h in pre[0])  # diagnostics have their own table
    [diag] = parse_tables(tables["Pretraining: matching accuracy and image reading (final validation)"])
    assert diag[0] == ["Variant", "matching accuracy (%) ↑", "masked LM, own image ↓",
                       "masked LM, another image ↑"]
    assert cell(diag, "Feat + Label", "matching accuracy (%) ↑") == "**81.250** (n=1)"
    assert cell(diag, "Label", "matching accuracy (%) ↑") == "55.000 (n=1)"
    assert cell(diag, "Feat + Label", "masked LM, own image ↓") == "**0.500** (n=1)"
    assert cell(diag, "Feat + Label", "masked LM, another image ↑") == "0.750 (n=1)"  # never bold
    assert cell(diag, "Label", "masked LM, own image ↓") == "—"
    assert cell(diag, "No Vision Tasks", "matching accuracy (%) ↑") == "—"  # logged none


# ------------------------------------------------------------------------------------------------
# significance
# ------------------------------------------------------------------------------------------------
def test_significance_on_constructed_data(frame):
    comps = compare_to_reference(frame, SPEC, n_resamples=2000)
    clear = comps[("Label", "vqa")]  # 4 points worse on every seed
    assert clear.method == T_TEST and clear.seeds == 3 and clear.significant
    assert clear.diff == pytest.approx(-4.0) and clear.ci_high < 0
    same = comps[("Label", "gqa")]  # identical numbers
    assert same.method == T_TEST and not same.significant and same.p_value == 1.0
    boot = comps[("Label", "nlvr2")]  # one seed failed: 2 paired seeds -> bootstrap on examples
    assert boot.method == BOOTSTRAP and boot.seeds == 2 and boot.examples == N_EXAMPLES
    assert boot.significant and boot.diff == pytest.approx(((60 - 75) + (61 - 74.5)) / 2)
    assert comps[("Feat", "gqa")].method == NONE and not comps[("Feat", "gqa")].significant
    assert ("Feat + Label", "vqa") not in comps


def test_bootstrap_with_one_seed(tmp_path):
    pre = write_pretrain(tmp_path, "Feat + Label")
    entries = [
        ReportEntry("A", 0, "nlvr2", write_finetune(tmp_path, "A", "nlvr2", 0, "done", 75.0, pre), pre),
        ReportEntry("B", 0, "nlvr2", write_finetune(tmp_path, "B", "nlvr2", 0, "done", 65.0, pre), pre),
        ReportEntry("C", 0, "nlvr2", write_finetune(tmp_path, "C", "nlvr2", 0, "done", 75.0, pre), pre),
        # same accuracy as A but other examples right: no clear per-example difference either
        ReportEntry("D", 0, "nlvr2", write_finetune(tmp_path, "D", "nlvr2", 0, "done", 74.0, pre,
                                                    shift=7), pre),
    ]
    frame = collect(entries, tmp_path)
    spec = ReportSpec("s", "S", ["A", "B", "C", "D"], ["nlvr2"], reference_variant="A")
    comps = compare_to_reference(frame, spec, n_resamples=2000)
    assert comps[("B", "nlvr2")].method == BOOTSTRAP and comps[("B", "nlvr2")].significant
    assert comps[("B", "nlvr2")].ci_high < 0 < 15
    assert not comps[("C", "nlvr2")].significant and comps[("C", "nlvr2")].p_value == 1.0
    assert not comps[("D", "nlvr2")].significant
    [table] = parse_tables(main_table(Summary(frame), spec, comps))
    assert cell(table, "B", "NLVR² ↑") == "65.00† (n=1)"
    assert cell(table, "C", "NLVR² ↑") == "**75.00** (n=1)"


def test_bootstrap_needs_scores(tmp_path):
    a = write_finetune(tmp_path, "A", "gqa", 0, "done", 60.0)
    b = write_finetune(tmp_path, "B", "gqa", 0, "done", 50.0)
    (tmp_path / "runs" / b / "predictions" / "dev_scores.json").write_text('{"q1": "yes"}')
    frame = collect([ReportEntry("A", 0, "gqa", a), ReportEntry("B", 0, "gqa", b)], tmp_path)
    with pytest.raises(ValueError, match=r"dev_scores\.json: score of example 'q1' must be a number"):
        compare(frame, "B", "A", "gqa")
    (tmp_path / "runs" / b / "predictions" / "dev_scores.json").unlink()
    gone = compare(frame, "B", "A", "gqa")
    assert gone.method == NONE and "dev_scores.json: not found" in gone.note and not gone.significant


def test_statistical_helpers():
    diff, p, lo, hi = paired_t_test([70.0, 71.0, 72.0], [69.0, 70.1, 71.05])
    assert diff == pytest.approx(0.95) and p < 0.05 and lo < diff < hi
    assert paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])[1] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_t_test([1.0, 2.0], [1.0])
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random(5000)  # continuous scores take the index-resampling path
    diff, p, lo, hi = paired_bootstrap(x, x + 0.05, n_resamples=200)
    assert diff == pytest.approx(-0.05) and p < 0.05 and lo == pytest.approx(-0.05)
    diff, p, lo, hi = paired_bootstrap(x, rng.permutation(x), n_resamples=200)
    assert p > 0.05 and lo < 0 < hi


# ------------------------------------------------------------------------------------------------
# plots and the whole report
# ------------------------------------------------------------------------------------------------
def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_plots_are_pngs(frame, table5, tmp_path):
    workdir, entries = table5
    bars = plot_task_bars(frame, SPEC, tmp_path)
    assert [p.name for p in bars] == ["bars_vqa.png", "bars_gqa.png", "bars_nlvr2.png"]
    curves = plot_training_curves(read_curves(entries, workdir), SPEC, tmp_path)
    assert [p.name for p in curves] == ["curves_pretrain.png", "curves_finetune.png"]
    for p in bars + curves:
        _png(p)


def test_write_report(report, table5):
    out = report.parent
    text = report.read_text()
    assert text.startswith("# Vision pretraining tasks (LXMERT Table 5)\n")
    assert "NOT THE PAPER'S NUMBERS" in text and "**synthetic** benchmark" in text
    assert "`demo` profile" in text and SYNTHETIC_FP in text
    assert "- **Model:** `tiny` preset" in text
    assert "0.1.0+abcd1234" in text and "torch 2.13.0" in text
    # the pretraining diagnostics: their own table, with what its columns mean under it
    table, note = text.split("### Pretraining: matching accuracy and image reading")[1].split("\n\n")[1:3]
    assert "| Feat + Label" in table and "**81.250** (n=1)" in table
    assert note.startswith("*matching accuracy*: image-sentence matching") and "chance 50 %" in note
    # how the stages ran (issue 13's switches), read from their config.json
    assert "- **Execution** (changes numbers within rounding only; not in stage ids): " \
           "torch.compile auto, TF32 allowed (CUDA)" in text
    # 30 fine-tuning runs done x 0.1 + 4 pretraining stages x 4.0
    done = sum(1 for runs in CELLS.values() for _s, st, _a in runs if st == "done")
    assert f"{done * 0.1 + 16:.2f} GPU-hours" in text
    assert "cuda × 1 GPU, bf16" in text and "cuda × 4 GPU, bf16 (4 stages)" in text
    tables = parse_tables(text)
    main = next(t for t in tables if t[0][1] == "VQA ↑")
    assert len(main) == 1 + len(SPEC.variants)
    switches = next(t for t in tables if t[0][0] == "Switch")
    assert cell(switches, "RoI-feature regression loss", "follows") == "official code"
    assert cell(switches, "image-QA loss from (fraction of epochs)", "follows") == "paper"
    sig = next(t for t in tables if t[0][0] == "Variant" and "p" in t[0])
    assert len(sig) == 1 + 3 * len(SPEC.tasks)
    not_done = next(t for t in tables if t[0][-1] == "Error")
    states = sorted(r[3] for r in not_done[1:])
    assert states == ["failed", "running", "to run", "to run", "to run"]
    # plots embedded by relative link, all present; no temporary directory left behind
    links = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    # bars per task, curves per kind, a stage-curves figure per kind / task (report_plots tests)
    assert len(links) == 3 + 2 + 1 + 3 and all((out / name).is_file() for name in links)
    _png(out / "bars_vqa.png")
    assert not [p for p in out.iterdir() if p.name.startswith(".report-tmp-")]
    results = (out / "results.jsonl").read_text().splitlines()
    assert len(results) == len(collect(table5[1], table5[0]))


def test_paper_scale_report_has_no_warning(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    entries = build_table5(workdir, fingerprint="9f3c2a1b7d4e")
    frame = collect(entries, workdir)
    configs = read_configs(entries, workdir)
    spec = ReportSpec(**{**SPEC.__dict__, "profile": "default"})
    text = render_markdown(spec, frame, configs, {}, [])
    assert "NOT THE PAPER" not in text and "synthetic" not in text.lower()
    assert "- **Profile:** `default` (the paper's setup)" in text
    assert "real data; fingerprint `9f3c2a1b7d4e`" in text


def test_switches_table_names_mixed_choices(table5):
    workdir, entries = table5
    configs = read_configs(entries, workdir)
    configs["Label"]["pretrain"]["pretrain"]["feat_loss"] = "l2"
    [table] = parse_tables(switches_table(configs))
    assert cell(table, "RoI-feature regression loss", "follows") == "mixed"
    assert "l2 (Label)" in cell(table, "RoI-feature regression loss", "these runs")
    assert cell(table, "NLVR² head loss", "follows") == "official code"


def write_plan_results(plan, workdir: Path, accuracy) -> None:
    """config.json (the planner's own) and a result.json for every stage of ``plan``."""
    for stage in plan.stages.values():
        run = workdir / "runs" / stage.stage_id
        run.mkdir(parents=True)
        (run / "config.json").write_text(stage.config.to_json())
        result = {"stage_id": stage.stage_id, "kind": stage.kind, "seed": stage.config.seed,
                  "device": "cpu", "num_gpus": 0, "gpu_hours": 0.0, "precision": "fp32",
                  "timings": {"total_s": 36.0}, "code_version": stage.config.code_version,
                  "data_fingerprint": stage.config.data.fingerprint}
        if stage.kind == "finetune":
            _spec, variant, seed, task = stage.users[0]
            result.update(task=task, metrics={"accuracy": accuracy(variant, seed, task)})
        else:
            result["metrics"] = {"loss": 5.0, "mlm": 2.0}
        (run / "result.json").write_text(json.dumps(result))


def test_table4_from_the_real_plan_with_shared_nlvr2_stages(tmp_path):
    """The planner's entries and configs (demo profile): NLVR² 'DA' and 'FT' rows share one
    fine-tuning stage per seed; the report shows the same numbers for both, tests them as equal,
    counts the shared stage's compute once, and the paper's '–' as '—'."""
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "ablations" / "qa_pretraining.yaml", profile="demo")
    plan = make_plan(spec, tmp_path)
    report_spec = harness_report_spec(spec)
    assert report_spec.profile == "demo" and report_spec.reference == "table4"
    base = {"vqa": 60.0, "gqa": 50.0, "nlvr2": 70.0}
    bump = {"P20 + DA": -2.0, "P20 + FT": -1.0, "P10+QA10 + DA": -0.5, "P10+QA10 + FT": 0.0}

    def accuracy(variant: str, seed: int, task: str) -> float:
        if task == "nlvr2":  # a shared DA/FT stage: its number is the FT row's
            variant = variant.replace("+ DA", "+ FT")
        return base[task] + bump[variant] + seed * 0.1

    write_plan_results(plan, tmp_path, accuracy)
    entries = report_entries(spec, plan, stage_statuses(plan, tmp_path))
    assert {e.state for e in entries} == {"done"}
    frame = collect(entries, tmp_path)
    comps = compare_to_reference(frame, report_spec)
    text = render_markdown(report_spec, frame, read_configs(entries, tmp_path), comps, [])
    main = next(t for t in parse_tables(text) if t[0][1] == "VQA ↑")
    assert [r[0] for r in main[1:]] == ["P20 + DA", "P20 + FT", "P10+QA10 + DA", "P10+QA10 + FT (ref.)"]
    nlvr = [cell(main, r, "NLVR² ↑") for r in ("P20 + DA", "P20 + FT")]
    assert nlvr[0] == nlvr[1] == "69.10 ± 0.10† (n=3)"  # the FT stage serves both rows
    assert cell(main, "P20 + DA", "NLVR² paper") == "—" and cell(main, "P20 + FT", "NLVR² paper") == "72.4"
    assert cell(main, "P20 + DA", "VQA ↑") == "58.10 ± 0.10† (n=3)"
    same = comps[("P10+QA10 + DA", "nlvr2")]
    assert same.method == T_TEST and same.p_value == 1.0 and not same.significant
    n_stages = len(plan.stages)
    assert f"over {n_stages} finished stages" in text
    assert "NOT THE PAPER'S NUMBERS" in text and "**synthetic** benchmark" in text
    # the demo profile's model: the tiny preset with what the profile changes, named
    assert ("- **Model:** `tiny` preset with `num_attr_labels=16`, `num_object_labels=32`, "
            "`num_objects=12`, `visual_feat_dim=64`") in text


def test_table3_from_the_real_plan_with_bert_stage_and_rows_without_pretraining(tmp_path):
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "ablations" / "bert_init.yaml", profile="test")
    plan = make_plan(spec, tmp_path)
    report_spec = harness_report_spec(spec)
    write_plan_results(plan, tmp_path, lambda v, s, t: 50.0 + len(v) / 10)
    entries = report_entries(spec, plan, stage_statuses(plan, tmp_path))
    assert any(e.bert_stage for e in entries) and any(e.pretrain_stage is None for e in entries)
    frame = collect(entries, tmp_path)
    assert set(frame["kind"]) == {"finetune", "pretrain", "bert"}
    text = render_markdown(report_spec, frame, read_configs(entries, tmp_path), {}, [])
    tables = parse_tables(text)
    main = next(t for t in tables if t[0][1] == "VQA ↑")
    assert len(main) == 1 + 7 and cell(main, "Train + scratch", "GQA paper") == "50.0"
    assert cell(main, "BERT + 3 CrossAtt", "VQA paper") == "66.4"
    pre = next(t for t in tables if t[0][:2] == ["Variant", "total ↓"])
    assert cell(pre, "Train + BERT", "total ↓") == "no pretraining"
    assert cell(pre, "Pre-train + BERT", "total ↓") == "5.000 (n=1)"
    switches = next(t for t in tables if t[0][0] == "Switch")
    assert cell(switches, "BERT layers used for initialisation", "follows") == "official code"
    assert "`test` preset with `r_layers=0`" in text  # BERT + 1 CrossAtt's model (L/R/X 2/0/1)
    assert "text-only BERT 1/1 done" in text
    assert f"over {len(plan.stages)} finished stages" in text


def test_report_before_anything_finished(tmp_path):
    """Only planned runs (config.json, nothing else): the report already says synthetic and
    pending; with no runs at all it says so instead of inventing anything."""
    stage = write_finetune(tmp_path, "Feat", "vqa", 0, "to run")
    spec = ReportSpec("s", "S", ["Feat", "Label"], ["vqa"], "table5", "Feat", "demo")
    entries = [ReportEntry("Feat", 0, "vqa", stage)]
    frame = collect(entries, tmp_path)
    text = render_markdown(spec, frame, read_configs(entries, tmp_path),
                           compare_to_reference(frame, spec), [])
    assert "NOT THE PAPER'S NUMBERS" in text and f"fingerprint `{SYNTHETIC_FP}`" in text
    [main] = [t for t in parse_tables(text) if t[0][1] == "VQA ↑"]
    assert cell(main, "Feat (ref.)", "VQA ↑") == "to run (0/1 done)"
    assert cell(main, "Label", "VQA ↑") == "— (no runs)" and cell(main, "Label", "VQA paper") == "69.5"
    out = write_report(ReportSpec("e", "E", ["A"], ["gqa"]), [], tmp_path, tmp_path / "empty")
    empty = out.read_text()
    assert "- **Data:** unknown" in empty and "- **Runs:** none" in empty
    assert (tmp_path / "empty" / "results.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------------------
# names from specs, configs and runs are text, never Markdown, HTML or a path (issue 16)
# ------------------------------------------------------------------------------------------------
ODD = {
    "html": "<img src=x onerror=alert(1)>",
    "newline": "evil\n# Injected heading\n<script>alert(1)</script>",
    "link": "[x](http://evil)",
    "marks": "*b* _i_ `c` ~~s~~ $\\x$ a|b \\| &amp; #h <http://evil>",
}


def _inline_text(token) -> str:
    """What a reader sees of an inline token: its text, code and softbreaks, no markup."""
    return "".join(c.content if c.type in ("text", "code_inline") else " " if "break" in c.type
                   else "" for c in token.children or [])


def test_odd_variant_names_render_as_text(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    names = list(ODD.values())
    entries = []
    for i, name in enumerate(names):
        pre = write_pretrain(workdir, name)
        for seed in (0, 1, 2):
            stage = write_finetune(workdir, name, "vqa", seed, "done", 60.0 + i + seed / 4, pre,
                                   shift=seed)
            entries.append(ReportEntry(name, seed, "vqa", stage, pre, "done"))
    failed = write_finetune(workdir, ODD["html"], "gqa", 0, "failed", pretrain=None)
    (workdir / "runs" / failed / "error.json").write_text(json.dumps(
        {"error": "<b>boom</b> [y](http://evil)", "type": "ValueError"}))
    entries.append(ReportEntry(ODD["html"], 0, "gqa", failed, None, "failed"))
    spec = ReportSpec(name="odd", title="Odd <i>names</i> [t](http://evil)\n# Title injection",
                      variants=names, tasks=["vqa", "gqa"], reference=None,
                      reference_variant=ODD["link"], profile="demo",
                      notes={"<b>note</b>": "[n](http://evil)"})
    out = write_report(spec, entries, workdir, tmp_path / "out", n_resamples=200)
    text = out.read_text()

    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    flat = [t for tok in tokens for t in [tok, *(tok.children or [])]]
    assert not [t for t in flat if t.type in ("html_inline", "html_block")]
    hrefs = [t.attrs.get("href") for t in flat if t.type == "link_open"]
    assert set(hrefs) <= {"results.jsonl"}
    srcs = [t.attrs.get("src") for t in flat if t.type == "image"]
    assert srcs and all(s.startswith(("bars_", "curves_", "stages_")) and s.endswith(".png")
                        for s in srcs)
    assert not any(t.type == "heading_open" and t.tag == "h1" for t in tokens[3:])  # one title
    headings = [_inline_text(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0] == "Odd <i>names</i> [t](http://evil) # Title injection"
    assert f"Significance vs. {ODD['link']}" in headings
    # every name is in the main table as the reader would see it (newlines as spaces)
    main = next(t for t in parse_tables(text) if t[0][1] == "VQA ↑")
    cells = [tok for tok in tokens if tok.type == "inline"]
    shown = {_inline_text(tok) for tok in cells}
    for name in names:
        assert " ".join(name.split("\n")) in shown or f"{' '.join(name.split(chr(10)))} (ref.)" in shown
    assert len(main) == 1 + len(names)
    assert "ValueError: <b>boom</b> [y](http://evil)" in shown
    # the plots hold the names too and were written (a '$\x$' once crashed matplotlib's mathtext)
    assert sorted(p.name for p in out.parent.glob("*.png")) == [
        "bars_vqa.png", "curves_finetune.png", "curves_pretrain.png", "stages_finetune_gqa.png",
        "stages_finetune_vqa.png", "stages_pretrain.png"]


def test_report_files_get_the_umask_permissions(table5, tmp_path):
    import os
    import stat

    workdir, entries = table5
    old = os.umask(0o077)
    try:
        out = write_report(SPEC, entries[:3], workdir, tmp_path / "private", n_resamples=100)
    finally:
        os.umask(old)
    for p in out.parent.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p  # never widened to 0644
