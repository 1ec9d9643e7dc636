"""LXMERT's configuration: the paper's base model and small presets for CPU demos and tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# the masked-object prediction heads (model/heads.py), in the official code's order: detected-label
# classification (object, attribute) and RoI-feature regression; declared here, where the configs
# that name them read it without importing torch
VISUAL_LOSSES = ("obj", "attr", "feat")


@dataclass(frozen=True)
class LxmertConfig:
    """Defaults are the paper's base model (LXMERT_FACTS.md §1)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9  # language encoder
    x_layers: int = 5  # cross-modality encoder
    r_layers: int = 5  # object-relationship encoder
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    num_objects: int = 36
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    num_qa_labels: int = 9500  # size of the official all_ans.json

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LxmertConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LxmertConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LxmertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, LxmertConfig] = {
    "base": LxmertConfig(),
    # CPU demos and the synthetic benchmark (its vocabulary is padded to 1024 entries).
    # initializer_range 0.02 * sqrt(768 / 128): the base model's init scale per unit of width. At
    # 0.02 a 128-wide model starts with cross-attention outputs ~6x weaker than the base model's
    # (two 0.02-init projections in a row), and on the synthetic benchmark it stayed at chance on
    # image-sentence matching for thousands of steps.
    "tiny": LxmertConfig(
        vocab_size=1024, hidden_size=128, num_attention_heads=4, intermediate_size=256,
        l_layers=2, x_layers=2, r_layers=1, max_position_embeddings=64, initializer_range=0.049,
    ),
    # unit tests: smallest shapes that still exercise every module
    # (real feature and label sizes, so it runs on the synthetic benchmark too).
    "test": LxmertConfig(
        vocab_size=1024, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        l_layers=2, x_layers=1, r_layers=1, max_position_embeddings=32,
    ),
}
