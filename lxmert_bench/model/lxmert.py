"""LXMERT: Learning Cross-Modality Encoder Representations from Transformers (Tan & Bansal, 2019).

The backbone, named after the paper's parts: text embeddings, the visual feature encoder, the
language encoder, the object-relationship encoder and the cross-modality encoder, then the pooler.
Module names match the official checkpoint and HF's ``LxmertModel`` one to one, so state dicts load
without renaming (LXMERT_FACTS.md §7). Attention runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxmert_bench.model.config import LxmertConfig


def gelu(x: Tensor) -> Tensor:
    """The exact erf GELU of the official code and BERT (the one activation of every part)."""
    return F.gelu(x)


class GELU(nn.Module):
    """:func:`gelu` as a module, for ``nn.Sequential`` heads (no parameters, no state)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x)


# ---------------------------------------------------------------------------------------------
# Input embeddings
# ---------------------------------------------------------------------------------------------
class TextEmbeddings(nn.Module):
    """LN(word + position + token type), then dropout.

    As in the official code and HF, all three tables have ``padding_idx=0``: position 0 ([CLS]) and
    token type 0 get no gradient (LXMERT_FACTS.md §1).
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class VisualFeatEncoder(nn.Module):
    """Objects as an unordered set: (LN(W_f f) + LN(W_p p)) / 2, no index embedding."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.visn_fc = nn.Linear(config.visual_feat_dim, h)
        self.visn_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.box_fc = nn.Linear(config.visual_pos_dim, h)
        self.box_layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        x = self.visn_layer_norm(self.visn_fc(feats))
        y = self.box_layer_norm(self.box_fc(boxes))
        return self.dropout((x + y) / 2)


# ---------------------------------------------------------------------------------------------
# Attention and feed-forward sub-layers (post-LN, as BERT)
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention of ``hidden`` over ``context`` (the same tensor for self-attention)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)


