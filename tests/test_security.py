"""Safe on a shared filesystem (issue 16): no code runs from a file someone else could have written,
group/world-writable trees are refused before anything runs, files get the user's umask, and odd
variant names render as text. Every malicious file here is real (a pickle whose load would create
a marker file); the tests assert that the marker is NOT created."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lxmert_bench.config import OptimConfig
from lxmert_bench.io import RefusedFile, atomic_torch_save, atomic_write_bytes, load_torch_file
from lxmert_bench.train.loop import (
    LoopSettings,
    load_checkpoint,
    rng_state,
    seed_all,
    set_rng_state,
    train,
)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code running from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------
# checkpoints and weight files load without running code
# ------------------------------------------------------------------------------------------------
def test_payload_is_live(tmp_path):
    """The payload really runs code under a full unpickle (what load_checkpoint did before)."""
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_tampered_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "state": _Payload(marker)}, path)
    with pytest.raises(RefusedFile) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "GLOBAL io.open" in msg and "nothing in it was run" in msg
    assert not marker.exists()


def test_tampered_last_pt_stops_a_resume_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    s = _settings(tmp_path)
    s.checkpoint_dir.mkdir(parents=True)
    torch.save({"model": _Toy().state_dict(), "state": _Payload(marker)}, s.checkpoint_dir / "last.pt")
    with pytest.raises(RefusedFile, match="last.pt"):
        train(_Toy(), _ToyData(), _step, s)
    assert not marker.exists()
    assert not s.log_path.exists()  # not one training step ran


def test_tampered_weight_file_is_refused_naming_it(tmp_path):
    """``init_from`` / ``bert_checkpoint`` / exported weights go through model.weights, which
    reads with the same safe loader."""
    from lxmert_bench.model import LxmertConfig, LxmertForPretraining, load_weights

    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"bert.pooler.dense.weight": torch.zeros(2, 2), "x": _Payload(marker)}, path)
    with pytest.raises(RefusedFile) as e:
        load_weights(LxmertForPretraining(LxmertConfig.preset("test")), path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_torn_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(RuntimeError, match="last.pt: cannot read"):
        load_checkpoint(path)


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    """The new format needs no allow-listed global at all."""
    cpu = torch.device("cpu")
    random.seed(5)
    np.random.seed(5)
    np.random.normal()  # a cached Gaussian in numpy's state
    torch.manual_seed(5)
    atomic_torch_save({"rng": [rng_state(cpu)]}, tmp_path / "r.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "r.pt") == []
    expect = (random.random(), float(np.random.normal()), np.random.randint(1 << 30), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"][0], cpu)
    got = (random.random(), float(np.random.normal()), np.random.randint(1 << 30), float(torch.rand(1)))
    assert got == expect


def test_checkpoint_files_get_the_umask_permissions(tmp_path):
    """mkstemp's 0600 made checkpoints unreadable to a project's group; now 0666 & ~umask like
    every other result file (the kernel applies the umask at creation)."""
    old = os.umask(0o022)
    try:
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "a.pt")
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
        os.umask(0o077)  # a private user stays private: nothing is widened
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "c.pt")
        assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o600
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "new" / "d.pt")  # a new directory:
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700  # the umask, never wider
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_load_torch_file_allows_only_named_globals(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"a": np.arange(3)}, path)
    with pytest.raises(RefusedFile, match="numpy"):
        load_torch_file(path)


# ------------------------------------------------------------------------------------------------
# checkpoints written by the previous format still resume, exactly
# ------------------------------------------------------------------------------------------------
class _ToyData:
    def __init__(self, n: int = 40):
        g = np.random.default_rng(0)
        self.x = g.normal(size=(n, 4)).astype(np.float32)
        self.y = (self.x @ np.arange(1, 5, dtype=np.float32)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def example(self, index, epoch, rng):
        return self.x[index] + rng.normal(scale=0.1, size=4).astype(np.float32), self.y[index]

    def collate(self, examples):
        return {"x": torch.from_numpy(np.stack([e[0] for e in examples])),
                "y": torch.tensor([e[1] for e in examples])}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.drop, self.out = nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.lin(x)))).squeeze(-1)


def _step(model, batch, epoch):
    # numpy's and Python's global generators are drawn from, so their restored states matter
    scale = 1.0 + 0.01 * np.random.rand() + 0.01 * random.random()
    mse = ((model(batch["x"]) - batch["y"]) ** 2).mean() * scale
    return {"loss": mse, "losses": {"mse": mse}}


def _settings(tmp: Path) -> LoopSettings:
    return LoopSettings(seed=3, optim=OptimConfig(lr=1e-2, batch_size=8, epochs=3, warmup=0.1),
                        checkpoint_dir=tmp / "checkpoints", log_path=tmp / "log.jsonl",
                        log_every=2, checkpoint_every=3, device="cpu")


def _as_previous_format(rng: dict) -> dict:
    """An RNG entry as the previous loop wrote it: numpy's get_state() tuple (an ndarray: needs
    numpy globals to unpickle) and random.getstate()."""
    n = rng["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    return {"torch": rng["torch"],
            "numpy": ("MT19937", keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])),
            "python": rng["python"]}


class _Interrupt(Exception):
    pass


def test_previous_format_checkpoint_resumes_exactly(tmp_path):
    data = _ToyData()
    full_model = _Toy()
    seed_all(0)  # the loop leaves numpy's and Python's global generators to the stage
    full = train(full_model, data, _step, _settings(tmp_path / "full"))

    cut_s = _settings(tmp_path / "cut")
    seen = []

    def dying(model, batch, epoch):
        seen.append(1)
        if len(seen) == 8:  # after the step-6 checkpoint
            raise _Interrupt
        return _step(model, batch, epoch)

    seed_all(0)
    with pytest.raises(_Interrupt):
        train(_Toy(), data, dying, cut_s)
    last = cut_s.checkpoint_dir / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["state"]["global_step"] == 6
    ckpt["rng"] = [_as_previous_format(r) for r in ckpt["rng"]]
    ckpt.pop("format", None)
    torch.save(ckpt, last)  # as the previous torch.save wrote it: plain file, numpy arrays inside
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(last)
    assert "numpy.ndarray" in unsafe  # a plain weights_only load would refuse this file

    resumed_model = _Toy()
    seed_all(99)  # the checkpoint's states must win
    cut = train(resumed_model, data, _step, cut_s)
    assert cut.steps == full.steps and cut.history == full.history
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    # and the next checkpoint it wrote is in the new format
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []


def test_previous_format_allow_list_does_not_admit_code(tmp_path):
    """The few numpy globals allowed for old checkpoints build arrays, nothing else: a payload
    hidden next to them is still refused."""
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"rng": [{"numpy": np.random.get_state()}], "x": _Payload(marker)}, path)
    with pytest.raises(RefusedFile):
        load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# permission checks before running or submitting
# ------------------------------------------------------------------------------------------------
def _shared_gid() -> int | None:
    """A group other users may be in: as root any gid will do; else one of ours that is not our
    private group."""
    import grp
    import pwd

    if os.geteuid() == 0:
        return 4242  # no such group: certainly not root's private one
    me = pwd.getpwuid(os.geteuid()).pw_name
    for gid in os.getgroups():
        try:
            g = grp.getgrgid(gid)
        except KeyError:
            return gid
        if g.gr_name != me or set(g.gr_mem) - {me}:
            return gid
    return None


def test_check_tree_refuses_world_and_group_writable(tmp_path):
    from lxmert_bench.permissions import check_tree

    gid = _shared_gid()
    if gid is None:
        pytest.skip("this user is in no group but its private one: cannot make a shared-group dir")
    ok, world, group = tmp_path / "ok", tmp_path / "world", tmp_path / "group"
    for d, mode in ((ok, 0o755), (world, 0o777), (group, 0o775)):
        d.mkdir()
        os.chmod(d, mode)
    os.chown(group, -1, gid)
    os.chmod(group, 0o775)
    missing = tmp_path / "not-yet"
    assert check_tree([ok, missing]) == []
    [w] = check_tree([world])
    assert w.startswith(f"{world}: drwxrwxrwx") and "every user" in w and "chmod o-w" in w
    [g] = check_tree([group])
    assert g.startswith(f"{group}: drwxrwxr-x") and "--allow-group-write" in g
    assert check_tree([group], allow_group=True) == []
    assert len(check_tree([world], allow_group=True)) == 1  # world-writable: never
    os.chmod(world, 0o1777)  # sticky (like /tmp) still lets anyone create names there
    assert "drwxrwxrwt" in check_tree([world], allow_group=True)[0]


def test_group_writable_in_a_user_private_group_is_fine(tmp_path):
    """umask 002 with a group named as its only member (Debian/Ubuntu's default): no refusal."""
    import grp
    import pwd

    me = pwd.getpwuid(os.geteuid())
    private = grp.getgrgid(me.pw_gid)
    if private.gr_name != me.pw_name or set(private.gr_mem) - {me.pw_name}:
        pytest.skip(f"{me.pw_name}'s primary group {private.gr_name} is not a private group")
    from lxmert_bench.permissions import check_tree

    d = tmp_path / "mine"
    d.mkdir()
    os.chown(d, -1, me.pw_gid)
    os.chmod(d, 0o775)
    assert check_tree([d]) == []


def test_check_workdir_covers_submitit_snapshot_and_run_dirs(tmp_path):
    from lxmert_bench.permissions import check_workdir, workdir_paths

    wd = tmp_path / "wd"
    run = wd / "runs" / "finetune" / "0123456789ab"
    (run / "checkpoints").mkdir(parents=True)
    job = wd / "submitit" / "4242"
    job.mkdir(parents=True)
    snap = wd / "code" / "abc123"
    snap.mkdir(parents=True)
    paths = set(workdir_paths(wd, [run]))
    assert {wd, wd / "runs", wd / "runs" / "finetune", wd / "submitit", job, snap, run,
            run / "checkpoints"} <= paths
    assert check_workdir(wd, [run]) == []
    for bad in (job, snap, run / "checkpoints"):
        os.chmod(bad, 0o777)
        [problem] = check_workdir(wd, [run])
        assert problem.startswith(f"{bad}: drwxrwxrwx")
        os.chmod(bad, 0o755)


SPEC_YAML = """\
name: sec
variants:
  A: {}
tasks: [vqa]
seeds: [0]
"""


@pytest.mark.parametrize("dry_run", [True, False])
def test_run_refuses_a_world_writable_workdir_with_exit_2(tmp_path, capsys, monkeypatch, dry_run):
    from lxmert_bench.cli import main

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "sec.yaml"
    spec.write_text(SPEC_YAML)
    wd = tmp_path / "wd"
    wd.mkdir()
    os.chmod(wd, 0o777)
    args = ["run", str(spec), "--profile", "test", "--executor", "local", "--workdir", str(wd),
            "--quiet", "--no-report"] + (["--dry-run"] if dry_run else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{wd}: drwxrwxrwx" in err and "Traceback" not in err
    assert list(wd.iterdir()) == []  # nothing submitted, nothing written


def test_group_writable_workdir_needs_allow_group_write_and_is_remembered(tmp_path, capsys,
                                                                          monkeypatch):
    from lxmert_bench.cli import main

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "sec.yaml"
    spec.write_text(SPEC_YAML)
    gid = _shared_gid()
    if gid is None:
        pytest.skip("this user is in no group but its private one: cannot make a shared-group dir")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.chown(wd, -1, gid)
    os.chmod(wd, 0o775)
    base = ["--profile", "test", "--workdir", str(wd)]
    assert main(["plan", str(spec), *base]) == 2
    assert "--allow-group-write" in capsys.readouterr().err
    assert main(["run", str(spec), *base, "--dry-run"]) == 2
    capsys.readouterr()
    assert main(["plan", str(spec), *base, "--allow-group-write"]) == 0
    assert main(["run", str(spec), *base, "--dry-run", "--allow-group-write"]) == 0
    # recorded as provenance with the options `status` / `report` reuse
    from lxmert_bench.cli import _load, _remember, build_parser

    args = build_parser().parse_args(["run", str(spec), *base, "--allow-group-write"])
    specs, _plan, _wd = _load(args)
    _remember(wd, args, specs)
    import json

    assert json.loads((wd / "specs" / "sec.json").read_text())["allow_group_write"] is True


# ------------------------------------------------------------------------------------------------
# variant names: one line of text (they reach reports, plots and logs)
# ------------------------------------------------------------------------------------------------
def test_spec_refuses_a_variant_name_with_a_newline(tmp_path, capsys):
    from lxmert_bench.cli import main

    spec = tmp_path / "nl.yaml"
    spec.write_text('name: nl\nvariants:\n  "A\\n# injected": {}\n  "B\\tC": {}\n  ok: {}\n'
                    "tasks: [vqa]\n")
    assert main(["plan", str(spec), "--profile", "test", "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:3:" in err and "'A\\n# injected'" in err and "control character" in err
    assert "'B\\tC'" in err and "Traceback" not in err
    # odd but printable names are fine: the report escapes them
    spec.write_text('name: nl\nvariants:\n  "<img src=x onerror=alert(1)>": {}\n  "[x](http://e)": {}\n'
                    "tasks: [vqa]\n")
    assert main(["plan", str(spec), "--profile", "test", "--workdir", str(tmp_path / "wd")]) == 0
