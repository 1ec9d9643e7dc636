"""Frozen run configurations: what one stage (BERT, pretraining or fine-tuning) needs to run.

A :class:`RunConfig` is everything that decides a stage's result. It round-trips through JSON
(``config.json`` in its run directory) and its content hash names the run. Defaults follow the paper
and the official code (LXMERT_FACTS.md); where the two disagree a field says which one it follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lxmert_bench.model.config import VISUAL_LOSSES, LxmertConfig

# How a config field takes part in a stage's identity (its hash), declared in the field's metadata:
# - PROVENANCE: never (paths, logging cadence, devices): recorded in config.json, not hashed;
# - ADDED_LATER: only when set away from its default, so a field added after runs were finished
#   leaves their hashes as they were (an upgrade never turns finished work into "to run").
# Every other field is always part of the identity.
IDENTITY = "identity"
PROVENANCE = {IDENTITY: "never"}
ADDED_LATER = {IDENTITY: "unless_default"}


def provenance(default: Any) -> Any:
    """A field that does not change results (kept out of the hash)."""
    return field(default=default, metadata=PROVENANCE)


def added_later(default: Any, *, legacy: Any = dataclasses.MISSING,
                applies: Callable[[Any], bool] | None = None,
                switch: tuple[Switch, ...] = ()) -> Any:
    """A result-changing field added after stages were run: hashed only away from its default.

    ``legacy``: the value that gives what stages computed before the field existed, when that is
    not the default (a default that corrects old behaviour); the field is then hashed unless it is
    ``legacy``, so old stages keep their hashes and the new behaviour gets new ones.
    ``applies(section)``: False where the field has no effect, and it stays out of the hash.
    ``switch``: where the field is a paper-vs-code switch (see :class:`Switch`).
    """
    meta: dict[str, Any] = dict(ADDED_LATER)
    if legacy is not dataclasses.MISSING:
        meta["legacy"] = legacy
    if applies is not None:
        meta["applies"] = applies
    if switch:
        meta[SWITCH] = switch
    return field(default=default, metadata=meta)


# --- Where the paper and the official code disagree (LXMERT_FACTS.md §9) -------------------------
# Declared once, in the metadata of the field that switches it; the report's list
# (report/render.py SWITCHES) and the README's table are derived from these declarations.
SWITCH = "paper_vs_code"


@dataclass(frozen=True)
class Switch:
    """One difference between the paper and the official code, and the config key that picks.

    ``key`` is the dotted key as specs write it ('finetune.gqa.loss' reads the fine-tuning config
    of that task; 'bert_layers' is whichever stage takes BERT weights); ``code`` is the official
    code's value, which is the default; ``facts`` names the row of LXMERT_FACTS.md §9 (None: a
    difference that table does not list); ``values`` says what the values mean (README)."""

    key: str | None
    what: str
    paper: Any
    code: Any
    facts: str | None = None
    values: str = ""


def paper_vs_code(default: Any, *switches: Switch) -> Any:
    """A field (always in the identity) that is a paper-vs-code switch."""
    return field(default=default, metadata={SWITCH: switches})


# Differences with no switch: the harness follows the official code only.
FIXED_DIFFERENCES: tuple[Switch, ...] = (
    Switch(None, "text embedding", "word + position", "word + position + token type (all type 0)",
           facts="text embedding",
           values="no switch: the token-type embedding of the official code (and of HF) is kept"),
)


StageKind = Literal["bert", "pretrain", "finetune"]
TASKS: tuple[str, ...] = ("vqa", "gqa", "nlvr2")
OFFICIAL_SEED = 9595  # the official code's --seed default


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives, in the official directory layout (vqa/, gqa/, nlvr2/, lxmert/, *_imgfeat/).

    ``root`` is not part of a run's identity: ``fingerprint`` (of the files under it) is.
    """

    root: str = provenance("data")
    vocab: str | None = None  # BERT vocab.txt; None: <root>/vocab.txt, else bert-base-uncased's
    synthetic: bool = False  # generate the synthetic benchmark into root when it is missing
    synthetic_images: int = 600
    synthetic_seed: int = 0
    # Which synthetic generator (data/synthetic.py DESIGNS): "v1" the original one (2048-d
    # features, Visual Genome label ids); "compact" small features and label ids, for the demo;
    # "themed" compact's files with every scene on one theme (benchmarks/matching_dynamics.py).
    synthetic_design: Literal["v1", "compact", "themed"] = added_later("v1")
    feature_dtype: Literal["float32", "float16"] = "float32"  # of the memory-mapped store
    max_seq_length: int = 20
    # Training batches' sentences: padded to max_seq_length (the official code: static shapes,
    # which torch.compile and CUDA graphs want) or cut to the batch's longest one (fewer tokens per
    # step on a CPU). Padding is masked, so the model computes the same, but dropout then draws
    # fewer random numbers: the results differ in their bits, so the choice is part of a stage.
    pad_to: Literal["max_length", "longest"] = added_later("max_length")
    image_limit: int | None = None  # like the official --tiny / --fast: first N images per split
    num_workers: int | None = provenance(None)  # DataLoader workers; None: 4 on CUDA, 0 on a CPU
    fingerprint: str = ""  # filled in by the planner


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["bertadam", "adamw"] = "bertadam"  # official: BertAdam, no bias correction
    lr: float = 1e-4
    batch_size: int = 256
    epochs: int = 20
    warmup: float = 0.05  # fraction of all steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int | None = None  # stop early (demos, tests); None: epochs decide
    # Examples per forward pass on one process; gradients accumulate up to batch_size (the global
    # batch, over every process). None: the process's whole share. The same update within
    # rounding (tests/test_train_accumulation.py), so provenance, not identity.
    micro_batch_size: int | None = provenance(None)


