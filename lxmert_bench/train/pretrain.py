"""LXMERT pretraining stage (LXMERT_FACTS.md §2): the five tasks, each switchable.

Masked LM, image-sentence matching, masked-object prediction (detected label ``obj``, attribute
``attr``, RoI feature ``feat``) and image QA, summed (visual losses x 1/0.15, QA x ``qa_weight``),
BertAdam with warm-up 0.05 and gradient clipping 1.0. QA labels start at epoch
``round(qa_start * epochs)`` (0-based; with ``max_steps`` the epochs that steps cover).
Each epoch ends with the validation losses per task on ``valid_split``; the stage writes
``checkpoints/model.pt`` (final weights, official names) for the stages that start from it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from lxmert_bench.config import PretrainConfig, RunConfig
from lxmert_bench.data.pretrain import PretrainExamples
from lxmert_bench.io import atomic_torch_save
from lxmert_bench.metrics import IMAGE_READING
from lxmert_bench.model import LxmertForPretraining
from lxmert_bench.model.heads import IGNORE, VISUAL_LOSSES, masked_cross_entropy
from lxmert_bench.store import RunDir
from lxmert_bench.train.distributed import current_dist_info, global_label_denominators
from lxmert_bench.train.loop import (
    DistInfo,
    EvalResult,
    LoopSettings,
    autocast,
    batch_size_of,
    eval_batches,
    start_stage,
    steps_per_epoch,
    train,
)


def active_tasks(p: PretrainConfig) -> list[str]:
    """The losses this configuration trains, in the official order."""
    tasks = (["mlm"] if p.mask_lm else []) + (["matched"] if p.matched else [])
    tasks += [v for v in VISUAL_LOSSES if v in p.visual_losses]
    return tasks + (["qa"] if p.qa else [])


def qa_start_epoch(p: PretrainConfig, epochs: int) -> int | None:
    """First 0-based epoch with the QA loss (None: QA off)."""
    return round(p.qa_start * epochs) if p.qa else None


def check_pretrain_config(p: PretrainConfig) -> None:
    if not active_tasks(p):
        raise ValueError("pretrain: every task is off (mask_lm, matched, visual_losses, qa); "
                         "nothing to train")
    if active_tasks(p) == ["qa"] and p.qa_start > 0:
        raise ValueError(f"pretrain: only the QA task is on but it starts at qa_start={p.qa_start}; "
                         "the epochs before it would have no loss")
    unknown = sorted(set(p.visual_losses) - set(VISUAL_LOSSES))
    if unknown:
        raise ValueError(f"pretrain.visual_losses: unknown {unknown}; expected a subset of "
                         f"{list(VISUAL_LOSSES)}")


def make_examples(p: PretrainConfig, corpus: Any, tokenizer: Any, qa_from: int | None) -> PretrainExamples:
    return PretrainExamples(
        corpus, tokenizer, mask_lm=p.mask_lm, matched=p.matched, visual_losses=p.visual_losses,
        qa=p.qa, qa_from_epoch=qa_from, word_mask_rate=p.word_mask_rate,
        obj_mask_rate=p.obj_mask_rate, obj_mask_mode=p.obj_mask_mode, label_targets=p.label_targets,
        mask_inactive=p.mask_inactive,
    )


def pretrain_forward(model: torch.nn.Module, batch: dict[str, Any], p: PretrainConfig,
                     with_qa: bool, qa_weight: float,
                     loss_denominators: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """One forward pass with the labels of the active tasks (the model skips missing ones)."""
    visual = {}
    if "obj" in p.visual_losses:
        visual["obj"] = (batch["obj_labels"], batch["obj_weights"])
    if "attr" in p.visual_losses:
        visual["attr"] = (batch["attr_labels"], batch["attr_weights"])
    if "feat" in p.visual_losses:
        visual["feat"] = (batch["feat_labels"], batch["feat_mask"])
    return model(
        batch["input_ids"], batch["attention_mask"], batch["feats"], batch["boxes"],
        masked_lm_labels=batch["masked_lm_labels"] if p.mask_lm else None,
        obj_labels=visual or None,
        matched_label=batch["matched_label"] if p.matched else None,
        ans=batch["ans"] if with_qa else None,
        feat_loss=p.feat_loss, visual_loss_weight=p.visual_loss_weight, qa_weight=qa_weight,
        loss_denominators=loss_denominators,
    )


def label_counts(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The labelled words and answers of a batch: the denominators of the token-averaged MLM and
    QA losses (train/loop.py ``label_counts``)."""
    return {"mlm": (batch["masked_lm_labels"] != IGNORE).sum(), "qa": (batch["ans"] != IGNORE).sum()}


