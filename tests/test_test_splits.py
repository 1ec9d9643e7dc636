"""Test splits and leaderboard files (issue 12, the paper's Table 2), and `export --hf` of real runs.

After fine-tuning, every test split whose files are under the data root is predicted from the best
epoch's weights and written in its leaderboard's format; `lxmert-bench predict SPEC` writes them
again for finished stages without training. The synthetic benchmark has these splits, written
without changing any file it wrote before.
"""

from __future__ import annotations

import csv
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from lxmert_bench.cli import main
from lxmert_bench.data import synthetic
from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.layout import TEST_SPLITS
from lxmert_bench.model.hf import MARKER
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import RunDir

NEW_FILES = {"vqa/test.json", "gqa/submit.json", "nlvr2/test2.json",
             "mscoco_imgfeat/test2015_obj36.tsv", "nlvr2_imgfeat/test2_obj36.tsv"}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != synthetic.MARKER}


def test_synthetic_test_splits_are_new_files_only(tmp_path, monkeypatch):
    """Every file the benchmark wrote before the test splits existed is byte for byte the same
    (so the `test` profile's results and the data fingerprints cannot move)."""
    with_tests = synthetic.generate_synthetic(tmp_path / "a", 120, 0, progress=False)
    monkeypatch.setattr(synthetic, "write_test_splits", lambda *a, **k: {})  # the writer off
    without = synthetic.generate_synthetic(tmp_path / "b", 120, 0, progress=False)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert set(a) - set(b) == NEW_FILES
    assert {k: a[k] for k in b} == b
    assert {k: v for k, v in with_tests.items() if not k.startswith("test_") and k != "seconds"} \
        == {k: v for k, v in without.items() if k != "seconds"}
    root = tmp_path / "a"
    vqa = json.loads((root / "vqa/test.json").read_text())
    images = {r["img_id"] for r in read_obj_tsv(root / "mscoco_imgfeat/test2015_obj36.tsv")}
    assert vqa and all(set(d) == {"img_id", "question_id", "sent"} and isinstance(d["question_id"], int)
                       and d["img_id"].startswith("COCO_test2015_") for d in vqa)
    assert {d["img_id"] for d in vqa} == images
    submit = json.loads((root / "gqa/submit.json").read_text())
    testdev = json.loads((root / "gqa/testdev.json").read_text())
    assert all("label" not in d and isinstance(d["question_id"], str) for d in submit)
    assert {d["question_id"] for d in testdev} < {d["question_id"] for d in submit}  # + more
    assert len({d["question_id"] for d in submit}) == len(submit)
    test2 = json.loads((root / "nlvr2/test2.json").read_text())
    pairs = {r["img_id"] for r in read_obj_tsv(root / "nlvr2_imgfeat/test2_obj36.tsv")}
    assert test2 and all("label" not in d and d["identifier"].startswith("test2-") for d in test2)
    assert {d["img0"] for d in test2} | {d["img1"] for d in test2} == pairs


