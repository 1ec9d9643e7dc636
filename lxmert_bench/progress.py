"""What a local run shows while its stages train: one line per running stage (its variant, stage,
step/total, loss and ETA) from the stage's own ``log.jsonl``, which any process can read.

On a terminal: a tqdm bar per running stage under the run's bar of stages. Elsewhere (CI logs, a
file): one plain line per logged step, so a log shows the same without control characters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lxmert_bench.io import iter_jsonl_objects


def stage_label(variants: list[str], what: str) -> str:
    """'Feat + Label: pretrain [mlm+match+qa]' (one or two variant names, then the stage)."""
    names = ", ".join(variants[:2]) + (f" +{len(variants) - 2}" if len(variants) > 2 else "")
    return f"{names}: {what}" if names else what


def eta_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(label: str, record: dict[str, Any]) -> str:
    """One plain line for a training log record."""
    step, total = record.get("step", 0), record.get("total_steps")
    line = f"[{label}] step {step}" + (f"/{total}" if total else "")
    if isinstance(record.get("loss"), (int, float)):
        line += f" loss {record['loss']:.4f}"
    eta = _eta(record)
    return line + (f" ETA {eta_text(eta)}" if eta is not None else "")


def _eta(record: dict[str, Any]) -> float | None:
    step, total, spent = record.get("step"), record.get("total_steps"), record.get("time")
    if not (isinstance(step, int) and isinstance(total, int) and isinstance(spent, (int, float))):
        return None
    if step <= 0 or spent <= 0:
        return None
    return (total - step) * spent / step


@dataclass
class _Followed:
    label: str
    log: Path
    offset: int = 0
    bar: Any = None
    last: dict[str, Any] = field(default_factory=dict)


class StageProgress:
    """Follows the ``log.jsonl`` of each running stage; ``poll()`` shows what is new."""

    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.followed: dict[str, _Followed] = {}

    def start(self, stage_id: str, label: str, log: Path) -> None:
        if not self.enabled:
            return
        f = _Followed(label, log)
        if log.is_file():  # a resumed stage: show only what it logs from now on
            f.offset = log.stat().st_size
        if self.tty:
            from tqdm import tqdm

            f.bar = tqdm(total=None, desc=label[:60], unit="step", leave=False, file=self.stream,
                         dynamic_ncols=True, position=len(self.followed) + 1)
        self.followed[stage_id] = f

    def stop(self, stage_id: str) -> None:
        f = self.followed.pop(stage_id, None)
        if f is not None:
            self._read(f)
            if f.bar is not None:
                f.bar.close()

    def poll(self) -> None:
        for f in self.followed.values():
            self._read(f)

    def close(self) -> None:
        for sid in list(self.followed):
            self.stop(sid)

    def _read(self, f: _Followed) -> None:
        try:
            with open(f.log, encoding="utf-8") as fh:
                fh.seek(f.offset)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk[:chunk.rfind("\n") + 1]  # a line still being written waits
        f.offset += len(complete.encode("utf-8"))
        for record in iter_jsonl_objects(complete.splitlines()):
            if "split" in record or "step" not in record:
                continue
            f.last = record
            if f.bar is not None:
                if record.get("total_steps"):
                    f.bar.total = record["total_steps"]
                f.bar.n = record["step"]
                eta = _eta(record)
                f.bar.set_postfix_str(f"loss {record.get('loss', float('nan')):.4f}"
                                      + (f" ETA {eta_text(eta)}" if eta is not None else ""))
            else:
                print(progress_line(f.label, record), file=self.stream, flush=True)
