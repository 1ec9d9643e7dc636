"""benchmarks/matching_dynamics.py: the demo model on the two halves of the matching decision and
the MLP handed both, side by side, on a small themed root (a few steps; the benchmark's own run
measures all its columns, matching itself included, over the demo's whole budget).

Checked: the table has a row per validation and a column per model; the halves (each a
first-order signal: the image's theme, the sentence's theme) are learned within 20 steps, which is
what lets the benchmark say that matching's slowness is not the encoders failing to read either
side; the theme rule settles most matching pairs without training."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "matching_dynamics.py"


def _load():
    spec = importlib.util.spec_from_file_location("matching_dynamics", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_halves_are_learned_in_tens_of_steps(tmp_path):
    # the matching columns stay at chance for hundreds of steps: at 20 they show nothing, so the
    # test trains the halves and the MLP beside them (the default run trains all five)
    table = _load().run(tmp_path, steps=20, every=10, images=300,
                        runs=["image half", "text half", "matching, halves given"])
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["10", "20"]
    header = next(line for line in table.splitlines() if line.startswith("| step"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "step", "image half", "text half", "matching, halves given"]
    last = [float(c) for c in rows[-1].strip("|").split("|")[1:]]
    assert last[0] > 85 and last[1] > 80  # chance: ~70 / ~75 (theme A is one of three)
    assert all(0 <= v <= 100 for v in last)
    rule = float(re.search(r"no training\): ([\d.]+) %", table).group(1))
    assert rule > 70
    # gradient norms before clipping, "total (visual feature encoder)": at the first step the
    # masked boxes' zeroed features (LayerNorm of the zero bias) are nearly all of it
    norms = {line.split(":")[0][2:]: re.findall(r"step (\d+) ([\d.e+]+) \(([\d.e+]+)\)", line)
             for line in table.splitlines() if line.startswith("- ")}
    assert list(norms) == ["image half", "text half"]  # the MLP has no visual encoder to show
    for found in norms.values():
        assert [int(s) for s, _, _ in found] == [1, 2, 3, 10]
        total, visual = float(found[0][1]), float(found[0][2])
        assert total > 100 and visual > 0.99 * total
