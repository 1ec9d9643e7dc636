"""Fine-tuning and evaluation on VQA, GQA and NLVR² (LXMERT_FACTS.md §3, §5).

- VQA: BCE-with-logits on the soft scores, x the number of answers (the official scaling);
- GQA: the same BCE on one-hot targets by default, CE on the argmax with ``loss="ce"``;
- NLVR²: the pair head, 2-way CE.

Starting weights: a pretraining stage's ``model.pt`` (backbone, plus the QA head transferred row by
row through the answer table when ``load_qa_head``: unmapped answers get zero rows, as official), a
BERT stage (language layers only), a checkpoint file (``init_checkpoint``), or scratch.
After each epoch the dev split is evaluated with :mod:`lxmert_bench.metrics`; the best epoch's
weights (``checkpoints/best.pt``), its predictions in the official submission format and
``predictions/dev_scores.json`` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lxmert_bench import metrics as M
from lxmert_bench.config import FinetuneConfig, RunConfig
from lxmert_bench.data.answers import AnswerTable, qa_head_transfer_rows
from lxmert_bench.io import atomic_torch_save, atomic_write_json
from lxmert_bench.model import LxmertForNLVR2, LxmertForQuestionAnswering
from lxmert_bench.store import RunDir
from lxmert_bench.train.common import dependency_model, load_tokenizer
from lxmert_bench.train.loop import (
    TRAIN_STREAM,
    DistInfo,
    EvalResult,
    LoopSettings,
    autocast,
    eval_batches,
    start_stage,
    train,
)

QA_TASKS = ("vqa", "gqa")
PREDICTION_FILES = {"vqa": "dev_predict.json", "gqa": "dev_predict.json", "nlvr2": "dev_predict.csv"}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
class TaskExamples:
    """A task dataset as the loop's ``TrainData`` (fine-tuning examples draw no randomness)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int, epoch: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.dataset[index]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from lxmert_bench.data.tasks import collate

        return collate(examples)


class AugmentedQA(torch.utils.data.Dataset):
    """Table 4's "DA": the task's questions plus the pretraining corpus's questions from the other
    QA sources whose answers are in the task's answer table (targets keep their soft scores)."""

    def __init__(self, task_data: Any, corpus: Any, task: str, tokenizer: Any):
        self.task_data, self.corpus, self.tokenizer = task_data, corpus, tokenizer
        self.extra: list[tuple[dict[str, Any], dict[str, float]]] = []
        a2l = task_data.ans2label
        for entry in corpus.entries:
            if entry["source"] == task or not entry["label"]:
                continue
            label = {a: s for a, s in entry["label"].items() if a in a2l}
            if label:
                self.extra.append((entry, label))

    def __len__(self) -> int:
        return len(self.task_data) + len(self.extra)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < len(self.task_data):
            return self.task_data[i]
        entry, label = self.extra[i - len(self.task_data)]
        ids, mask = self.tokenizer.encode(entry["sent"])
        img = self.corpus.features(entry["img_id"])
        item = {
            "question_id": entry["uid"], "img_id": entry["img_id"],
            "input_ids": torch.as_tensor(ids, dtype=torch.long),
            "attention_mask": torch.as_tensor(mask, dtype=torch.long),
            "feats": torch.from_numpy(np.array(img["features"], dtype=np.float32)),
            "boxes": torch.from_numpy(np.array(img["boxes"], dtype=np.float32)),
            "target": self.task_data.target(label),
        }
        if self.task_data.task == "vqa":
            item["answer_type"] = ""
        return item


def load_datasets(config: RunConfig, tokenizer: Any) -> tuple[Any, Any]:
    from lxmert_bench.data.tasks import GQADataset, NLVR2Dataset, PretrainCorpus, VQADataset

    ft = config.finetune
    assert ft is not None
    classes = {"vqa": VQADataset, "gqa": GQADataset, "nlvr2": NLVR2Dataset}
    if ft.task not in classes:
        raise ValueError(f"finetune.task: unknown task {ft.task!r}; expected one of {sorted(classes)}")
    cls = classes[ft.task]
    root = config.data.root
    read = dict(image_limit=config.data.image_limit, feature_dtype=config.data.feature_dtype,
                num_objects=config.model.num_objects)
    train_data = cls(root, ft.train_splits, tokenizer, **read)
    dev_data = cls(root, [ft.valid_split], tokenizer, **read)
    if ft.data_augmentation:
        if ft.task not in QA_TASKS:
            raise ValueError(f"finetune.data_augmentation: only for VQA and GQA, not {ft.task!r}")
        pre = config.pretrain.train_splits if config.pretrain else ("mscoco_train", "mscoco_nominival", "vgnococo")
        train_data = AugmentedQA(train_data, PretrainCorpus(root, pre, **read), ft.task, tokenizer)
    if len(train_data) == 0:
        raise ValueError(f"{ft.task} {list(ft.train_splits)} under {root}: no example has image features")
    if len(dev_data) == 0:
        raise ValueError(f"{ft.task} {ft.valid_split} under {root}: no example has image features")
    return train_data, dev_data


