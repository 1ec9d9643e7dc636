"""The LXMERT model: backbone, pretraining and task heads, weight loading."""

from lxmert_bench.model.config import PRESETS, LxmertConfig
from lxmert_bench.model.heads import (
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
)
from lxmert_bench.model.lxmert import Lxmert
from lxmert_bench.model.weights import LoadReport, load_weights, save_weights

__all__ = [
    "PRESETS",
    "LoadReport",
    "Lxmert",
    "LxmertConfig",
    "LxmertForNLVR2",
    "LxmertForPretraining",
    "LxmertForQuestionAnswering",
    "load_weights",
    "save_weights",
]