class AddNorm(nn.Module):
    """dense -> dropout -> residual -> LayerNorm (``*.output`` in the checkpoint)."""

    def __init__(self, config: LxmertConfig, in_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class SelfAttentionBlock(nn.Module):
    """``self`` (query/key/value) + ``output`` (add & norm)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.self = Attention(config)
        self.output = AddNorm(config, config.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, x, mask), x)


class CrossAttentionBlock(nn.Module):
    """``att`` + ``output``: one modality attends to the other."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.att = Attention(config)
        self.output = AddNorm(config, config.hidden_size)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        return self.output(self.att(x, context, context_mask), x)


class Intermediate(nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return gelu(self.dense(x))


class TransformerLayer(nn.Module):
    """A BERT layer: the language encoder and the object-relationship encoder stack these."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.attention = SelfAttentionBlock(config)
        self.intermediate = Intermediate(config)
        self.output = AddNorm(config, config.intermediate_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class CrossModalityLayer(nn.Module):
    """Cross-attention (ONE module, shared by both directions), then self-attention, then FFN.

    Both directions read the layer's inputs, not each other's updated values (§1).
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visual_attention = CrossAttentionBlock(config)
        self.lang_self_att = SelfAttentionBlock(config)
        self.visn_self_att = SelfAttentionBlock(config)
        self.lang_inter = Intermediate(config)
        self.lang_output = AddNorm(config, config.intermediate_size)
        self.visn_inter = Intermediate(config)
        self.visn_output = AddNorm(config, config.intermediate_size)

    def cross_attention_by_direction(self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor,
                                     visn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The paper's cross-attention as written: the language queries attend over the objects,
        the objects over the language, both through the same module and from the layer's inputs.
        The reference that the fused :meth:`cross_attention` equals (tests/test_model.py)."""
        lang_x = self.visual_attention(lang, visn, visn_mask)
        visn_x = self.visual_attention(visn, lang, lang_mask)
        return lang_x, visn_x

    def cross_attention(self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor,
                        visn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`cross_attention_by_direction` in ONE call of the shared module (what runs).

        Text and objects are concatenated ([B, L+O, H]); a block mask lets text queries attend
        only to objects and object queries only to text (plus each side's padding mask), so the
        result equals the two separate calls, while the projections, output dense and LayerNorm
        run once over L+O rows: fewer and larger matmuls (~1.4x faster fwd+bwd on CPU).
        """
        b, n_lang, _ = lang.shape
        n_visn = visn.shape[1]
        is_lang = torch.arange(n_lang + n_visn, device=lang.device) < n_lang
        # xor, not !=: inductor cannot range-analyse != on booleans (InductorError under compile)
        mask = torch.logical_xor(is_lang[:, None], is_lang[None, :])[None, None]  # [1, 1, L+O, L+O]
        if lang_mask is not None or visn_mask is not None:
            def keys(m: Tensor | None, n: int) -> Tensor:
                return torch.ones(b, n, dtype=torch.bool, device=lang.device) if m is None \
                    else m.reshape(m.shape[0], n).expand(b, n)
            valid = torch.cat([keys(lang_mask, n_lang), keys(visn_mask, n_visn)], dim=1)
            mask = mask & valid[:, None, None, :]
        both = torch.cat([lang, visn], dim=1)
        out = self.visual_attention(both, both, mask)
        return out[:, :n_lang], out[:, n_lang:]

    def forward(self, lang: Tensor, lang_mask: Tensor | None, visn: Tensor,
                visn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        lang_x, visn_x = self.cross_attention(lang, lang_mask, visn, visn_mask)
        lang_x = self.lang_self_att(lang_x, lang_mask)
        visn_x = self.visn_self_att(visn_x, visn_mask)
        lang_out = self.lang_output(self.lang_inter(lang_x), lang_x)
        visn_out = self.visn_output(self.visn_inter(visn_x), visn_x)
        return lang_out, visn_out


class Encoder(nn.Module):
    """visual feature encoder; language (``layer``), object-relationship (``r_layers``) and
    cross-modality (``x_layers``) encoders."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = VisualFeatEncoder(config)
        self.layer = nn.ModuleList(TransformerLayer(config) for _ in range(config.l_layers))
        self.r_layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.r_layers))
        self.x_layers = nn.ModuleList(CrossModalityLayer(config) for _ in range(config.x_layers))

    def forward(self, lang: Tensor, lang_mask: Tensor | None, feats: Tensor, boxes: Tensor,
                visn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        visn = self.visn_fc(feats, boxes)
        for layer in self.layer:
            lang = layer(lang, lang_mask)
        for layer in self.r_layers:
            visn = layer(visn, visn_mask)
        for layer in self.x_layers:
            lang, visn = layer(lang, lang_mask, visn, visn_mask)
        return lang, visn


class Pooler(nn.Module):
    """tanh(W h_[CLS]) on the final cross-modality language output: the cross-modality output."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, lang: Tensor) -> Tensor:
        return torch.tanh(self.dense(lang[:, 0]))


def key_padding_mask(mask: Tensor | None) -> Tensor | None:
    """[B, L] 1/0 padding mask -> boolean [B, 1, 1, L] for SDPA (True = attend).

    Masked keys get weight exactly 0, as with the official -10000 and HF's finfo.min.
    """
    if mask is None:
        return None
    return mask.bool()[:, None, None, :]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The official ``init_bert_weights``: N(0, 0.02) weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Lxmert(nn.Module):
    """The LXMERT backbone; ``forward`` returns ``(lang_out, visn_out, pooled)``."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, feats: Tensor, boxes: Tensor,
                visual_attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        lang = self.embeddings(input_ids, token_type_ids)
        lang_out, visn_out = self.encoder(
            lang, key_padding_mask(attention_mask), feats, boxes,
            key_padding_mask(visual_attention_mask),
        )
        return lang_out, visn_out, self.pooler(lang_out)

