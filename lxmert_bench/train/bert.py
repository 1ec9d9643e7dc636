"""A text-only BERT stage: masked LM on the pretraining corpus's sentences.

Offline there is no bert-base-uncased to download, so the BERT-initialisation ablation (LXMERT
Table 3) trains its own (model/bert.py: LXMERT's text embeddings, ``l_layers`` language layers and
the MLM head, nothing visual). ``checkpoints/model.pt`` is saved under HF ``BertForPreTraining``
names, so ``model.load_weights(..., bert_layers="bottom"|"top")`` loads it like a real BERT.
Under DDP the MLM loss is normalised by the global count of labelled words, as pretraining's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lxmert_bench.config import BertConfig, PretrainConfig, RunConfig
from lxmert_bench.data.pretrain import IGNORE, mask_words, non_maskable_ids
from lxmert_bench.io import atomic_torch_save
from lxmert_bench.model.bert import BertForMaskedLM
from lxmert_bench.store import RunDir
from lxmert_bench.train.loop import (
    DistInfo,
    EvalResult,
    LoopSettings,
    autocast,
    eval_batches,
    start_stage,
    train,
)


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
    total = weight = 0.0
    with torch.no_grad():
        for batch in eval_batches(examples, batch_size, device, seed):
            with autocast(device, precision):
                out = model(**batch)
            masked = float((batch["masked_lm_labels"] != IGNORE).sum())
            total += float(out["loss"]) * masked  # token-weighted, so batches count fairly
            weight += masked
    return total / max(weight, 1.0)


def label_counts(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The labelled words of a batch: the MLM loss's denominator (train/loop.py ``label_counts``)."""
    return {"mlm": (batch["masked_lm_labels"] != IGNORE).sum()}


def run_bert(config: RunConfig, run_dir: RunDir, info: DistInfo) -> dict[str, Any]:
    from lxmert_bench.train.common import load_tokenizer

    b = config.bert or BertConfig()
    corpus = config.pretrain or PretrainConfig()
    device, precision = start_stage(config, info)
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

    def step(m: nn.Module, batch: dict[str, Any], epoch: int,
             denominators: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        return m(**batch, loss_denominators=denominators)

    def evaluate(m: nn.Module, epoch: int) -> EvalResult:
        if len(valid) == 0:
            return EvalResult({})
        loss = mlm_loss(m, valid, b.optim.batch_size, config.seed, device, precision)
        return EvalResult({"loss": loss, "mlm": loss})

    settings = LoopSettings.from_run(
        config, run_dir, b.optim, eval_split=corpus.valid_split,
        find_unused_parameters=True,  # the pooler
    )
    summary = train(model, examples, step, settings, evaluate=evaluate, dist_info=info,
                    label_counts=label_counts)
    if info.is_main:
        atomic_torch_save(model.trained_state_dict(), run_dir.checkpoint_dir / "model.pt")
    metrics = summary.last_metrics or {}
    return {"metrics": metrics, "last_metrics": metrics, "best_epoch": None,
            "history": summary.history, "predictions": {}, "layers": config.model.l_layers,
            "train_examples": len(examples), "summary": summary}
