"""Progress you can watch: a local run shows each running stage's variant, step/total, loss and
ETA; on a non-terminal as plain lines (issue 14)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap

from lxmert_bench.progress import StageProgress, eta_text, progress_line, stage_label


def test_progress_line_and_eta():
    rec = {"step": 50, "total_steps": 200, "loss": 3.14159, "time": 25.0}
    assert progress_line("Feat + Label: pretrain", rec) == \
        "[Feat + Label: pretrain] step 50/200 loss 3.1416 ETA 1m15s"
    assert progress_line("x", {"step": 3}) == "[x] step 3"
    assert eta_text(3 * 3600 + 125) == "3h02m" and eta_text(9.4) == "9s"
    assert stage_label(["A", "B", "C"], "pretrain") == "A, B +1: pretrain"


def test_follows_a_growing_log_and_skips_partial_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    out = io.StringIO()
    watch = StageProgress(True, out)
    watch.start("s", "V: stage", log)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 1, "total_steps": 4, "loss": 2.0, "time": 1.0}) + "\n")
        f.write(json.dumps({"step": 1, "split": "valid", "metrics": {}}) + "\n")
        f.write('{"step": 2, "total')  # still being written
    watch.poll()
    assert out.getvalue().splitlines() == ["[V: stage] step 1/4 loss 2.0000 ETA 3s"]
    with open(log, "a") as f:
        f.write('_steps": 4, "loss": 1.5, "time": 2.0}\n')
    watch.stop("s")
    assert out.getvalue().splitlines()[-1] == "[V: stage] step 2/4 loss 1.5000 ETA 2s"


def test_a_local_run_prints_stage_progress_on_a_non_terminal(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(textwrap.dedent("""\
        name: p
        variants:
          Only Me: {pretrain.enabled: false}
        tasks: [nlvr2]
        seeds: [0]
        """))
    proc = subprocess.run([sys.executable, "-m", "lxmert_bench.cli", "run", str(spec), "--profile",
                           "test", "--workdir", str(tmp_path / "wd"), "--no-report"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[Only Me: finetune nlvr2")]
    assert lines and re.fullmatch(r"\[Only Me: finetune nlvr2 seed 0\] step (\d+)/\1 loss \d+\.\d{4} "
                                  r"ETA 0s", lines[-1]), lines
    assert re.search(r"^\[1/1 stages\] finetune/[0-9a-f]{12}: done$", proc.stderr, re.M)
    assert "\r" not in proc.stderr  # plain lines, no bar redraws
