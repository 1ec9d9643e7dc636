"""``run.compile``: the training forward under ``torch.compile``, with its recompiles counted and
a compile failure turned into eager training (train/loop.py runs every step through it)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lxmert_bench.train.checkpoint import rng_state, set_rng_state

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def compile_mode(setting: str, device: torch.device) -> str | None:
    """``run.compile``: 'auto' is 'default' on CUDA and off on a CPU (there the compile takes
    minutes and the compiled step is not faster: README, Performance); None: eager."""
    if setting == "auto":
        setting = "default" if device.type == "cuda" else "none"
    if setting not in COMPILE_MODES:
        raise ValueError(f"run.compile: expected 'auto' or one of {list(COMPILE_MODES)}, got {setting!r}")
    return None if setting == "none" else setting


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledStep:
    """The training forward under ``torch.compile`` (``mode``; None: eager): graphs compiled after
    the first step count as recompiles (warned and logged), and a compile failure falls back to
    eager with a warning naming the cause; that step is redone from the same RNG states."""

    def __init__(self, module: nn.Module, mode: str | None, device: torch.device,
                 say: Callable[[str], None], desc: str):
        self.eager = self.module = module
        self.mode, self.device, self.say, self.desc = mode, device, say, desc
        self.failed: str | None = None
        self.recompiles = 0
        self.proven = False  # a compiled step has run
        if mode:
            try:
                self.module = torch.compile(module, mode=None if mode == "default" else mode,
                                            dynamic=False)
            except Exception as e:  # noqa: BLE001 - any cause: training goes on eagerly
                self._fall_back(e)

    def run(self, work: Callable[[nn.Module], Any], optimizer: torch.optim.Optimizer) -> Any:
        """``work(module)``: the step's forward and backward passes."""
        if self.module is self.eager:
            return work(self.eager)
        rngs = None if self.proven else rng_state(self.device)
        before = _graphs_compiled()
        try:
            out = work(self.module)
        except Exception as e:  # noqa: BLE001 - a real error in the step fails eagerly too
            self._fall_back(e)
            if rngs is not None:
                set_rng_state(rngs, self.device)
            optimizer.zero_grad(set_to_none=True)
            return work(self.eager)
        if self.proven and _graphs_compiled() > before:
            self.recompiles += 1
            self.say(f"[{self.desc}] torch.compile recompiled the training step "
                                f"({self.recompiles} recompile(s)): shapes or guards changed")
        self.proven = True
        return out

    def _fall_back(self, e: Exception) -> None:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        self.failed = f"{type(e).__name__}: {first}"
        self.module = self.eager
        warnings.warn(f"[{self.desc}] torch.compile (mode {self.mode}) failed, training eagerly: "
                      f"{self.failed}", RuntimeWarning, stacklevel=2)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode or "none", "recompiles": self.recompiles, "failed": self.failed}