def accumulation_problem(batch_size: int, micro_batch_size: int | None, world_size: int = 1,
                         key: str = "optim.micro_batch_size") -> str | None:
    """Why ``micro_batch_size`` examples per forward pass cannot make up the global batch of
    ``batch_size`` over ``world_size`` processes (None: they can, or no accumulation). Each
    process's share must split into whole, equal micro-batches: equal shapes for compiled steps,
    and the same number of micro-steps on every rank (DDP all-reduces on the last one)."""
    if micro_batch_size is None:
        return None
    if micro_batch_size <= 0:
        return f"{key}={micro_batch_size}: must be positive (or null: no accumulation)"
    if batch_size % world_size:
        return None  # the batch does not split over the processes: reported on its own
    per_rank = batch_size // world_size
    if per_rank % micro_batch_size:
        where = (f"the per-process batch {per_rank} (batch_size {batch_size} over {world_size} "
                 "processes)" if world_size > 1 else f"batch_size {batch_size}")
        return (f"{key}={micro_batch_size} does not divide {where}: gradient accumulation needs "
                "whole, equal micro-batches")
    return None


@dataclass(frozen=True)
class BertConfig:
    """Text-only BERT stage (MLM on the corpus sentences), for the BERT-init ablation offline."""

    optim: OptimConfig = OptimConfig(lr=1e-4, batch_size=256, epochs=10, warmup=0.05)
    word_mask_rate: float = 0.15


# Both stages that can start from BERT (pretraining, or fine-tuning without it) read it.
BERT_LAYERS = Switch("bert_layers", "BERT layers used for initialisation", "top", "bottom",
                     facts="BERT-init ablation", values="bottom: layers 0-8 (official "
                     "from_pretrained) | top: the top 9 (paper footnote); set with pretrain.bert_layers")


