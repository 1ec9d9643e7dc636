"""LXMERT's pretraining heads and losses, and the VQA / GQA / NLVR² task heads.

Losses follow the official code by default (LXMERT_FACTS.md §2): an unweighted sum of masked LM,
matching, the visual losses (each averaged over ALL B x 36 boxes, weighted by the detector
confidence for labels or by the object mask for features, then x 1/0.15) and QA on sampled answers.
The paper's variants are switches: an L2 feature loss, and labels on masked objects only (the
caller passes the object mask as the label weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxmert_bench.model.config import VISUAL_LOSSES, LxmertConfig
from lxmert_bench.model.lxmert import GELU, Lxmert, gelu, init_weights

IGNORE = -1  # the official code's ignore index (HF uses -100)


def masked_cross_entropy(logits: Tensor, labels: Tensor, denominator: Tensor | float | None = None) -> Tensor:
    """Mean CE over the labels that are not IGNORE; 0 (not NaN) when a batch has none.

    ``denominator`` replaces the local count of labels (DDP: a share of the global count, so the
    ranks together give the one-process mean; see train/pretrain.py)."""
    labels = labels.reshape(-1)
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE,
                          reduction="none")
    if denominator is None:
        denominator = (labels != IGNORE).sum().clamp(min=1)
    return per.sum() / denominator


class Transform(nn.Module):
    """dense -> GELU -> LayerNorm, before the MLM and object decoders."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(gelu(self.dense(x)))


class MaskedLMHead(nn.Module):
    """``cls.predictions``: the decoder's weight IS the word embedding matrix (tied)."""

    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = Transform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, lang: Tensor) -> Tensor:
        return self.decoder(self.transform(lang)) + self.bias


class PretrainingHeads(nn.Module):
    """``cls``: masked LM on language outputs, image-sentence matching on the pooled output."""

    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MaskedLMHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class ObjectPredictionHead(nn.Module):
    """``obj_predict_head``: detected label (1600), attribute (400) and RoI feature (2048) decoders,
    built only for the chosen subset."""

    def __init__(self, config: LxmertConfig, visual_losses: Sequence[str]):
        super().__init__()
        self.transform = Transform(config)
        sizes = {"obj": config.num_object_labels, "attr": config.num_attr_labels,
                 "feat": config.visual_feat_dim}
        self.decoder_dict = nn.ModuleDict(
            {k: nn.Linear(config.hidden_size, sizes[k]) for k in VISUAL_LOSSES if k in visual_losses}
        )

    def forward(self, visn: Tensor) -> dict[str, Tensor]:
        x = self.transform(visn)
        return {k: dec(x) for k, dec in self.decoder_dict.items()}


class AnswerHead(nn.Module):
    """``logit_fc``: Linear(h, 2h) -> GELU -> LayerNorm -> Linear(2h, N); QA, VQA and GQA heads."""

    def __init__(self, config: LxmertConfig, num_answers: int, in_dim: int | None = None):
        super().__init__()
        in_dim = in_dim or config.hidden_size
        hid = 2 * config.hidden_size
        self.logit_fc = nn.Sequential(
            nn.Linear(in_dim, hid), GELU(), nn.LayerNorm(hid, eps=config.layer_norm_eps),
            nn.Linear(hid, num_answers),
        )

    def forward(self, pooled: Tensor) -> Tensor:
        return self.logit_fc(pooled)


