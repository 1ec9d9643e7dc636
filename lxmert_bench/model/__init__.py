"""The LXMERT model: backbone, pretraining and task heads, weight loading.

The names below are loaded on first use, so ``lxmert_bench.model.config`` (which the spec and the
planner read) does not import torch: ``lxmert-bench plan`` / ``status`` start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lxmert_bench.model.config import PRESETS, LxmertConfig
    from lxmert_bench.model.heads import (
        LxmertForNLVR2,
        LxmertForPretraining,
        LxmertForQuestionAnswering,
    )
    from lxmert_bench.model.lxmert import Lxmert
    from lxmert_bench.model.weights import LoadReport, load_weights, save_weights

_HOMES = {
    "PRESETS": "config", "LxmertConfig": "config",
    "LxmertForNLVR2": "heads", "LxmertForPretraining": "heads", "LxmertForQuestionAnswering": "heads",
    "Lxmert": "lxmert",
    "LoadReport": "weights", "load_weights": "weights", "save_weights": "weights",
}
__all__ = [
    "PRESETS", "LoadReport", "Lxmert", "LxmertConfig", "LxmertForNLVR2", "LxmertForPretraining",
    "LxmertForQuestionAnswering", "load_weights", "save_weights",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