SPEC = """\
name: tsplits
variants:
  Only: {}
tasks: [vqa, gqa, nlvr2]
seeds: [0]
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tsplits")
    spec = tmp / "tsplits.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    wd = tmp / "wd"
    assert main(["run", str(spec), "--profile", "test", "--workdir", str(wd), "--quiet",
                 "--no-report"]) == 0
    plan = make_plan(load_spec(spec, "test"), wd)
    runs = {st.config.finetune.task if st.kind == "finetune" else st.kind: RunDir(wd, sid)
            for sid, st in plan.stages.items()}
    return spec, wd, runs


def _read(path: Path):
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.reader(f))
    return json.loads(path.read_text())


@pytest.mark.slow  # the module's run: ~60 s for a pretraining and three fine-tunings
def test_fine_tuning_writes_every_test_split_in_its_leaderboard_format(finished):
    _, _, runs = finished
    root = Path(runs["vqa"].read_config().data.root)
    for task, splits in TEST_SPLITS.items():
        run = runs[task]
        result = run.read_result()
        manifest = json.loads((run.predictions_dir / "test_predictions.json").read_text())
        assert result["test_predictions"]["splits"] == manifest["splits"]
        assert manifest["absent"] == {} and set(manifest["splits"]) == set(splits)
        for split, (name, _) in splits.items():
            entry = manifest["splits"][split]
            rows = _read(run.path / entry["file"])
            assert entry["file"] == f"predictions/{name}"
            records = json.loads((root / task / f"{split}.json").read_text())
            assert entry["examples"] == entry["records"] == len(records) == len(rows)
            if task == "vqa":  # [{"question_id": int, "answer": str}]
                assert all(set(r) == {"question_id", "answer"} and isinstance(r["question_id"], int)
                           and isinstance(r["answer"], str) for r in rows)
                assert {r["question_id"] for r in rows} == {d["question_id"] for d in records}
            elif task == "gqa":  # [{"questionId": str, "prediction": str}]
                assert all(set(r) == {"questionId", "prediction"} for r in rows)
                assert {r["questionId"] for r in rows} == {d["question_id"] for d in records}
            else:  # identifier,True|False (official metrics.py)
                assert {r[1] for r in rows} <= {"True", "False"} and all(len(r) == 2 for r in rows)
                assert {r[0] for r in rows} == {d["identifier"] for d in records}
            labelled = all("label" in d for d in records)  # GQA testdev, NLVR2 Test-P
            assert ("metrics" in entry) == labelled, (task, split)
    # GQA testdev is also the dev split: the same weights give the same predictions and accuracy
    gqa = runs["gqa"]
    entry = gqa.read_result()["test_predictions"]["splits"]["testdev"]
    dev = {r["questionId"]: r["prediction"] for r in _read(gqa.path / "predictions/dev_predict.json")}
    assert {r["questionId"]: r["prediction"] for r in _read(gqa.path / entry["file"])} == dev
    assert entry["metrics"]["accuracy"] == pytest.approx(gqa.read_result()["metrics"]["accuracy"])


@pytest.mark.slow
def test_predict_rewrites_them_from_best_pt_without_training(finished, capsys):
    spec, wd, runs = finished
    run = runs["nlvr2"]
    before = {p.name: p.read_bytes() for p in run.predictions_dir.iterdir()}
    result = run.result_path.read_bytes()
    log = run.log_path.read_bytes()
    for name in ("test_predict.csv", "test2_predict.csv", "test_predictions.json"):
        (run.predictions_dir / name).unlink()
    capsys.readouterr()
    assert main(["predict", str(spec), "--workdir", str(wd), "--only", "task=nlvr2"]) == 0
    out = capsys.readouterr().out
    assert "test2: " in out and "NLVR2 Test-U" in out and str(run.predictions_dir) in out
    after = {p.name: p.read_bytes() for p in run.predictions_dir.iterdir()}
    manifest = json.loads(after.pop("test_predictions.json"))
    before.pop("test_predictions.json")
    assert after == before  # the same files, byte for byte: the same weights
    assert manifest["splits"]["test"]["metrics"]["accuracy"] >= 0
    assert run.result_path.read_bytes() == result and run.log_path.read_bytes() == log  # no training


@pytest.mark.slow
def test_a_test_split_without_its_files_is_named_absent_not_an_error(finished, capsys):
    spec, wd, runs = finished
    root = Path(runs["nlvr2"].read_config().data.root)
    moved = root / "nlvr2" / "test2.json.away"
    (root / "nlvr2" / "test2.json").rename(moved)
    try:
        assert main(["predict", str(spec), "--workdir", str(wd), "--only", "task=nlvr2"]) == 0
    finally:
        moved.rename(root / "nlvr2" / "test2.json")
    out = capsys.readouterr().out
    assert f"test2: absent (NLVR2 Test-U (official metrics.py): missing {root / 'nlvr2' / 'test2.json'})" in out
    manifest = json.loads((runs["nlvr2"].predictions_dir / "test_predictions.json").read_text())
    assert set(manifest["splits"]) == {"test"} and set(manifest["absent"]) == {"test2"}
    # a malformed optional file is named too, and fails nothing
    path = root / "nlvr2" / "test2.json"
    good = path.read_bytes()
    path.write_bytes(b'[{"identifier": ')
    try:
        assert main(["predict", str(spec), "--workdir", str(wd), "--only", "task=nlvr2"]) == 0
    finally:
        path.write_bytes(good)
    out = capsys.readouterr().out
    assert f"test2: absent (NLVR2 Test-U (official metrics.py): not predicted ({path}:1:" in out


@pytest.mark.slow
def test_predict_names_unfinished_stages_and_exits_1(finished, capsys):
    spec, wd, _ = finished
    rc = main(["predict", str(spec), "--workdir", str(wd), "--only", "task=vqa",
               "--set", "finetune.optim.max_steps=2"])  # another stage, never run
    assert rc == 1 and "not finished" in capsys.readouterr().out
    assert main(["predict", str(spec), "--workdir", str(wd), "--only", "kind=pretrain"]) == 2
    assert "no fine-tuning stage" in capsys.readouterr().err


def _batch(run: RunDir, n: int = 4) -> dict:
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.finetune import _task_class

    config = run.read_config()
    data = _task_class(config.finetune.task)(config.data.root, [config.finetune.valid_split],
                                             load_tokenizer(config.data))
    from lxmert_bench.data.tasks import collate

    return collate([data[i] for i in range(n)]), data


@pytest.mark.slow
def test_export_of_a_vqa_run_loads_in_transformers_with_our_answers(finished, tmp_path):
    from lxmert_bench.export import trained_model

    _, wd, runs = finished
    out = tmp_path / "vqa-hf"
    assert main(["export", str(runs["vqa"].path), "--hf", str(out)]) == 0
    hf = transformers.LxmertForQuestionAnswering.from_pretrained(out).eval()
    ours, weights, label2ans = trained_model(runs["vqa"])
    assert weights.name == "best.pt" and hf.config.id2label[0] == label2ans[0]
    batch, data = _batch(runs["vqa"])
    assert [hf.config.id2label[i] for i in range(len(data.label2ans))] == data.label2ans
    with torch.no_grad():
        logits = ours(batch["input_ids"], batch["attention_mask"], batch["feats"], batch["boxes"])
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 visual_feats=batch["feats"], visual_pos=batch["boxes"]).question_answering_score
    assert (logits - ref).abs().max() <= 1e-5
    # by stage id under the workdir, into the same (own) directory again
    assert main(["export", runs["pretrain"].stage_id, "--workdir", str(wd), "--hf", str(out)]) == 0
    hf_pre = transformers.LxmertForPreTraining.from_pretrained(out)
    assert json.loads((out / MARKER).read_text())["architecture"] == "LxmertForPreTraining"
    assert hf_pre.config.task_qa and hasattr(hf_pre, "answer_head")


@pytest.mark.slow
def test_export_refuses_foreign_directories_and_unknown_runs(finished, tmp_path, capsys):
    _, wd, runs = finished
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"theirs")
    assert main(["export", str(runs["gqa"].path), "--hf", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert "weights.bin" in err and "refusing" in err and "Traceback" not in err
    assert sorted(p.name for p in theirs.iterdir()) == ["weights.bin"]
    assert main(["export", str(tmp_path / "nowhere"), "--hf", str(tmp_path / "x")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "nlvr2-hf"  # no HF class: LxmertModel + our head
    assert main(["export", str(runs["nlvr2"].path), "--hf", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "nlvr2_head.safetensors", MARKER])
    assert "LxmertModel" in capsys.readouterr().out


@pytest.mark.slow
def test_the_report_lists_the_leaderboard_files(finished, tmp_path):
    spec, wd, runs = finished
    assert main(["predict", str(spec), "--workdir", str(wd)]) == 0  # all splits present again
    assert main(["report", str(spec), "--workdir", str(wd), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    section = text.split("## Test-split predictions (leaderboard files)", 1)[1].split("\n## ", 1)[0]
    for task, splits in TEST_SPLITS.items():
        for name, _ in splits.values():
            assert str(runs[task].path / "predictions" / name) in section, name
    assert "NLVR2 Test-U" in section and "absent" not in section
    assert "accuracy" in section  # GQA testdev and NLVR2 Test-P have released answers


@pytest.mark.slow
def test_export_without_the_answer_table_says_so(finished, tmp_path, capsys):
    _, _, runs = finished
    root = Path(runs["gqa"].read_config().data.root)
    table = root / "gqa" / "trainval_label2ans.json"
    table.rename(table.with_suffix(".away"))
    try:
        assert main(["export", str(runs["gqa"].path), "--hf", str(tmp_path / "gqa")]) == 0
    finally:
        table.with_suffix(".away").rename(table)
    assert "default labels" in capsys.readouterr().err
    config = json.loads((tmp_path / "gqa" / "config.json").read_text())
    assert "id2label" not in config and config["architectures"] == ["LxmertForQuestionAnswering"]