# ---------------------------------------------------------------------------------------------
# Model and starting weights
# ---------------------------------------------------------------------------------------------
def build_model(config: RunConfig, num_answers: int | None) -> nn.Module:
    assert config.finetune is not None
    if config.finetune.task == "nlvr2":
        return LxmertForNLVR2(config.model)
    assert num_answers is not None
    return LxmertForQuestionAnswering(config.model, num_answers)


def load_qa_head(model: nn.Module, source: str | Path, label2ans: list[str],
                 table: AnswerTable) -> dict[str, int]:
    """The pretrained answer MLP, and for its last layer the row of each task answer found in the
    pretraining answer table (``model.weights.transfer_qa_head``); other rows become zero."""
    from lxmert_bench.model.weights import transfer_qa_head

    task_rows, pretrain_rows = qa_head_transfer_rows(label2ans, table)
    transfer_qa_head(model, source, task_rows, pretrain_rows, pretrain_answers=len(table))
    return {"mapped": len(task_rows), "unmapped": len(label2ans) - len(task_rows)}


def initialise(model: nn.Module, config: RunConfig, run_dir: RunDir,
               label2ans: list[str] | None) -> dict[str, Any]:
    """Load the starting weights; returns what was loaded (for result.json)."""
    from lxmert_bench.model.weights import load_weights

    ft = config.finetune
    assert ft is not None
    if config.init_from:
        source: str | None = str(dependency_model(run_dir, config.init_from))
        from_kind = config.init_from.split("/")[0]
    elif ft.init_checkpoint:
        source, from_kind = ft.init_checkpoint, "checkpoint"
    else:
        return {"init": "scratch"}
    # the backbone only (official --loadLXMERT); the QA head is transferred row by row below.
    # bert_layers matters only for a BERT source.
    report = load_weights(model, source, bert_layers=ft.bert_layers, heads=False)
    info: dict[str, Any] = {"init": config.init_from or source, "loaded_tensors": len(report.loaded)}
    if not any(n.startswith("bert.encoder.layer.") for n in report.loaded):
        raise ValueError(f"{source}: no language-encoder weight was loaded ({report.format} "
                         "checkpoint); is it an LXMERT or BERT checkpoint?")
    if ft.load_qa_head and ft.task in QA_TASKS and from_kind != "bert":
        assert label2ans is not None
        table = AnswerTable.from_root(config.data.root)
        info["qa_head"] = load_qa_head(model, source, label2ans, table)
    return info


# ---------------------------------------------------------------------------------------------
# Losses and evaluation
# ---------------------------------------------------------------------------------------------
def task_loss(task: str, logits: torch.Tensor, batch: dict[str, Any], loss_kind: str) -> torch.Tensor:
    logits = logits.float()
    if task == "nlvr2":
        return F.cross_entropy(logits, batch["label"])
    target = batch["target"].float()
    n = logits.shape[1]
    if loss_kind == "ce":  # official --mceLoss: CE on the best answer, x N like the BCE
        return F.cross_entropy(logits, target.argmax(1)) * n
    return F.binary_cross_entropy_with_logits(logits, target) * n


