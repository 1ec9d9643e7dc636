"""Resource profiles: first-class sbatch keys, typed GPU counts, the per-user profile folder, and
requests Slurm could never run refused by plan/run with exit 2 before anything is submitted.
The partition tests ask the real one-node test cluster (slurm/start.sh) and skip without one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lxmert_bench.cli import main
from lxmert_bench.launch import (
    _executor,
    gpu_count,
    load_resource_profile,
    parse_gpus,
    submitit_parameters,
)

REPO = Path(__file__).resolve().parents[1]


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc", "comp"))


needs_slurm = pytest.mark.skipif(not _cluster_up(), reason="no Slurm test cluster (slurm/start.sh)")


def _profile(tmp_path: Path, name: str = "prof", **kinds: dict) -> Path:
    prof = yaml.safe_load((REPO / "slurm" / "profiles" / "local.yaml").read_text())
    for kind, res in kinds.items():
        prof[kind].update(res)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def _spec(tmp_path: Path) -> Path:
    spec = tmp_path / "one.yaml"
    spec.write_text("name: one\nvariants: {Only: {}}\ntasks: [vqa]\nseeds: [0]\n")
    return spec


@pytest.mark.parametrize("value, parsed", [(4, (None, 4)), ("4", (None, 4)), ("a100:4", ("a100", 4)),
                                           (None, (None, 0)), (0, (None, 0))])
def test_gpu_counts_plain_and_typed(value, parsed):
    assert parse_gpus(value) == parsed


@pytest.mark.parametrize("value", ["a100", "a100:four", ":4", "a:b:4", -1, 2.5, True])
def test_bad_gpu_counts_are_refused(value):
    with pytest.raises(ValueError, match="TYPE:COUNT|>= 0"):
        parse_gpus(value)


def test_typed_gpus_do_not_crash_plan_and_become_a_gres(tmp_path, capsys):
    prof = _profile(tmp_path, pretrain={"gpus_per_node": "a100:4", "tasks_per_node": 4},
                    finetune={"gpus_per_node": "v100:1"})
    spec = _spec(tmp_path)
    code = main(["plan", str(spec), "--profile", "test", "--workdir", str(tmp_path / "wd"),
                 "--slurm-profile", str(prof)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 GPU" in out and "1 GPU" in out
    res = load_resource_profile(str(prof)).for_kind("pretrain")
    assert gpu_count(res) == 4
    params = submitit_parameters(res, "slurm")
    assert params["slurm_gres"] == "gpu:a100:4" and "gpus_per_node" not in params


def test_first_class_keys_reach_the_sbatch_script(tmp_path):
    """gres, mem_per_gpu, exclude, requeue, mail_type, mail_user in submitit's real sbatch file."""
    prof = _profile(tmp_path, finetune={
        "gpus_per_node": None, "gres": "gpu:a100:2", "mem_gb": None, "mem_per_gpu": 40,
        "exclude": ["n1", "n7"], "requeue": False, "mail_type": "fail,end",
        "mail_user": "me@example.org"})
    res = load_resource_profile(str(prof)).for_kind("finetune")
    ex = _executor(tmp_path, "slurm", res)
    ex.update_parameters(**submitit_parameters(res, "slurm"))
    text = ex._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("#SBATCH --gres=gpu:a100:2", "#SBATCH --mem-per-gpu=40G",
                 "#SBATCH --exclude=n1,n7", "#SBATCH --no-requeue", "#SBATCH --mail-type=FAIL,END",
                 "#SBATCH --mail-user=me@example.org"):
        assert line in text, text