def pretrain_train_forward(model: torch.nn.Module, batch: dict[str, Any], p: PretrainConfig,
                           with_qa: bool, qa_weight: float) -> dict[str, Any]:
    """A training step's forward pass on this rank's whole share of the global batch, with the
    MLM / QA losses normalised by the global label counts under DDP, so 1 and N ranks give the
    same losses and gradients. (Every rank calls it: it all-reduces. The loop does the same for
    micro-batches through ``label_counts``; validation runs on rank 0 alone.)"""
    n = batch_size_of(batch)
    denominators = global_label_denominators(label_counts(batch), n, [n], current_dist_info())
    return pretrain_forward(model, batch, p, with_qa, qa_weight,
                            None if denominators is None else denominators[0])


def image_reading(model: torch.nn.Module, batch: dict[str, Any], out: dict[str, Any]
                  ) -> dict[str, float]:
    """The masked-LM loss summed over the matched pairs of ``batch`` whose neighbour in the batch
    shows a different image (other boxes): with their own image (from ``out``, the validation
    forward pass) and with the neighbour's (one more pass, of the same shapes, so a compiled
    model is not recompiled), and the number of those masked words (``words``)."""
    boxes, labels = batch["boxes"], batch["masked_lm_labels"]
    other = torch.roll(torch.arange(boxes.shape[0], device=boxes.device), 1)
    rows = (batch["matched_label"].reshape(-1) == 1) & (boxes != boxes[other]).flatten(1).any(1)
    kept = torch.where(rows[:, None], labels, IGNORE)
    words = int((kept != IGNORE).sum())
    if not words:
        return {}
    swapped = model(batch["input_ids"], batch["attention_mask"], batch["feats"][other],
                    boxes[other], masked_lm_labels=kept)
    # ``out``'s logits are [B, L, V], or [N, V] for the N labelled words only (the sparse head)
    own_labels = kept if out["lm_logits"].dim() == 3 else kept[labels != IGNORE]
    return {"words": float(words),  # denominator 1: the summed loss
            "mlm_own_image": float(masked_cross_entropy(out["lm_logits"], own_labels, 1)),
            "mlm_other_image": float(masked_cross_entropy(
                swapped["lm_logits"], swapped["lm_labels"], 1))}


def validation_losses(model: torch.nn.Module, examples: PretrainExamples, p: PretrainConfig,
                      seed: int, device: torch.device, precision: str) -> dict[str, float]:
    """Mean losses per task on the validation corpus (fixed masking: the same every epoch)."""
    model.eval()
    sums: dict[str, float] = {}
    seen = 0
    match_right = match_seen = 0  # image-sentence matching accuracy: a loss of 0.69 is chance
    reading: dict[str, float] = {}  # image_reading's sums
    with torch.no_grad():
        for batch in eval_batches(examples, p.optim.batch_size, device, seed):
            k = batch_size_of(batch)
            with autocast(device, precision):
                out = pretrain_forward(model, batch, p, with_qa=p.qa, qa_weight=1.0)
                if p.mask_lm:
                    for name, value in image_reading(model, batch, out).items():
                        reading[name] = reading.get(name, 0.0) + value
            for name, value in out["losses"].items():
                sums[name] = sums.get(name, 0.0) + float(value) * k
            seen += k
            if "matched" in out["losses"]:
                labels = batch["matched_label"].reshape(-1)
                match_right += int((out["match_logits"].argmax(-1) == labels).sum())
                match_seen += int(labels.numel())
    losses = {name: s / seen for name, s in sums.items()}
    result = {"loss": sum(losses.values()), **losses}
    if match_seen:  # in %, like the fine-tuning accuracies; not a loss, so not in "loss"
        result["matched_accuracy"] = 100.0 * match_right / match_seen
    if reading.get("words"):  # diagnostics, not in "loss" either
        for which in IMAGE_READING:
            result[which] = reading[which] / reading["words"]
    return result


def build_model(config: RunConfig, num_answers: int) -> LxmertForPretraining:
    p = config.pretrain
    assert p is not None
    model_config = replace(config.model, num_qa_labels=num_answers)
    return LxmertForPretraining(model_config, visual_losses=p.visual_losses, mask_lm=p.mask_lm,
                                matched=p.matched, qa=p.qa, num_answers=num_answers)


