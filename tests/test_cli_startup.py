"""The commands that only read the plan start without the heavy libraries.

``plan``, ``status`` and ``--help`` are what a user types most, often in a loop; importing torch
(~1.5 s) or the report's pandas / seaborn (~1.5 s) for them made each take 3.5-4.5 s here. Each
command runs in a fresh interpreter, which then lists what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
HEAVY = ("torch", "pandas", "seaborn", "matplotlib", "transformers")
PROBE = """
import json, sys
from lxmert_bench.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["plan", "ablations/vision_tasks.yaml", "--profile", "demo"],
    ["plan", "ablations/vision_tasks.yaml", "--profile", "demo", "--json"],
    ["status", "ablations/vision_tasks.yaml", "--profile", "demo"],
    ["plan", "ablations/no_such_spec.yaml"],  # an input error: exit 2, still light
])
def test_reading_commands_import_no_heavy_library(argv, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LXMERT_BENCH_WORKDIR": str(tmp_path / "wd")}
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [m for m in HEAVY if m in out["modules"]] == [], proc.stderr[-2000:]
    assert out["code"] == (2 if "no_such_spec" in argv[-1] else 0), proc.stderr[-2000:]


def test_a_local_run_asks_torch_for_gpus_only_where_the_machine_shows_one():
    probe = ("import json, sys; from lxmert_bench.launch import _cuda_count, gpu_device_nodes; "
             "n = _cuda_count(); print(json.dumps([n, gpu_device_nodes(), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    count, nodes, imported = json.loads(out.stdout)
    if nodes:  # a GPU machine: torch's own count, as before
        import torch

        assert imported and count == torch.cuda.device_count()
    else:  # no device file: no GPU for torch either, and the launcher stays light
        assert count == 0 and not imported