@dataclass(frozen=True)
class PretrainConfig:
    # the five tasks (LXMERT_FACTS.md §2); each switchable
    mask_lm: bool = True
    matched: bool = True
    visual_losses: tuple[str, ...] = VISUAL_LOSSES  # any subset of obj, attr, feat; () = none
    qa: bool = True
    # Fraction of the pretraining epochs run WITHOUT the QA loss, so it scales with any schedule:
    # 0.0 = QA from the start (GitHub version); 0.5 = the paper's P10+QA10 (QA from epoch 10 of 20).
    # The QA loss is on from epoch index round(qa_start * epochs) (0-based).
    qa_start: float = paper_vs_code(0.0, Switch(
        "pretrain.qa_start", "image-QA loss from (fraction of epochs)", 0.5, 0.0,
        facts="QA pretraining", values="0 = QA throughout (GitHub code); 0.5 = P10+QA10 (paper)"))
    qa_weight: float = paper_vs_code(1.0, Switch(
        "pretrain.qa_weight", "image-QA loss weight once it is on", 1.0, 1.0,
        facts="QA pretraining", values="1 (paper, GitHub code); 2 with qa_start 0.5 = the earlier "
        "official code (x0, then x2)"))
    word_mask_rate: float = 0.15
    obj_mask_rate: float = 0.15
    obj_mask_mode: Literal["official", "zero"] = paper_vs_code("official", Switch(
        "pretrain.obj_mask_mode", "object masking", "zero", "official", facts="object masking",
        values="official: 80 % zeroed / 10 % a random feature / 10 % kept | zero: zeroed only"))
    feat_loss: Literal["smooth_l1", "l2"] = paper_vs_code("smooth_l1", Switch(
        "pretrain.feat_loss", "RoI-feature regression loss", "l2", "smooth_l1",
        facts="feature regression loss", values="smooth_l1 | l2"))
    label_targets: Literal["all_confidence", "masked"] = paper_vs_code("all_confidence", Switch(
        "pretrain.label_targets", "label classification targets", "masked", "all_confidence",
        facts="label classification", values="all_confidence: every box, weighted by the "
        "detector's confidence | masked: masked boxes only"))
    # The official constant whatever obj_mask_rate is (plan notes a changed rate with this kept).
    visual_loss_weight: float = paper_vs_code(1 / 0.15, Switch(
        "pretrain.visual_loss_weight", "visual loss weight", 1.0, round(1 / 0.15, 4),
        facts="loss weights", values="1/0.15 (code) | 1 (paper's equal weights)"))
    # Inputs of the MLM / object tasks when they are off: "official" masks words and objects all
    # the same (the official code always does; no loss is taken), "none" leaves them as they are
    # (what stages planned before this field did, so "none" keeps their hashes).
    mask_inactive: Literal["official", "none"] = added_later(
        "official", legacy="none", applies=lambda p: not (p.mask_lm and p.visual_losses),
        switch=(Switch("pretrain.mask_inactive", "masked inputs when the MLM or object tasks are off",
                       "not stated", "official",
                       values="official: words and objects are masked even when the MLM task or "
                       "every visual loss is off, only no loss is taken | none: inputs of tasks "
                       "that are off stay unmasked (what such stages did before the switch)"),))
    # initialisation: "scratch" (paper default) or "bert" (from the BERT stage or a checkpoint)
    init: Literal["scratch", "bert"] = "scratch"
    bert_checkpoint: str | None = None  # HF BERT checkpoint; None with init=bert: the BERT stage
    bert_layers: Literal["bottom", "top"] = paper_vs_code("bottom", BERT_LAYERS)
    train_splits: tuple[str, ...] = ("mscoco_train", "mscoco_nominival", "vgnococo")
    valid_split: str = "mscoco_minival"
    optim: OptimConfig = OptimConfig()
    # false: no pretraining stage; fine-tuning starts from scratch or, with init=bert, from BERT
    # (Table 3's rows). A planner choice: a pretraining stage always has it true, so it never
    # enters a hash.
    enabled: bool = added_later(True)


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "vqa"
    train_splits: tuple[str, ...] = ("train", "nominival")
    valid_split: str = "minival"
    load_qa_head: bool = True  # official --loadLXMERTQA (VQA, GQA)
    loss: Literal["bce", "ce"] = paper_vs_code(
        "bce",
        Switch("finetune.nlvr2.loss", "NLVR² head loss", "bce", "ce", facts="NLVR² head",
               values="ce only: the paper's sigmoid + BCE head is not built (a spec asking for "
               "bce is refused)"),
        Switch("finetune.gqa.loss", "GQA fine-tuning loss", "not stated", "bce",
               facts="GQA fine-tuning loss", values="bce (official) | ce (official --mceLoss)"))
    data_augmentation: bool = False  # Table 4 "DA": add the other QA sets' questions
    # Starting weights when init_from names a BERT stage, or when there is no init_from and
    # init_checkpoint names a BERT / LXMERT checkpoint file (loaded with model.load_weights).
    bert_layers: Literal["bottom", "top"] = paper_vs_code("bottom", BERT_LAYERS)
    init_checkpoint: str | None = None
    optim: OptimConfig = OptimConfig(lr=5e-5, batch_size=32, epochs=4, warmup=0.1, grad_clip=5.0)


