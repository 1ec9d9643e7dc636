"""A text-only BERT stage: masked LM on the pretraining corpus's sentences.

Offline there is no bert-base-uncased to download, so the BERT-initialisation ablation (LXMERT
Table 3) trains its own: LXMERT's text embeddings, ``l_layers`` language (BERT) layers and the MLM
head, nothing visual. ``checkpoints/model.pt`` is saved under HF ``BertForPreTraining`` names
(``bert.embeddings.*``, ``bert.encoder.layer.N.*``, ``bert.pooler.*``, ``cls.predictions.*``), so
``model.load_weights(..., bert_layers="bottom"|"top")`` loads it like a real BERT checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lxmert_bench.config import BertConfig, PretrainConfig, RunConfig
from lxmert_bench.data.pretrain import IGNORE, mask_words, non_maskable_ids
from lxmert_bench.model.config import LxmertConfig
from lxmert_bench.model.heads import MaskedLMHead, masked_cross_entropy
from lxmert_bench.model.lxmert import (
    Pooler,
    TextEmbeddings,
    TransformerLayer,
    init_weights,
    key_padding_mask,
)
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import (
    VALID_STREAM,
    DistInfo,
    EvalResult,
    LoopSettings,
    atomic_torch_save,
    autocast,
    iterate_batches,
    seed_all,
    select_device,
    select_precision,
    to_device,
    train,
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
                masked_lm_labels: Tensor | None = None) -> dict[str, Any]:
        x = self.bert.embeddings(input_ids)
        mask = key_padding_mask(attention_mask)
        for layer in self.bert.encoder.layer:
            x = layer(x, mask)
        logits = self.cls.predictions(x)
        out: dict[str, Any] = {"lm_logits": logits, "losses": {}}
        if masked_lm_labels is not None:
            out["losses"]["mlm"] = masked_cross_entropy(logits, masked_lm_labels)
            out["loss"] = out["losses"]["mlm"]
        return out

    def trained_state_dict(self) -> dict[str, Tensor]:
        """What is saved: everything (the pooler at its initialisation)."""
        return self.state_dict()


class SentenceExamples:
    """MLM examples from sentences (the loop's ``TrainData``)."""

    def __init__(self, sentences: list[str], tokenizer: Any, rate: float):
        self.sentences, self.tokenizer, self.rate = sentences, tokenizer, rate
        self._specials = np.asarray(sorted(non_maskable_ids(tokenizer)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sentences)

    def example(self, index: int, epoch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids, attention = (np.asarray(a, dtype=np.int64) for a in self.tokenizer.encode(self.sentences[index]))
        maskable = (attention == 1) & ~np.isin(ids, self._specials)
        ids, labels = mask_words(ids, maskable, rng, self.rate, self.tokenizer.mask_id,
                                 self.tokenizer.vocab_size)
        return {"input_ids": ids, "attention_mask": attention, "masked_lm_labels": labels}

    def collate(self, examples: list[dict[str, np.ndarray]]) -> dict[str, Tensor]:
        return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


def corpus_sentences(root: str, splits: tuple[str, ...], image_limit: int | None) -> list[str]:
    """Every sentence of the pretraining corpus splits (captions and questions), in corpus order."""
    from lxmert_bench.data.tasks import PretrainCorpus

    return [e["sent"] for e in PretrainCorpus(root, splits, image_limit=image_limit).entries]


def mlm_loss(model: nn.Module, examples: SentenceExamples, batch_size: int, seed: int,
             device: torch.device, precision: str) -> float:
    model.eval()
    n = len(examples)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    total = weight = 0.0
    with torch.no_grad():
        for batch in iterate_batches(examples, batches, 0, seed, VALID_STREAM):
            batch = to_device(batch, device)
            with autocast(device, precision):
                out = model(**batch)
            masked = float((batch["masked_lm_labels"] != IGNORE).sum())
            total += float(out["loss"]) * masked  # token-weighted, so batches count fairly
            weight += masked
    return total / max(weight, 1.0)


def run_bert(config: RunConfig, run_dir: RunDir, info: DistInfo) -> dict[str, Any]:
    from lxmert_bench.train.common import load_tokenizer

    b = config.bert or BertConfig()
    corpus = config.pretrain or PretrainConfig()
    seed_all(config.seed)
    tokenizer = load_tokenizer(config.data)
    sentences = corpus_sentences(config.data.root, corpus.train_splits, config.data.image_limit)
    if not sentences:
        raise ValueError(f"BERT stage: no sentences in {list(corpus.train_splits)} under "
                         f"{config.data.root}")
    examples = SentenceExamples(sentences, tokenizer, b.word_mask_rate)
    valid = SentenceExamples(
        corpus_sentences(config.data.root, (corpus.valid_split,), config.data.image_limit),
        tokenizer, b.word_mask_rate)
    model = BertForMaskedLM(config.model)
    device = select_device(config.device, info)
    precision = select_precision(config.precision, device)

    def step(m: nn.Module, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        return m(**batch)

    def evaluate(m: nn.Module, epoch: int) -> EvalResult:
        if len(valid) == 0:
            return EvalResult({})
        loss = mlm_loss(m, valid, b.optim.batch_size, config.seed, device, precision)
        return EvalResult({"loss": loss, "mlm": loss})

    settings = LoopSettings(
        seed=config.seed, optim=b.optim, checkpoint_dir=run_dir.checkpoint_dir,
        log_path=run_dir.log_path, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, device=config.device,
        precision=config.precision, num_workers=config.data.num_workers,
        eval_split=corpus.valid_split, eval_every_epoch=config.eval_every_epoch,
        find_unused_parameters=True,  # the pooler
        desc=f"bert {config.content_hash()}",
    )
    summary = train(model, examples, step, settings, evaluate=evaluate, dist_info=info)
    if info.is_main:
        atomic_torch_save(model.trained_state_dict(), run_dir.checkpoint_dir / "model.pt")
    metrics = summary.last_metrics or {}
    return {"metrics": metrics, "last_metrics": metrics, "best_epoch": None,
            "history": summary.history, "predictions": {}, "layers": config.model.l_layers,
            "train_examples": len(examples), "summary": summary}