@pytest.mark.parametrize("res, message", [
    ({"mail_type": "SOMETIMES"}, "finetune.mail_type: SOMETIMES: not a Slurm mail type"),
    ({"requeue": "yes"}, "finetune.requeue: expected true or false"),
    ({"mem_per_gpu": "lots"}, "finetune.mem_per_gpu: expected GB"),
    ({"mem_per_gpu": 16}, "Slurm refuses it together with mem_gb"),
    ({"gpus_per_node": "a100"}, "finetune.gpus_per_node: expected a GPU count or TYPE:COUNT"),
    ({"gres": "gpu::2"}, "finetune.gres: expected NAME[:TYPE][:COUNT]"),
    ({"exclude": 3}, "finetune.exclude: expected a node list"),
    ({"mail_user": "me@example.org"}, "without mail_type"),
    ({"nodes": 0}, "finetune.nodes: expected an integer >= 1"),
])
def test_bad_profile_values_exit_2_naming_file_and_key(tmp_path, capsys, res, message):
    prof = _profile(tmp_path, finetune=res)
    code = main(["plan", str(_spec(tmp_path)), "--profile", "test", "--workdir",
                 str(tmp_path / "wd"), "--slurm-profile", str(prof)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(prof) in err, err
    assert "Traceback" not in err


def test_per_user_profile_folder(tmp_path, monkeypatch, capsys):
    """$XDG_CONFIG_HOME/lxmert-bench/slurm/NAME.yaml is found by name; the not-found message
    names every folder searched, that one included."""
    config = tmp_path / "xdg"
    folder = config / "lxmert-bench" / "slurm"
    folder.mkdir(parents=True)
    shutil.copy(_profile(tmp_path, name="mine", finetune={"timeout_min": 7}), folder / "mine.yaml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    monkeypatch.chdir(tmp_path)
    prof = load_resource_profile("mine")
    assert prof.path == str(folder / "mine.yaml") and prof.for_kind("finetune")["timeout_min"] == 7
    code = main(["plan", str(_spec(tmp_path)), "--profile", "test", "--workdir",
                 str(tmp_path / "wd"), "--slurm-profile", "nonesuch"])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "slurm/profiles" in err, err


def test_global_batch_not_divisible_by_ranks_is_refused_by_plan(tmp_path, capsys):
    prof = _profile(tmp_path, pretrain={"tasks_per_node": 3})  # test profile: batch 16
    code = main(["plan", str(_spec(tmp_path)), "--profile", "test", "--workdir",
                 str(tmp_path / "wd"), "--slurm-profile", str(prof)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pretrain.optim.batch_size=16 is not divisible by the 3 ranks" in err, err
    # the dry run says the same as the run would, and writes nothing
    code = main(["run", str(_spec(tmp_path)), "--profile", "test", "--workdir",
                 str(tmp_path / "wd"), "--slurm-profile", str(prof), "--dry-run"])
    assert code == 2 and "not divisible by the 3 ranks" in capsys.readouterr().err
    assert not (tmp_path / "wd" / "runs").exists()


@needs_slurm
def test_global_batch_not_divisible_is_refused_by_run_before_submission(tmp_path, capsys):
    prof = _profile(tmp_path, pretrain={"tasks_per_node": 3})
    workdir = tmp_path / "wd"
    code = main(["run", str(_spec(tmp_path)), "--profile", "test", "--workdir", str(workdir),
                 "--executor", "slurm", "--slurm-profile", str(prof), "--quiet", "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "not divisible by the 3 ranks" in err, err
    assert not list(workdir.glob("runs/*/*/job.json")) and not (workdir / "submitit").exists()


@needs_slurm
def test_nodes_beyond_the_partition_are_refused_with_the_reason(tmp_path, capsys):
    prof = _profile(tmp_path, pretrain={"nodes": 2})  # the one-node cluster's partition 'debug'
    args = [str(_spec(tmp_path)), "--profile", "test", "--workdir", str(tmp_path / "wd"),
            "--slurm-profile", str(prof)]
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert "pretrain.nodes=2: partition debug has 1 node(s)" in err, err
    assert main(["run", *args, "--executor", "slurm", "--quiet", "--no-report"]) == 2
    assert not list((tmp_path / "wd").glob("runs/*/*/job.json"))