def forward_task(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(batch["input_ids"], batch["attention_mask"], batch["feats"], batch["boxes"])


def predict(model: nn.Module, dev: TaskExamples, task: str, label2ans: list[str] | None,
            batch_size: int, device: torch.device, precision: str) -> dict[Any, Any]:
    """{example id: prediction} (an answer string, or a bool for NLVR²)."""
    model.eval()
    out: dict[Any, Any] = {}
    with torch.no_grad():
        for batch in eval_batches(dev, batch_size, device, 0, TRAIN_STREAM):  # no randomness
            ids = batch["identifier"] if task == "nlvr2" else batch["question_id"]
            with autocast(device, precision):
                logits = forward_task(model, batch)
            best = logits.float().argmax(1).tolist()
            for k, b in zip(ids, best):
                out[k] = bool(b) if task == "nlvr2" else label2ans[b]
    return out


def score(task: str, predictions: dict[Any, Any], dev_data: Any) -> tuple[dict[str, float], dict[Any, float]]:
    """(metrics in percent, {example id: score in [0, 1]})."""
    raw = dev_data.raw_examples
    if task == "nlvr2":
        labels = {d["identifier"]: int(d["label"]) for d in raw if "label" in d}
        return M.nlvr2_metrics(predictions, labels), M.nlvr2_example_scores(predictions, labels)
    labels = {d["question_id"]: d.get("label", {}) for d in raw}
    if task == "vqa":
        types = {d["question_id"]: d.get("answer_type", "other") for d in raw}
        return (M.vqa_scores(predictions, labels, answer_types=types),
                M.vqa_example_scores(predictions, labels=labels))
    official = gqa_official_questions(dev_data)
    if official is not None:  # the official balanced files: their metrics, the local accuracy
        files, questions = official
        accuracy = M.gqa_accuracy(predictions, labels)  # refuses an incomplete set first
        metrics = M.gqa_official_metrics({q: predictions[q] for q in questions}, questions,
                                         files.choices)
        return {**metrics, "accuracy": accuracy}, M.gqa_example_scores(predictions, labels)
    types = gqa_structural_types(raw)
    return (M.gqa_scores(predictions, labels, structural_types=types),
            M.gqa_example_scores(predictions, labels))


def gqa_official_questions(dev_data: Any) -> tuple[Any, dict[str, M.GQAQuestion]] | None:
    """(the dev split's official files, their questions among the dev examples), or None without
    a balanced question file. Questions whose images are not loaded (``data.image_limit``) are
    left out; a dev question missing from the file is an error naming it."""
    from lxmert_bench.data.gqa_questions import load_gqa_eval_files

    if len(dev_data.splits) != 1:
        return None
    files = load_gqa_eval_files(dev_data.root, dev_data.splits[0])
    if files is None:
        return None
    ids = [str(d["question_id"]) for d in dev_data.raw_examples]
    missing = [q for q in ids if q not in files.questions]
    if missing:
        raise ValueError(f"{files.questions_path}: {len(missing)} of the {len(ids)} dev questions "
                         f"are not in it (e.g. {missing[0]!r}); is it the split's balanced file?")
    return files, {q: files.questions[q] for q in ids}


def gqa_structural_types(raw: list[dict[str, Any]]) -> dict[Any, str] | None:
    """``{question_id: types.structural}`` when every record carries it (the balanced question
    files do, LXMERT's processed JSONs do not), else None: binary / open is then approximated."""
    types = {}
    for d in raw:
        found = d.get("types")
        structural = found.get("structural") if isinstance(found, dict) else None
        if not isinstance(structural, str):
            return None
        types[d["question_id"]] = structural
    return types


def write_predictions(run_dir: RunDir, task: str, predictions: dict[Any, Any],
                      scores: dict[Any, float]) -> dict[str, str]:
    folder = run_dir.predictions_dir
    folder.mkdir(parents=True, exist_ok=True)
    name = PREDICTION_FILES[task]
    writer = {"vqa": M.write_vqa_predictions, "gqa": M.write_gqa_predictions,
              "nlvr2": M.write_nlvr2_predictions}[task]
    writer(folder / name, predictions)
    atomic_write_json(folder / "dev_scores.json", {str(k): v for k, v in scores.items()}, indent=None)
    return {"dev": f"predictions/{name}", "scores": "predictions/dev_scores.json"}


# ---------------------------------------------------------------------------------------------
def run_finetune(config: RunConfig, run_dir: RunDir, info: DistInfo) -> dict[str, Any]:
    ft: FinetuneConfig | None = config.finetune
    if ft is None:
        raise ValueError(f"{run_dir.config_path}: kind 'finetune' needs a 'finetune' section")
    if ft.loss not in ("bce", "ce"):
        raise ValueError(f"finetune.loss: expected 'bce' or 'ce', got {ft.loss!r}")
    device, precision = start_stage(config, info)
    tokenizer = load_tokenizer(config.data)
    train_data, dev_data = load_datasets(config, tokenizer)
    label2ans = None if ft.task == "nlvr2" else dev_data.label2ans
    model = build_model(config, None if label2ans is None else len(label2ans))
    init = initialise(model, config, run_dir, label2ans)

    dev = TaskExamples(dev_data)
    eval_batch = max(ft.optim.batch_size, 64)

    def step(m: nn.Module, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        loss = task_loss(ft.task, forward_task(m, batch), batch, ft.loss)
        return {"loss": loss, "losses": {ft.task: loss}}

    def evaluate(m: nn.Module, epoch: int) -> EvalResult:
        predictions = predict(m, dev, ft.task, label2ans, eval_batch, device, precision)
        metrics, scores = score(ft.task, predictions, dev_data)
        return EvalResult(metrics, (predictions, scores))

    files: dict[str, str] = {}

    def on_best(m: nn.Module, epoch: int, result: EvalResult) -> None:
        atomic_torch_save(m.state_dict(), run_dir.checkpoint_dir / "best.pt")
        files.update(write_predictions(run_dir, ft.task, *result.payload))

    settings = LoopSettings.from_run(
        config, run_dir, ft.optim, select_metric="accuracy", select_mode="max",
        eval_split=ft.valid_split, eval_every_epoch=True,  # the best epoch is chosen on dev
        desc=f"finetune {ft.task} {config.content_hash()}",
    )
    summary = train(model, TaskExamples(train_data), step, settings, evaluate=evaluate,
                    on_best=on_best, dist_info=info)
    test: dict[str, Any] = {}
    if info.is_main:  # the test splits' leaderboard files, from the best epoch's weights
        load_best(model, run_dir)
        test = predict_test_splits(config, run_dir, model, tokenizer, device, precision)
    if not files:  # resumed after the best epoch was written
        name = PREDICTION_FILES[ft.task]
        files = {"dev": f"predictions/{name}", "scores": "predictions/dev_scores.json"}
    return {
        "metrics": summary.best_metrics or {}, "last_metrics": summary.last_metrics or {},
        "best_epoch": summary.best_epoch, "history": summary.history, "predictions": files,
        "train_examples": len(train_data), "dev_examples": len(dev_data), **init,
        **metric_notes(ft.task, dev_data), "test_predictions": test,
        "summary": summary,
    }


def metric_notes(task: str, dev_data: Any) -> dict[str, Any]:
    """How the metrics were computed where that is not the official evaluator (for reports)."""
    if task != "gqa":
        return {}
    official = gqa_official_questions(dev_data)
    if official is None:
        from lxmert_bench.data.gqa_questions import questions_file

        rule = M.gqa_binary_rule(gqa_structural_types(dev_data.raw_examples))
        wanted = questions_file(dev_data.splits[0]) if len(dev_data.splits) == 1 else None
        absent = (f"no official {wanted} under data.root" if wanted
                  else "no official balanced question file for this split")
        return {"metric_notes": {"gqa binary/open": rule, "gqa official metrics":
                                 f"not computed: {absent}"}}
    files, questions = official
    choices = (f"validity / plausibility from {files.choices_path.name}" if files.choices
               else f"validity / plausibility not computed (no {files.choices_path.name})")
    subset = (f" over {len(questions)} of its {len(files.questions)} questions (the others' "
              "images are not loaded)" if len(questions) < len(files.questions) else "")
    differ = sum(1 for d in dev_data.raw_examples
                 if questions[str(d["question_id"])].answer not in (d.get("label") or {}))
    if differ:  # the official metrics use the file's answers, accuracy the split JSON's labels
        subset += f" ({differ} of whose answers differ from the split JSON's labels)"
    return {"metric_notes": {
        "gqa binary/open": M.gqa_binary_rule({}),
        "gqa official metrics": (
            f"official eval.py rules on {files.questions_path.name}{subset}; {choices}; "
            "consistency over the entailed questions in that file; distribution is the "
            "chi-square score / 100 (lower is better); grounding not computed (needs attention "
            "maps)")}}


# ---------------------------------------------------------------------------------------------
# Test splits: leaderboard files from the best epoch's weights (checkpoints/best.pt)
# ---------------------------------------------------------------------------------------------
TEST_MANIFEST = "test_predictions.json"  # under predictions/: what was predicted, what is absent


def missing_test_files(root: str | Path, task: str, split: str) -> list[str]:
    """The files a test split reads that are not under ``root`` (empty: it can be predicted)."""
    from lxmert_bench.data.layout import needed_files

    return [str(Path(root) / rel) for rel in needed_files([(task, split)])
            if not (Path(root) / rel).is_file() or (Path(root) / rel).stat().st_size == 0]


def load_best(model: nn.Module, run_dir: RunDir) -> Path:
    """The best epoch's weights into ``model`` (strictly: every tensor, nothing else)."""
    from lxmert_bench.io import load_torch_file
    from lxmert_bench.model.weights import load_weights

    path = run_dir.checkpoint_dir / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the best epoch's weights are kept there "
                                "(`clean` never removes them), so test predictions need it")
    state = load_torch_file(path)
    # wrappers' prefixes (DDP, torch.compile), should a wrapped module's state dict be saved
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    load_weights(model, state, strict=True)
    return path


def predict_test_splits(config: RunConfig, run_dir: RunDir, model: nn.Module, tokenizer: Any,
                        device: torch.device, precision: str) -> dict[str, Any]:
    """Predict every test split of the task whose files are under the data root, write each in
    its leaderboard's format (data/layout.py ``TEST_SPLITS``) into ``predictions/`` and the list in
    ``predictions/test_predictions.json``; returns that list. Splits whose files are missing are
    named under ``absent``, not an error. Labelled splits (GQA testdev, NLVR2 Test-P) are scored too.
    """
    from lxmert_bench.data.layout import TEST_SPLITS
    from lxmert_bench.io import utc_now

    ft = config.finetune
    assert ft is not None
    read = dict(image_limit=config.data.image_limit, feature_dtype=config.data.feature_dtype,
                num_objects=config.model.num_objects)
    splits: dict[str, Any] = {}
    absent: dict[str, str] = {}
    for split, (name, board) in TEST_SPLITS[ft.task].items():
        missing = missing_test_files(config.data.root, ft.task, split)
        if missing:
            absent[split] = f"{board}: missing {', '.join(missing)}"
            continue
        try:
            data = _task_class(ft.task)(config.data.root, [split], tokenizer, **read)
        except (ValueError, OSError, KeyError) as e:  # an optional file: never fails the stage
            absent[split] = f"{board}: not predicted ({e})"
            continue
        if len(data) == 0:
            absent[split] = f"{board}: no {split} example has image features"
            continue
        label2ans = None if ft.task == "nlvr2" else data.label2ans
        predictions = predict(model, TaskExamples(data), ft.task, label2ans,
                              max(ft.optim.batch_size, 64), device, precision)
        folder = run_dir.predictions_dir
        folder.mkdir(parents=True, exist_ok=True)
        {"vqa": M.write_vqa_predictions, "gqa": M.write_gqa_predictions,
         "nlvr2": M.write_nlvr2_predictions}[ft.task](folder / name, predictions)
        entry: dict[str, Any] = {"file": f"predictions/{name}", "leaderboard": board,
                                 "examples": len(predictions), "records": data.num_records}
        if all("label" in d for d in data.raw_examples):  # released answers: score them here
            try:
                entry["metrics"] = score(ft.task, predictions, data)[0]
            except ValueError as e:  # e.g. official files that do not cover the split
                entry["metrics_error"] = str(e)
        splits[split] = entry
    manifest = {"stage_id": run_dir.stage_id, "weights": "checkpoints/best.pt", "splits": splits,
                "absent": absent, "written_at": utc_now()}
    atomic_write_json(run_dir.predictions_dir / TEST_MANIFEST, manifest)
    return manifest


def _task_class(task: str) -> Any:
    from lxmert_bench.data.tasks import GQADataset, NLVR2Dataset, VQADataset

    return {"vqa": VQADataset, "gqa": GQADataset, "nlvr2": NLVR2Dataset}[task]


def predict_finished(run_dir: RunDir) -> dict[str, Any]:
    """``lxmert-bench predict``: a finished fine-tuning's test predictions from its ``best.pt``,
    without training; under the stage's execution lock (:class:`~lxmert_bench.store.StageBusy`
    when another process holds it)."""
    from lxmert_bench.train.loop import select_device, select_precision

    if run_dir.read_result() is None:
        raise ValueError(f"{run_dir.stage_id}: not finished (state {run_dir.disk_state()!r})")
    with run_dir.execution_lock():
        config = run_dir.read_config()
        if config.kind != "finetune" or config.finetune is None:
            raise ValueError(f"{run_dir.stage_id}: a {config.kind} stage has no test splits")
        device = select_device(config.device)
        precision = select_precision(config.precision, device)
        answers = None
        if config.finetune.task != "nlvr2":
            from lxmert_bench.data.answers import load_task_answers

            answers = len(load_task_answers(config.data.root, config.finetune.task)[1])
        model = build_model(config, answers)
        load_best(model, run_dir)
        model.to(device)
        return predict_test_splits(config, run_dir, model, load_tokenizer(config.data), device,
                                   precision)
