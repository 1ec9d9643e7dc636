"""The LXMERT model: backbone, pretraining and task heads, weight loading."""

from lxmert_bench.model.config import PRESETS, LxmertConfig
from lxmert_bench.model.heads import (
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
)
from lxmert_bench.model.lxmert import Lxmert

__all__ = [
    "PRESETS",
    "Lxmert",
    "LxmertConfig",
    "LxmertForNLVR2",
    "LxmertForPretraining",
    "LxmertForQuestionAnswering",
]
