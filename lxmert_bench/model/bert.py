"""The text-only BERT the BERT stage trains (train/bert.py): LXMERT's text embeddings,
``l_layers`` language (BERT) layers and the tied MLM head, nothing visual, under HF
``BertForPreTraining`` names (``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``bert.pooler.*``,
``cls.predictions.*``), so ``model.load_weights(..., bert_layers="bottom"|"top")`` loads its
``model.pt`` like a real BERT checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lxmert_bench.model.config import LxmertConfig
from lxmert_bench.model.heads import MaskedLMHead, masked_cross_entropy
from lxmert_bench.model.lxmert import (
    Pooler,
    TextEmbeddings,
    TransformerLayer,
    init_weights,
    key_padding_mask,
)


class _Encoder(nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(config) for _ in range(config.l_layers))


class _Bert(nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = Pooler(config)  # not trained (no NSP); kept so the file has BERT's keys


class _Cls(nn.Module):
    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MaskedLMHead(config, word_embeddings)


class BertForMaskedLM(nn.Module):
    """BERT (LXMERT's language half) with the tied MLM head, under HF BertForPreTraining names."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.bert = _Bert(config)
        self.cls = _Cls(config, self.bert.embeddings.word_embeddings)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                masked_lm_labels: Tensor | None = None,
                loss_denominators: Mapping[str, Tensor | float] | None = None) -> dict[str, Any]:
        """``loss_denominators["mlm"]``: what the summed per-word losses are divided by instead of
        this batch's count of labelled words (DDP, gradient accumulation: see train/loop.py)."""
        x = self.bert.embeddings(input_ids)
        mask = key_padding_mask(attention_mask)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        logits = self.cls.predictions(x)
        out: dict[str, Any] = {"lm_logits": logits, "losses": {}}
        if masked_lm_labels is not None:
            out["losses"]["mlm"] = masked_cross_entropy(
                logits, masked_lm_labels, (loss_denominators or {}).get("mlm"))
            out["loss"] = out["losses"]["mlm"]
        return out

    def trained_state_dict(self) -> dict[str, Tensor]:
        """What is saved: everything (the pooler at its initialisation)."""
        return self.state_dict()
