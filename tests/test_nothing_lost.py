"""Nothing lost, nothing run twice (issue 10): the tool never writes over what it did not create,
remembered options are said and kept, bad input exits 2 with a message, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from lxmert_bench.cli import main
from lxmert_bench.data.synthetic import DataRootError, ensure_synthetic_root
from lxmert_bench.owner import HOST, remove_dead_temporaries
from lxmert_bench.plan import make_plan
from lxmert_bench.spec import load_spec
from lxmert_bench.store import FAILED, RunDir

ONE_STAGE = """\
name: tiny_one
variants:
  Only: {pretrain.enabled: false}
tasks: [nlvr2]
seeds: [0]
"""


def _spec(tmp_path: Path, text: str = ONE_STAGE, name: str = "tiny_one.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "D"
    (d / "vqa").mkdir(parents=True)
    (d / "vqa" / "train.json").write_text('["my annotations"]')
    (d / "notes.txt").write_text("mine")
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- never delete or overwrite what the tool did not create ------------------------------------
def test_run_with_a_user_data_root_keeps_their_files_and_exits_2(tmp_path, capsys):
    """The repro: a remembered `--profile test` run, then `run --set data.root=D` on the user's
    directory used to delete D and fill it with the synthetic benchmark, exit 0."""
    spec, wd, d = _spec(tmp_path), tmp_path / "wd", _user_dir(tmp_path)
    (wd / "specs").mkdir(parents=True)
    (wd / "specs" / "tiny_one.json").write_text(json.dumps(
        {"spec": str(spec.resolve()), "profile": "test", "overrides": []}))
    before = _snapshot(d)
    code = main(["run", str(spec), "--workdir", str(wd), "--set", f"data.root={d}", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(d) in err and "not empty" in err and "Traceback" not in err
    assert _snapshot(d) == before
    assert not (wd / "runs").exists()


def test_ensure_synthetic_root_refuses_a_directory_of_someone_elses(tmp_path):
    d = _user_dir(tmp_path)
    before = _snapshot(d)
    with pytest.raises(DataRootError, match="not empty"):
        ensure_synthetic_root(d, 120, 0, progress=False)
    assert _snapshot(d) == before


def test_data_synthetic_refuses_to_overwrite_and_reuses_its_own(tmp_path, capsys):
    d = _user_dir(tmp_path)
    before = _snapshot(d)
    assert main(["data", "synthetic", "--out", str(d), "--images", "120"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _snapshot(d) == before
    own = tmp_path / "own"
    assert main(["data", "synthetic", "--out", str(own), "--images", "120"]) == 0
    mtimes = {p: p.stat().st_mtime_ns for p in own.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["data", "synthetic", "--out", str(own), "--images", "120"]) == 0
    assert "nothing written" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in own.rglob("*") if p.is_file()} == mtimes
    # the same directory asked for with other inputs is another benchmark: refused
    assert main(["data", "synthetic", "--out", str(own), "--images", "130"]) == 2


def test_temporaries_of_dead_owners_go_live_and_foreign_ones_stay(tmp_path):
    target = tmp_path / "bench"
    dead_pid = _dead_pid()
    dead = tmp_path / f".bench.tmp-{HOST}-{dead_pid}"
    live = tmp_path / f".bench.tmp-{HOST}-{os.getpid()}"
    foreign = tmp_path / f".bench.tmp-other-host.example-{dead_pid}"
    unrelated = tmp_path / ".bench.tmp"  # not our naming: never touched
    for p in (dead, live, foreign, unrelated):
        p.mkdir()
        (p / "f").write_text("x")
    assert remove_dead_temporaries(target) == [dead]
    assert not dead.exists() and live.exists() and foreign.exists() and unrelated.exists()


def test_killed_generation_leaves_nothing_after_the_next_run(tmp_path):
    """kill -9 during generation left an ~88 MB .tmp-PID directory that nothing cleaned."""
    root = tmp_path / "synthetic"
    code = ("import sys; from lxmert_bench.data import synthetic as s\n"
            "def boom(*a, **k):\n"
            "    import os, signal\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "s.write_obj_tsv = boom\n"
            f"s.ensure_synthetic_root({str(root)!r}, 120, 0, progress=False)\n")
    proc = subprocess.run(["python3", "-c", code], capture_output=True)
    assert proc.returncode == -9
    left = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert left, "the killed generation should have left its temporary"
    assert ensure_synthetic_root(root, 120, 0, progress=False) is True
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (root / "synthetic.json").is_file()


def test_full_disk_is_the_message_and_nothing_is_half_written(tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:  # pragma: no cover - CI and developer machines run as root
        pytest.fail(f"cannot mount a small tmpfs for the ENOSPC test: {mounted.stderr!r}")
    try:
        code = main(["data", "synthetic", "--out", str(mnt / "bench"), "--images", "120"])
        err = capsys.readouterr().err
        assert code == 1 and "No space left on device" in err and "Traceback" not in err
        assert list(mnt.iterdir()) in ([], [mnt / ".bench.lock"])  # no partial benchmark
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_two_specs_with_one_name_do_not_overwrite_each_others_report(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _spec(tmp_path / "a")
    b = _spec(tmp_path / "b", ONE_STAGE.replace("tasks: [nlvr2]", "tasks: [vqa]"))
    wd = str(tmp_path / "wd")
    assert main(["report", str(a), "--profile", "test", "--workdir", wd]) == 0
    report = tmp_path / "results" / "tiny_one" / "report.md"
    first = report.read_bytes()
    capsys.readouterr()
    assert main(["report", str(b), "--profile", "test", "--workdir", wd]) == 2
    err = capsys.readouterr().err
    assert "same name" in err and "--out" in err
    assert report.read_bytes() == first
    assert main(["report", str(a), "--profile", "test", "--workdir", wd]) == 0  # its own: fine
    # a folder of the user's own files is never written into
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "draft.tex").write_text("x")
    assert main(["report", str(a), "--profile", "test", "--workdir", wd, "--out", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["draft.tex"]


def test_a_killed_report_writer_leaves_nothing_that_blocks_the_next_report(tmp_path, capsys,
                                                                          monkeypatch):
    """The report is built in a temporary named after its writer (host, pid) inside the report
    folder; one a killed writer left is removed by the next report, not taken for a user's file."""
    monkeypatch.chdir(tmp_path)
    spec, wd = _spec(tmp_path), str(tmp_path / "wd")
    assert main(["report", str(spec), "--profile", "test", "--workdir", wd]) == 0
    out = tmp_path / "results" / "tiny_one"
    left = out / f".report.md.tmp-{HOST}-{_dead_pid()}"
    left.mkdir()
    (left / "results.jsonl").write_text("half")
    capsys.readouterr()
    assert main(["report", str(spec), "--profile", "test", "--workdir", wd]) == 0, \
        capsys.readouterr().err
    assert not left.exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert oct((out / "report.md").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the same command runs the same experiment --------------------------------------------------
def test_remembered_set_is_kept_and_said(tmp_path, capsys, monkeypatch):
    """run --set X SPEC; run SPEC (reuses X, said); run SPEC again: still nothing new to run."""
    monkeypatch.chdir(tmp_path)
    spec, wd = _spec(tmp_path), str(tmp_path / "wd")
    base = ["--workdir", wd, "--quiet", "--no-report"]
    slurm_profile = str(Path(__file__).parents[1] / "slurm" / "profiles" / "local.yaml")
    assert main(["run", str(spec), "--profile", "test", "--set", "finetune.optim.lr=0.001",
                 "--slurm-profile", slurm_profile, *base]) == 0
    assert "1 stage(s) submitted" in capsys.readouterr().out
    for extra in ([], ["--retry-failed"]):  # --retry-failed used to fall back to the default
        assert main(["run", str(spec), *base, *extra]) == 0
        out, err = capsys.readouterr()
        assert "0 stage(s) submitted, 1 already done" in out
        assert "--profile test" in err and "--set finetune.optim.lr=0.001" in err
        assert f"--slurm-profile {slurm_profile}" in err and "--fresh" in err
    mem = json.loads((tmp_path / "wd" / "specs" / "tiny_one.json").read_text())
    assert mem["overrides"] == ["finetune.optim.lr=0.001"] and mem["profile"] == "test"
    # --fresh forgets them: the paper profile, whose data root is not here
    assert main(["plan", str(spec), "--workdir", wd, "--fresh", "--json"]) == 2
    assert "--profile" not in capsys.readouterr().err.split("workdir")[0]


def test_seeds_precedence_profile_then_spec_then_max_seeds(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\nseeds: [7, 8]\noverrides: {model.preset: test}\n")
    no_seeds = _spec(tmp_path, ONE_STAGE.replace("seeds: [0]\n", ""), "n.yaml")
    three = _spec(tmp_path, ONE_STAGE.replace("seeds: [0]", "seeds: [3, 4, 5]"), "t.yaml")
    assert load_spec(no_seeds, str(prof)).seeds == (7, 8)  # a spec without seeds: the profile's
    assert load_spec(three, str(prof)).seeds == (3, 4, 5)  # the spec's seeds win
    assert load_spec(no_seeds).seeds == (0,)
    one = load_spec(three, "test")  # the test profile: max_seeds 1, the first of the spec's
    assert one.seeds == (3,) and "max_seeds 1" in one.seeds_note
    assert load_spec(_spec(tmp_path, ONE_STAGE.replace("seeds: [0]", "seeds: [1]"), "o.yaml"),
                     "test").seeds == (1,)  # was (0,): the profile's seeds overrode the spec's


def test_override_layers_in_documented_order(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\noverrides: {finetune.optim.lr: 1.0, finetune.optim.epochs: 1,"
                    " finetune.optim.batch_size: 1, finetune.optim.warmup: 0.5}\n")
    spec = _spec(tmp_path, """\
        name: layers
        base: {finetune.optim.epochs: 2, finetune.optim.batch_size: 2, finetune.optim.warmup: 0.2}
        variants:
          V: {finetune.optim.batch_size: 3, finetune.optim.warmup: 0.3}
        tasks: [nlvr2]
        """, "layers.yaml")
    s = load_spec(spec, str(prof), ["finetune.optim.warmup=0.4"]).settings(
        load_spec(spec, str(prof)).variants[0])
    assert (s["finetune.optim.lr"], s["finetune.optim.epochs"], s["finetune.optim.batch_size"],
            s["finetune.optim.warmup"]) == (1.0, 2, 3, 0.4)


def test_every_command_says_where_the_workdir_is(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path)
    assert main(["status", str(spec), "--profile", "test", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # --json stays machine-readable: the note is on stderr
    assert f"workdir {tmp_path / 'runs'}" in err and "does not exist" in err


# --- bad input: exit 2 with a message, never a traceback ----------------------------------------
def _bad(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_bad_specs_and_workdirs_exit_2(tmp_path, capsys):
    wd = ["--workdir", str(tmp_path / "wd")]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(ONE_STAGE.replace("Only", "Caf\xe9").encode("latin-1"))
    _bad(capsys, ["plan", str(latin), "--profile", "test", *wd], "latin.yaml:3", "UTF-8")
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, "
              f"*a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nname: bomb\nvariants: {V: {}}\n")
    _bad(capsys, ["plan", str(bomb), "--profile", "test", *wd], "bomb.yaml", "aliases")
    neg = _spec(tmp_path, ONE_STAGE.replace("seeds: [0]", "seeds: [-1]"), "neg.yaml")
    _bad(capsys, ["plan", str(neg), "--profile", "test", *wd], "neg.yaml:5", "seeds", "-1")
    spec = _spec(tmp_path)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    _bad(capsys, ["status", str(spec), "--profile", "test", "--workdir", str(a_file)],
         str(a_file), "is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)]).returncode == 0
    try:
        _bad(capsys, ["run", str(spec), "--profile", "test", "--workdir", str(ro / "wd")],
             str(ro), "not writable")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_nan_features_are_refused_by_convert(tmp_path, capsys):
    import numpy as np

    from lxmert_bench.data.features import write_obj_tsv

    feats = np.ones((36, 8), dtype=np.float32)
    feats[3, 2] = np.nan
    row = {"img_id": "img1", "img_h": 100, "img_w": 100, "objects_id": np.zeros(36, np.int64),
           "objects_conf": np.ones(36, np.float32), "attrs_id": np.zeros(36, np.int64),
           "attrs_conf": np.ones(36, np.float32), "num_boxes": 36,
           "boxes": np.tile(np.array([1, 1, 50, 50], np.float32), (36, 1)), "features": feats}
    tsv = tmp_path / "x_obj36.tsv"
    write_obj_tsv(tsv, [row])
    _bad(capsys, ["data", "convert", str(tsv), "--out", str(tmp_path / "store")], "img1", "NaN",
         "box 3")


def test_corrupt_data_json_is_found_before_any_stage_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path)
    wd = tmp_path / "wd"
    plan = make_plan(load_spec(spec, "test"), wd)
    root = Path(next(iter(plan.stages.values())).config.data.root)
    ensure_synthetic_root(root, 120, 0, progress=False)
    (root / "nlvr2" / "valid.json").write_text('[{"a": 1},\n {oops')
    _bad(capsys, ["run", str(spec), "--profile", "test", "--workdir", str(wd), "--quiet"],
         "valid.json:2", "invalid JSON")
    assert not (wd / "runs").exists()


def test_a_garbage_result_is_failed_not_done_and_report_survives(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, wd, run = _one_stage_run_dir(tmp_path)
    run.write_config(make_plan(load_spec(spec, "test"), wd).stages[run.stage_id].config)
    for garbage in ("{}", "not json at all", '{"stage_id": "x", "metrics": {}}'):
        run.result_path.write_text(garbage)
        assert not run.is_done() and run.disk_state() == FAILED
        assert main(["status", str(spec), "--profile", "test", "--workdir", str(wd)]) == 1
        out = capsys.readouterr().out
        assert "failed" in out and "result.json" in out
        assert main(["report", str(spec), "--profile", "test", "--workdir", str(wd)]) == 0
        assert "Traceback" not in capsys.readouterr().err
    assert run.result_path.read_text() == garbage  # never removed: the user decides


def test_a_truncated_last_pt_names_the_file_and_the_way_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, wd, run = _one_stage_run_dir(tmp_path)
    run.checkpoint_dir.mkdir()
    (run.checkpoint_dir / "last.pt").write_bytes(b"PK\x03\x04 torn")
    assert main(["run", str(spec), "--profile", "test", "--workdir", str(wd), "--quiet",
                 "--no-report"]) == 1
    capsys.readouterr()
    assert main(["status", str(spec), "--workdir", str(wd)]) == 1
    out = capsys.readouterr().out
    assert "last.pt: cannot read checkpoint" in out and "move it away" in out


def _one_stage_run_dir(tmp_path: Path) -> tuple[Path, Path, RunDir]:
    """The one-stage spec, its workdir and its (created, empty) run directory."""
    spec, wd = _spec(tmp_path), tmp_path / "wd"
    (sid,) = make_plan(load_spec(spec, "test"), wd).stages
    run = RunDir(wd, sid)
    run.path.mkdir(parents=True)
    return spec, wd, run


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_runs_one_cell_and_shares_it_with_the_whole_spec(tmp_path, capsys, monkeypatch):
    """Trying one thing (issue 14): --only selects cells and what they need; ids never change."""
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, """\
        name: cells
        variants:
          P: {}
          A: {pretrain.enabled: false}
          B: {pretrain.enabled: false, finetune.optim.lr: 0.001}
        tasks: [nlvr2, vqa]
        seeds: [0]
        """, "cells.yaml")
    wd = ["--workdir", str(tmp_path / "wd")]
    assert main(["plan", str(spec), "--profile", "test", *wd, "--json"]) == 0
    full = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert main(["plan", str(spec), "--profile", "test", *wd, "--json", "--only", "variant=P",
                 "--only", "task=nlvr2"]) == 0
    part = json.loads(capsys.readouterr().out)["stages"]
    assert sorted(r["kind"] for r in part) == ["finetune", "pretrain"]  # with what it needs
    assert all(r["stage"] in full for r in part)  # the same stage ids as the whole spec's
    assert main(["run", str(spec), "--profile", "test", *wd, "--quiet", "--only", "variant=B",
                 "--only", "task=nlvr2"]) == 0
    out, err = capsys.readouterr()
    assert "1 stage(s) submitted" in out and "no report for a selection" in err
    assert not (tmp_path / "results").exists()
    assert main(["plan", str(spec), *wd, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts == {"done": 1, "to run": len(full) - 1}
    _bad(capsys, ["plan", str(spec), *wd, "--only", "variant=Nope"], "names no stage")
    _bad(capsys, ["plan", str(spec), *wd, "--only", "colour=red"], "KEY one of")