# The paper's fine-tuning setup per task (LXMERT_FACTS.md §3).
TASK_DEFAULTS: dict[str, FinetuneConfig] = {
    "vqa": FinetuneConfig(),
    "gqa": FinetuneConfig(
        task="gqa", train_splits=("train", "valid"), valid_split="testdev",
        optim=OptimConfig(lr=1e-5, batch_size=32, epochs=4, warmup=0.1, grad_clip=5.0),
    ),
    "nlvr2": FinetuneConfig(
        task="nlvr2", train_splits=("train",), valid_split="valid", load_qa_head=False, loss="ce",
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """One stage. ``init_from`` names the stage whose weights it starts from, as '<kind>/<hash>'."""

    kind: StageKind = "pretrain"
    seed: int = OFFICIAL_SEED
    model: LxmertConfig = LxmertConfig()
    data: DataConfig = DataConfig()
    bert: BertConfig | None = None
    pretrain: PretrainConfig | None = None
    finetune: FinetuneConfig | None = None
    init_from: str | None = None
    log_every: int = provenance(50)
    checkpoint_every: int = 1000  # steps; also at each epoch end and at the end
    eval_every_epoch: bool = True
    device: str = provenance("auto")  # auto: cuda if available
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile of the training step: auto = "default" on CUDA, "none" on a CPU (there the
    # compile takes minutes and the step is not faster: README, Performance). Also "reduce-overhead"
    # (CUDA graphs) and "max-autotune". The same results within rounding: provenance.
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = provenance("auto")
    tf32: bool = provenance(True)  # CUDA: TF32 tensor cores for fp32 matmuls (not bf16 autocast's)
    # optional trackers fed with what log.jsonl gets (train/trackers.py): TensorBoard event files
    # in <run dir>/tensorboard/ (needs the tensorboard package), a W&B run when wandb is installed
    tensorboard: bool = provenance(False)
    wandb: bool = provenance(False)
    code_version: str = ""  # filled in by the planner

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    # --- identity ------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What decides the result: every field but provenance, and fields added later only when
        they are set away from their defaults (see ``IDENTITY``)."""
        return _identity(self)

    def content_hash(self, length: int = 12) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:length]

    @property
    def stage_id(self) -> str:
        """'<kind>/<hash>': the run's directory under <workdir>/runs/."""
        return f"{self.kind}/{self.content_hash()}"

    @property
    def stage(self) -> BertConfig | PretrainConfig | FinetuneConfig:
        sub = getattr(self, self.kind)
        if sub is None:
            raise ValueError(f"RunConfig of kind {self.kind!r} has no '{self.kind}' section")
        return sub


def _identity(obj: Any) -> Any:
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return _to_jsonable(obj)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        role = f.metadata.get(IDENTITY)
        value = getattr(obj, f.name)
        if role == "never":
            continue
        if role == "unless_default":
            applies = f.metadata.get("applies")
            if value == f.metadata.get("legacy", _default(f)) or (applies and not applies(obj)):
                continue
        out[f.name] = _identity(value)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, d: dict[str, Any], path: str = "", *, check: bool = False) -> Any:
    """Build a (nested) frozen dataclass from plain data, with errors that name the key path.

    ``check``: also check each value against its field's type (see :func:`convert`)."""
    if not isinstance(d, dict):
        raise ConfigTypeError(f"{path or cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"{path or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: convert(hints[k], v, f"{path}.{k}" if path else k, check=check)
              for k, v in d.items()}
    return cls(**kwargs)


class ConfigTypeError(TypeError):
    """A value that does not fit its field's type; the message names the key path."""


def convert(tp: Any, value: Any, path: str = "", *, check: bool = True) -> Any:
    """``value`` as a field of type ``tp`` holds it: the one walker over config types, for
    config.json (``check=False``: the structure only, nested dataclasses and tuples, values kept
    exactly as written so their hashes stay) and for spec overrides (``check=True``: types and
    Literal values checked, ints given for floats made floats, a lone string for a list made a
    one-item list). Raises :class:`ConfigTypeError` naming ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def refuse() -> ConfigTypeError:
        return ConfigTypeError(f"{path}: expected {type_name(tp)}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args or not check:
                return None
            raise refuse()
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, path, check=check)
        for a in inner:
            try:
                return convert(a, value, path, check=check)
            except (ConfigTypeError, KeyError):
                continue
        raise refuse()
    if dataclasses.is_dataclass(tp):
        if check and not isinstance(value, dict):
            raise refuse()
        return from_dict(tp, value, path, check=check)
    if origin is tuple:
        if check and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{path}: expected a list, got {type(value).__name__}")
        inner = args[0] if args and args[0] is not Ellipsis else Any
        return tuple(convert(inner, v, f"{path}[{i}]", check=check) for i, v in enumerate(value))
    if not check:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise refuse()
        return value
    if tp is bool and not isinstance(value, bool):
        raise refuse()
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise refuse()
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise refuse()
        return float(value)
    if tp is str and not isinstance(value, str):
        raise refuse()
    return value


def type_name(tp: Any) -> str:
    """A type as a message says it ('one of 'l2', 'smooth_l1'', 'an integer or null')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def leaf_fields(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every leaf field of a (nested) config dataclass: dotted key -> (type, field)."""
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        section = inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) \
            and len(inner) == 1 else tp
        if dataclasses.is_dataclass(section):
            out.update(leaf_fields(section, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (tp, f)
    return out


def switches() -> tuple[Switch, ...]:
    """Every paper-vs-code switch declared on a config field, in field order, each once."""
    found: dict[str, Switch] = {}
    for _tp, f in leaf_fields(RunConfig).values():
        for sw in f.metadata.get(SWITCH, ()):
            found.setdefault(sw.key, sw)
    return tuple(found.values())