def init_from_bert(model: torch.nn.Module, config: RunConfig, run_dir: RunDir) -> str:
    """Language encoder from BERT: the ``bert_checkpoint`` file or the BERT stage's model.pt."""
    from lxmert_bench.model.weights import load_weights
    from lxmert_bench.train.common import dependency_model

    p = config.pretrain
    assert p is not None
    if p.bert_checkpoint:
        source = p.bert_checkpoint
    elif config.init_from:
        source = str(dependency_model(run_dir, config.init_from))
    else:
        raise ValueError("pretrain.init='bert' needs pretrain.bert_checkpoint or an init_from "
                         "BERT stage")
    load_weights(model, source, bert_layers=p.bert_layers)
    return source


def load_corpora(config: RunConfig) -> tuple[Any, Any]:
    """The training and validation corpora, with ``model.num_objects`` boxes per image."""
    from lxmert_bench.data.tasks import PretrainCorpus

    p, data = config.pretrain, config.data
    assert p is not None
    read = dict(image_limit=data.image_limit, feature_dtype=data.feature_dtype,
                num_objects=config.model.num_objects)
    return (PretrainCorpus(data.root, p.train_splits, **read),
            PretrainCorpus(data.root, [p.valid_split], **read))


def run_pretrain(config: RunConfig, run_dir: RunDir, info: DistInfo) -> dict[str, Any]:
    from lxmert_bench.train.common import load_tokenizer

    p = config.pretrain
    if p is None:
        raise ValueError(f"{run_dir.config_path}: kind 'pretrain' needs a 'pretrain' section")
    check_pretrain_config(p)
    device, precision = start_stage(config, info)
    data = config.data
    tokenizer = load_tokenizer(data)
    corpus, valid_corpus = load_corpora(config)
    if len(corpus) == 0:
        raise ValueError(f"pretraining corpus {list(p.train_splits)} under {data.root} has no "
                         "sentence with loaded image features")
    num_answers = len(corpus.answer_table)

    spe = steps_per_epoch(len(corpus), p.optim.batch_size)
    total = p.optim.epochs * spe
    if p.optim.max_steps:
        total = min(total, p.optim.max_steps)
    qa_from = qa_start_epoch(p, math.ceil(total / spe))
    examples = make_examples(p, corpus, tokenizer, qa_from)
    valid_examples = make_examples(p, valid_corpus, tokenizer, 0)

    model = build_model(config, num_answers)
    init_source = init_from_bert(model, config, run_dir) if p.init == "bert" else None

    def step(m: torch.nn.Module, batch: dict[str, Any], epoch: int,
             denominators: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        with_qa = qa_from is not None and epoch >= qa_from
        return pretrain_forward(m, batch, p, with_qa, p.qa_weight, denominators)

    def evaluate(m: torch.nn.Module, epoch: int) -> EvalResult:
        if len(valid_examples) == 0:
            return EvalResult({})
        return EvalResult(validation_losses(m, valid_examples, p, config.seed, device, precision))

    settings = LoopSettings.from_run(
        config, run_dir, p.optim, eval_split=p.valid_split,
        find_unused_parameters=True,  # the QA head idles before qa_start
    )
    summary = train(model, examples, step, settings, evaluate=evaluate, dist_info=info,
                    label_counts=label_counts)
    if info.is_main:  # official names (bert.*, cls.*, obj_predict_head.*, answer_head.*)
        from lxmert_bench.model.weights import named_tensors

        # save_weights' .pt format, written atomically: a reader never sees half of it
        atomic_torch_save(named_tensors(model, official=True), run_dir.checkpoint_dir / "model.pt")
    last = dict(summary.last_metrics or {})
    # the losses are the stage's metrics (what reports tabulate and golden results pin); the
    # matching accuracy is logged per epoch in log.jsonl and kept beside them
    matched_accuracy = last.pop("matched_accuracy", None)
    image_reading_losses = {which: last.pop(which) for which in IMAGE_READING if which in last}
    metrics = last
    return {
        "metrics": metrics, "last_metrics": metrics, "best_epoch": None,
        "matched_accuracy": matched_accuracy, "image_reading": image_reading_losses or None,
        "history": summary.history, "predictions": {},
        "tasks": active_tasks(p), "qa_start_epoch": None if qa_from is None else qa_from + 1,
        "num_qa_labels": num_answers, "init": init_source or "scratch",
        "train_examples": len(examples), "summary": summary,
    }