class LxmertForPretraining(nn.Module):
    """LXMERT with the pretraining heads; any subset of tasks and visual losses.

    As the official ``LXRTPretraining``: ``cls`` (MLM and matching) always, ``obj_predict_head``
    only with visual losses (decoders for those), ``answer_head`` only with the QA task; so our
    checkpoints pass the official model's strict load under the same flags (None otherwise).
    """

    def __init__(self, config: LxmertConfig, visual_losses: Sequence[str] = VISUAL_LOSSES,
                 mask_lm: bool = True, matched: bool = True, qa: bool = True,
                 num_answers: int | None = None, sparse_mlm: bool = True):
        super().__init__()
        bad = [v for v in visual_losses if v not in VISUAL_LOSSES]
        if bad:
            raise ValueError(f"unknown visual loss(es) {bad}; expected a subset of {VISUAL_LOSSES}")
        self.config = config
        self.visual_losses = tuple(v for v in VISUAL_LOSSES if v in visual_losses)
        self.mask_lm, self.matched, self.qa = mask_lm, matched, qa
        # sparse: the decoder on labelled words only (eager speed); dense: static shapes, which
        # torch.compile and CUDA graphs need. The loss is the same.
        self.sparse_mlm = sparse_mlm
        self.bert = Lxmert(config)
        self.cls = PretrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.obj_predict_head = (ObjectPredictionHead(config, self.visual_losses)
                                 if self.visual_losses else None)
        self.answer_head = AnswerHead(config, num_answers or config.num_qa_labels) if qa else None
        for part in (self.cls, self.obj_predict_head, self.answer_head):
            if part is not None:
                part.apply(lambda m: init_weights(m, config.initializer_range))
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, feats: Tensor, boxes: Tensor, *,
        masked_lm_labels: Tensor | None = None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        feat_loss: str = "smooth_l1",
        visual_loss_weight: float = 1 / 0.15,
        qa_weight: float = 1.0,
        visual_attention_mask: Tensor | None = None,
        loss_denominators: Mapping[str, Tensor | float] | None = None,
    ) -> dict:
        """``loss_denominators``: for ``mlm`` / ``qa``, what the summed per-label losses are
        divided by instead of this batch's count of labels (global normalisation under DDP)."""
        denom = loss_denominators or {}
        lang, visn, pooled = self.bert(input_ids, attention_mask, feats, boxes, visual_attention_mask)
        out: dict = {"losses": {}}
        losses = out["losses"]
        if self.mask_lm:
            if masked_lm_labels is None or not self.sparse_mlm:
                out["lm_logits"] = self.cls.predictions(lang)
                if masked_lm_labels is not None:
                    out["lm_labels"] = masked_lm_labels
                    losses["mlm"] = masked_cross_entropy(out["lm_logits"], masked_lm_labels,
                                                         denom.get("mlm"))
            else:
                # The 30522-way decoder only on the labelled words (~15%): the same loss without
                # most of the biggest matmul. lm_logits [N, V] then pair with lm_labels [N].
                keep = masked_lm_labels != IGNORE
                out["lm_logits"] = self.cls.predictions(lang[keep])
                out["lm_labels"] = masked_lm_labels[keep]
                losses["mlm"] = masked_cross_entropy(out["lm_logits"], out["lm_labels"],
                                                     denom.get("mlm"))
        if self.matched:
            out["match_logits"] = self.cls.seq_relationship(pooled)
            if matched_label is not None:
                losses["matched"] = F.cross_entropy(out["match_logits"].float(), matched_label.reshape(-1))
        if self.visual_losses:
            out["visual_logits"] = self.obj_predict_head(visn)
            for key in self.visual_losses:
                if obj_labels is None or key not in obj_labels:
                    continue
                target, weight = obj_labels[key]
                losses[key] = self._visual_loss(key, out["visual_logits"][key], target, weight,
                                                feat_loss) * visual_loss_weight
        if self.qa:
            out["qa_logits"] = self.answer_head(pooled)
            if ans is not None:
                losses["qa"] = masked_cross_entropy(out["qa_logits"], ans, denom.get("qa")) * qa_weight
        if losses:
            out["loss"] = sum(losses.values())
        return out

    @staticmethod
    def _visual_loss(key: str, pred: Tensor, target: Tensor, weight: Tensor, feat_loss: str) -> Tensor:
        """Per-box loss x weight, averaged over all boxes (the official normalisation)."""
        if key == "feat":
            pred, target = pred.float().reshape(-1, pred.shape[-1]), target.float().reshape(-1, pred.shape[-1])
            if feat_loss == "smooth_l1":
                per_box = F.smooth_l1_loss(pred, target, reduction="none").mean(1)
            elif feat_loss == "l2":
                per_box = F.mse_loss(pred, target, reduction="none").mean(1)
            else:
                raise ValueError(f"feat_loss {feat_loss!r}: expected 'smooth_l1' or 'l2'")
        else:
            per_box = F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), target.reshape(-1),
                                      reduction="none")
        return (per_box * weight.reshape(-1).to(per_box.dtype)).mean()


class LxmertForQuestionAnswering(nn.Module):
    """VQA / GQA: the answer MLP on the pooled cross-modality output."""

    def __init__(self, config: LxmertConfig, num_answers: int):
        super().__init__()
        self.config = config
        self.bert = Lxmert(config)
        self.logit_fc = AnswerHead(config, num_answers).logit_fc
        self.logit_fc.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, feats: Tensor,
                boxes: Tensor) -> Tensor:
        return self.logit_fc(self.bert(input_ids, attention_mask, feats, boxes)[2])


class LxmertForNLVR2(nn.Module):
    """NLVR²: the sentence with each of its two images; the two pooled outputs concatenated -> 2-way."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.bert = Lxmert(config)
        self.logit_fc = AnswerHead(config, 2, in_dim=2 * config.hidden_size).logit_fc
        self.logit_fc.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, feats: Tensor,
                boxes: Tensor) -> Tensor:
        """``feats`` [B, 2, O, D], ``boxes`` [B, 2, O, 4]; text [B, L] is paired with both images."""
        b = input_ids.shape[0]
        ids = input_ids.repeat_interleave(2, dim=0)  # [s0, s0, s1, s1, ...] as the official code
        mask = attention_mask.repeat_interleave(2, dim=0) if attention_mask is not None else None
        pooled = self.bert(ids, mask, feats.flatten(0, 1), boxes.flatten(0, 1))[2]
        return self.logit_fc(pooled.reshape(b, -1))
