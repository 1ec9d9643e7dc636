"""Loading and saving LXMERT weights: the official checkpoints, HF LXMERT and HF BERT.

Every source is first renamed to the official names (LXMERT_FACTS.md §7): ``bert.*`` for the
backbone, ``cls.*``, ``obj_predict_head.*``, ``answer_head.logit_fc.*`` for the pretraining heads and
``logit_fc.*`` for a task head. Those are also our module names, so the second step only adds the
target's backbone prefix (none for a bare :class:`Lxmert`) and routes the QA head.

Recognised formats (``LoadReport.format``):

- ``official``: ``model_LXRT.pth`` (``module.bert.*``, ``module.cls.*``, ...), with or without
  ``module.``; also what :func:`save_weights` and our training code write (``module.*`` for a
  pretraining model, as the official file).
- ``official_finetuned``: ``BEST.pth`` / ``LAST.pth`` of the official task code
  (``lxrt_encoder.model.[module.]bert.*``, ``logit_fc.*``).
- ``hf_lxmert_model``: HF ``LxmertModel`` (``embeddings.*``, ``encoder.*``, ``pooler.*``).
- ``hf_lxmert``: HF ``LxmertForPreTraining`` / ``LxmertForQuestionAnswering`` (``lxmert.*``, ...).
- ``hf_bert``: HF / original BERT (``[bert.]embeddings.*``, ``[bert.]encoder.layer.N.*``,
  ``[bert.]pooler.*``, ``cls.predictions.*``, ``cls.seq_relationship.*``) into the text embeddings,
  the language encoder and the pooler. ``bert_layers="bottom"`` takes BERT layers 0..l-1 (the
  official code), ``"top"`` the last l layers (the paper's footnote 10).

Usage::

    report = load_weights(model, "snap/pretrained/model_LXRT.pth")
    print(report.summary())
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lxmert_bench.model.config import LxmertConfig
from lxmert_bench.model.heads import (
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
)
from lxmert_bench.model.lxmert import Lxmert

Source = str | os.PathLike | Mapping[str, Tensor]
BertLayers = Literal["bottom", "top"]

FORMATS = ("official", "official_finetuned", "hf_lxmert_model", "hf_lxmert", "hf_bert")
# The tied MLM decoder: in the checkpoints (official torch.save keeps both names, safetensors drops
# the decoder), one parameter in our model.
TIED_DECODER = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
POSITION_EMBEDDINGS = "bert.embeddings.position_embeddings.weight"
QA_HEAD = "answer_head.logit_fc."
TASK_HEAD = "logit_fc."


@dataclass
class LoadReport:
    """What :func:`load_weights` did. Names of ``loaded`` / ``missing`` are the target's; names of
    ``unexpected`` / ``skipped`` are the source's, as stored in the file."""

    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # target tensors left as they were
    unexpected: list[str] = field(default_factory=list)  # source tensors with no place in the target
    skipped: dict[str, str] = field(default_factory=dict)  # source tensor -> why it was not copied
    adapted: dict[str, str] = field(default_factory=dict)  # target tensor -> how it was adapted

    def summary(self, max_names: int = 8) -> str:
        lines = [f"load_weights: format {self.format}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.skipped)} skipped"]

        def names(title: str, items: list[str]) -> None:
            if items:
                shown = ", ".join(items[:max_names])
                more = f", ... (+{len(items) - max_names} more)" if len(items) > max_names else ""
                lines.append(f"  {title}: {shown}{more}")

        names("missing", _compact(self.missing))
        names("unexpected", _compact(self.unexpected))
        reasons: dict[str, list[str]] = {}
        for name, why in self.skipped.items():
            reasons.setdefault(why, []).append(name)
        for why, items in reasons.items():
            names(f"skipped ({why})", _compact(items))
        for name, how in self.adapted.items():
            lines.append(f"  adapted: {name}: {how}")
        return "\n".join(lines)

    __str__ = summary


def _compact(names: list[str]) -> list[str]:
    """One entry per layer or module (``bert.encoder.layer.3.*``) keeps summaries short."""
    out: list[str] = []
    for name in names:
        parts = name.split(".")
        numbered = next((i for i, p in enumerate(parts[:-1]) if p.isdigit()), None)
        cut = numbered + 1 if numbered is not None else min(3, len(parts) - 1)
        short = ".".join(parts[:cut]) + ".*" if cut < len(parts) else name
        if short not in out:
            out.append(short)
    return out


# ---------------------------------------------------------------------------------------------
# Reading a source
# ---------------------------------------------------------------------------------------------
def read_state_dict(source: Source) -> dict[str, Tensor]:
    """A state dict from a file (``.safetensors``; anything else through ``torch.load``), a HF
    ``save_pretrained`` directory, or an in-memory mapping. Wrappers such as our training
    checkpoints (``{"model": state_dict, ...}``) are unwrapped."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if path.is_dir():
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in it")
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            from lxmert_bench.io import load_torch_file

            state = load_torch_file(path)  # weights_only: a refused file is named, nothing runs
    for key in ("model", "state_dict"):
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and not isinstance(state.get("bert.pooler.dense.weight"), Tensor):
            state = inner
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError("the source holds no tensors")
    return tensors


# ---------------------------------------------------------------------------------------------
# Source -> official names
# ---------------------------------------------------------------------------------------------
@dataclass
class _Canonical:
    """The source under official names; ``origin`` maps each official name to the source's name."""

    format: str
    tensors: dict[str, Tensor]
    origin: dict[str, str]
    skipped: dict[str, str]  # source name -> reason (e.g. BERT layers that are not used)
    unexpected: list[str]


def detect_format(state: Mapping[str, Tensor]) -> str:
    """One of :data:`FORMATS`; ValueError for anything else."""
    keys = [k.removeprefix("module.") for k in state]
    if any(k.startswith("lxrt_encoder.") for k in keys):
        return "official_finetuned"
    if any(k.startswith("bert.encoder.visn_fc.") for k in keys):
        return "official"
    if any(k.startswith("lxmert.encoder.visn_fc.") for k in keys):
        return "hf_lxmert"
    if any(k.startswith("encoder.visn_fc.") for k in keys):
        return "hf_lxmert_model"
    if any(re.match(r"(bert\.)?encoder\.layer\.\d+\.", k) for k in keys):
        return "hf_bert"
    raise ValueError("unrecognised checkpoint: no LXMERT visual encoder (encoder.visn_fc.*) and no "
                     f"BERT layers (encoder.layer.N.*); first keys: {keys[:5]}")


def canonical_state_dict(source: Source, *, bert_layers: BertLayers = "bottom",
                         num_language_layers: int | None = None) -> _Canonical:
    """Rename a source to the official names (see the module docstring).

    ``num_language_layers`` (the target's ``l_layers``) is needed only for BERT sources.
    """
    if bert_layers not in ("bottom", "top"):
        raise ValueError(f"bert_layers must be 'bottom' or 'top', got {bert_layers!r}")
    state = read_state_dict(source)
    fmt = detect_format(state)
    out = _Canonical(fmt, {}, {}, {}, [])
    if fmt == "hf_bert":
        if num_language_layers is None:
            raise ValueError("loading BERT needs the target's number of language layers")
        _bert_to_official(state, out, bert_layers, num_language_layers)
        return out
    for key, value in state.items():
        name = key.removeprefix("module.")
        if fmt == "official_finetuned":
            # lxrt_encoder.model.bert.* / lxrt_encoder.model.module.bert.* (--multiGPU)
            name = name.removeprefix("lxrt_encoder.model.").removeprefix("module.")
        elif fmt == "hf_lxmert":
            name = "bert." + name.removeprefix("lxmert.") if name.startswith("lxmert.") else name
        elif fmt == "hf_lxmert_model":
            name = "bert." + name
        out.tensors[name] = value
        out.origin[name] = key
    _untie(out)
    return out


_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def _bert_to_official(state: Mapping[str, Tensor], out: _Canonical, bert_layers: BertLayers,
                      num_layers: int) -> None:
    """BERT -> ``bert.embeddings.*``, ``bert.encoder.layer.i.*`` (chosen layers), ``bert.pooler.*``
    and ``cls.*``, as the official ``from_pretrained`` fills ``LXRTPretraining``."""
    renamed: dict[str, str] = {}
    for key in state:
        name = key.removeprefix("module.").removeprefix("bert.")
        # TF-converted BERT checkpoints name LayerNorm parameters gamma / beta
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        renamed[key] = name
    depth = 1 + max(int(m.group(1)) for n in renamed.values() if (m := _BERT_LAYER.match(n)))
    if num_layers > depth:
        raise ValueError(f"the BERT checkpoint has {depth} layers, the target's language encoder "
                         f"needs {num_layers}")
    first = 0 if bert_layers == "bottom" else depth - num_layers  # BERT layer loaded as our layer 0
    for key, name in renamed.items():
        layer = _BERT_LAYER.match(name)
        if layer:
            index = int(layer.group(1)) - first
            if not 0 <= index < num_layers:
                out.skipped[key] = f"BERT layer not used (bert_layers={bert_layers!r})"
                continue
            target = f"bert.encoder.layer.{index}.{layer.group(2)}"
        elif name.startswith(("embeddings.", "pooler.")):
            target = "bert." + name
        elif name.startswith(("cls.predictions.", "cls.seq_relationship.")):
            target = name
        else:
            out.unexpected.append(key)
            continue
        out.tensors[target] = state[key]
        out.origin[target] = key
    # Newer HF BERT stores the MLM bias twice (cls.predictions.decoder.bias is the same tensor).
    decoder_bias = "cls.predictions.decoder.bias"
    if decoder_bias in out.tensors:
        if "cls.predictions.bias" in out.tensors:
            out.skipped[out.origin.pop(decoder_bias)] = "same tensor as cls.predictions.bias"
            del out.tensors[decoder_bias]
        else:
            out.tensors["cls.predictions.bias"] = out.tensors.pop(decoder_bias)
            out.origin["cls.predictions.bias"] = out.origin.pop(decoder_bias)
    _untie(out)


def _untie(out: _Canonical) -> None:
    """Keep one copy of the tied word embedding / MLM decoder matrix (the embedding's)."""
    if TIED_DECODER not in out.tensors:
        return
    if WORD_EMBEDDINGS in out.tensors:  # the same matrix: loaded through the embedding
        del out.tensors[TIED_DECODER], out.origin[TIED_DECODER]
    else:  # only the decoder was stored: it IS the embedding matrix
        out.tensors[WORD_EMBEDDINGS] = out.tensors.pop(TIED_DECODER)
        out.origin[WORD_EMBEDDINGS] = out.origin.pop(TIED_DECODER)


# ---------------------------------------------------------------------------------------------
# Official names -> the target model
# ---------------------------------------------------------------------------------------------
TargetModel = Lxmert | LxmertForPretraining | LxmertForQuestionAnswering | LxmertForNLVR2


def _backbone_prefix(model: nn.Module) -> str:
    if isinstance(model, Lxmert):
        return ""
    if isinstance(getattr(model, "bert", None), Lxmert):
        return "bert."
    raise TypeError(f"expected Lxmert or a model with a .bert Lxmert backbone, got {type(model).__name__}")


def _target_name(name: str, model: nn.Module, prefix: str) -> str | None:
    """Where an official name goes in ``model`` (None: nowhere)."""
    if name.startswith("bert."):
        return prefix + name.removeprefix("bert.")
    if isinstance(model, Lxmert):
        return None
    # The QA head: the pretraining model's answer_head.logit_fc, a VQA / GQA model's logit_fc
    # (official load_lxmert_qa). NLVR2's logit_fc reads two pooled outputs: no answer head fits it.
    if name.startswith(QA_HEAD):
        if isinstance(model, LxmertForQuestionAnswering):
            return TASK_HEAD + name.removeprefix(QA_HEAD)
        return name if isinstance(model, LxmertForPretraining) else None
    if name.startswith(TASK_HEAD):
        if isinstance(model, LxmertForPretraining):
            return QA_HEAD + name.removeprefix(TASK_HEAD)
        return name
    return name


def _is_qa_head(target: str) -> bool:
    return target.startswith((QA_HEAD, TASK_HEAD))


def load_weights(model: nn.Module, source: Source, *, bert_layers: BertLayers = "bottom",
                 strict: bool = False, heads: bool = True) -> LoadReport:
    """Copy the weights of ``source`` into ``model`` (in place, with ``copy_``, so the tied MLM
    decoder stays tied) and report what happened.

    - ``model``: :class:`Lxmert`, :class:`LxmertForPretraining`, :class:`LxmertForQuestionAnswering`
      or :class:`LxmertForNLVR2`.
    - ``source``: a path (``.pth`` / ``.bin`` / ``.pt`` via ``torch.load(weights_only=True)``,
      ``.safetensors``, a HF model directory) or a state dict; any format of the module docstring.
    - ``bert_layers``: which BERT layers fill the language encoder (BERT sources only).
    - ``strict``: raise ValueError when anything is missing or unexpected.
    - ``heads``: False loads the backbone only (official ``--loadLXMERT``).

    A shape mismatch raises ValueError naming the tensor and both shapes, before anything is
    copied. Two rules adapt shapes instead: a longer position table keeps its first rows (BERT's 512
    positions into a small model), and a QA head with a different number of answers (9500
    pretraining answers vs 3129 VQA answers) is skipped whole: the fine-tuning code transfers its
    rows (:func:`transfer_qa_head`).
    """
    prefix = _backbone_prefix(model)
    backbone: Lxmert = model if prefix == "" else model.bert  # type: ignore[assignment]
    src = canonical_state_dict(source, bert_layers=bert_layers,
                               num_language_layers=backbone.config.l_layers)
    report = LoadReport(src.format, unexpected=list(src.unexpected), skipped=dict(src.skipped))

    own = dict(model.state_dict(keep_vars=True))
    # Aliases (the tied decoder) are filled through their first name.
    first_name: dict[int, str] = {}
    for name, tensor in own.items():
        first_name.setdefault(id(tensor), name)
    aliases = {name for name, tensor in own.items() if first_name[id(tensor)] != name}

    plan: list[tuple[str, str, Tensor]] = []  # (target name, source name, value) after every check
    qa_mismatch: list[tuple[str, str, torch.Size, torch.Size]] = []
    for name, value in src.tensors.items():
        origin = src.origin[name]
        target = _target_name(name, model, prefix)
        if target is None or target not in own:
            report.unexpected.append(origin)
            continue
        if not heads and not target.startswith(prefix):  # prefix is "bert." when there are heads
            report.skipped[origin] = "heads=False"
            continue
        target = first_name[id(own[target])]
        have = own[target].shape
        if value.shape != have:
            if _is_qa_head(target):
                qa_mismatch.append((target, origin, value.shape, have))
            elif name == POSITION_EMBEDDINGS and value.shape[0] > have[0] and value.shape[1:] == have[1:]:
                report.adapted[target] = f"first {have[0]} of {value.shape[0]} positions"
                value = value[: have[0]]
            else:
                raise ValueError(f"shape mismatch for {target} (from {origin}): checkpoint "
                                 f"{tuple(value.shape)}, model {tuple(have)}")
        plan.append((target, origin, value))

    if qa_mismatch:
        # Only a different answer table is tolerated (the output layer's rows); the whole QA head
        # then stays as it is, since the official transfer copies it together with the rows.
        for target, origin, got, have in qa_mismatch:
            if not re.search(r"\.3\.(weight|bias)$", target) or got[1:] != have[1:]:
                raise ValueError(f"shape mismatch for {target} (from {origin}): checkpoint "
                                 f"{tuple(got)}, model {tuple(have)}")
        why = (f"QA head has {qa_mismatch[0][2][0]} answers, the model {qa_mismatch[0][3][0]}: "
               "transfer rows with transfer_qa_head")
        for target, origin, _ in plan:
            if _is_qa_head(target):
                report.skipped[origin] = why
        plan = [entry for entry in plan if not _is_qa_head(entry[0])]

    loaded = {target for target, _, _ in plan}
    report.missing = [n for n in own if n not in loaded and n not in aliases]
    if strict and (report.missing or report.unexpected):
        raise ValueError("strict load_weights: " + report.summary())
    with torch.no_grad():
        for target, _, value in plan:
            own[target].copy_(value)
    # the tied decoder counts as loaded with the word embeddings
    report.loaded = [n for n in own if first_name[id(own[n])] in loaded]
    return report


def transfer_qa_head(model: LxmertForQuestionAnswering, source: Source, task_rows: list[int],
                     pretrain_rows: list[int], pretrain_answers: int | None = None) -> None:
    """The official ``load_lxmert_qa``: copy the pretrained QA head's hidden layers whole and, for
    the output layer, pretrained row ``pretrain_rows[i]`` into task row ``task_rows[i]``; the other
    task rows (answers missing from the pretraining table) are zeroed, weight and bias.

    Rows come from ``lxmert_bench.data.answers.qa_head_transfer_rows``; ``pretrain_answers`` (the
    size of the pretraining answer table the rows index) is checked against the head when given.
    """
    where = source if isinstance(source, (str, os.PathLike)) else "the source weights"
    if len(task_rows) != len(pretrain_rows):
        raise ValueError(f"{len(task_rows)} task rows but {len(pretrain_rows)} pretraining rows")
    src = canonical_state_dict(source, num_language_layers=model.bert.config.l_layers).tensors
    head = {n.removeprefix(QA_HEAD): v for n, v in src.items() if n.startswith(QA_HEAD)}
    if not head:
        head = {n.removeprefix(TASK_HEAD): v for n, v in src.items() if n.startswith(TASK_HEAD)}
    own = dict(model.logit_fc.state_dict(keep_vars=True))
    if not head:
        raise ValueError(f"{where}: no pretrained QA head ({QA_HEAD}*); set "
                         "finetune.load_qa_head: false")
    if set(head) != set(own):
        raise ValueError(f"{where}: no complete QA head (found {sorted(head)})")
    if pretrain_answers is not None and head["3.weight"].shape[0] != pretrain_answers:
        raise ValueError(f"{where}: the QA head has {head['3.weight'].shape[0]} answers but the "
                         f"answer table lxmert/all_ans.json has {pretrain_answers}; they must match")
    with torch.no_grad():
        for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
            if head[name].shape != own[name].shape:
                raise ValueError(f"shape mismatch for logit_fc.{name}: checkpoint "
                                 f"{tuple(head[name].shape)}, model {tuple(own[name].shape)}")
            own[name].copy_(head[name])
        rows = torch.tensor(task_rows, dtype=torch.long)
        src_rows = torch.tensor(pretrain_rows, dtype=torch.long)
        for name in ("3.weight", "3.bias"):
            new = torch.zeros_like(own[name])
            new[rows] = head[name][src_rows].to(new)
            own[name].copy_(new)


def hf_config(config: LxmertConfig, **overrides: object):  # -> transformers.LxmertConfig
    """The ``transformers.LxmertConfig`` of the same architecture (tests and benchmarks; HF's
    visual loss normaliser set to the official 1/0.15 instead of its rounded 6.67)."""
    import transformers  # test-only dependency

    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        l_layers=config.l_layers, x_layers=config.x_layers, r_layers=config.r_layers,
        visual_feat_dim=config.visual_feat_dim, visual_pos_dim=config.visual_pos_dim,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, initializer_range=config.initializer_range,
        num_object_labels=config.num_object_labels, num_attr_labels=config.num_attr_labels,
        num_qa_labels=config.num_qa_labels, hidden_act="gelu", visual_loss_normalizer=1 / 0.15,
    )
    kwargs.update(overrides)
    return transformers.LxmertConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def named_tensors(model: nn.Module, official: bool = True) -> dict[str, Tensor]:
    """``model``'s weights on the CPU under the names :func:`save_weights` writes (official, or HF
    with ``official=False``); tensors shared in the model (the tied decoder) stay one tensor under
    both names. The HF export (``model/hf.py``) writes these too."""
    prefix = _backbone_prefix(model)
    out: dict[str, Tensor] = {}
    cpu: dict[int, Tensor] = {}  # one CPU copy per shared storage (the tied decoder on GPU)
    for name, tensor in model.state_dict().items():
        name = "bert." + name if prefix == "" else name
        if not official:
            if isinstance(model, LxmertForNLVR2):
                raise ValueError("HF has no NLVR2 model: save it with official=True")
            if isinstance(model, Lxmert):
                name = name.removeprefix("bert.")
            else:
                name = "lxmert." + name.removeprefix("bert.") if name.startswith("bert.") else name
                if isinstance(model, LxmertForQuestionAnswering) and name.startswith(TASK_HEAD):
                    name = QA_HEAD + name.removeprefix(TASK_HEAD)
        if official and isinstance(model, LxmertForPretraining):
            name = "module." + name
        key = tensor.data_ptr()
        if key not in cpu:
            cpu[key] = tensor.detach().cpu()
        out[name] = cpu[key]
    return out


def save_weights(model: nn.Module, path: str | os.PathLike, official: bool = True) -> Path:
    """Write ``model``'s weights: official names (``bert.*``, ``cls.*``, ``obj_predict_head.*``,
    ``answer_head.*`` / ``logit_fc.*``) or, with ``official=False``, HF names (``lxmert.*`` and
    ``answer_head.logit_fc.*``; no prefix for a bare backbone).

    An official pretraining model is written as the official ``model_LXRT.pth`` is, with every key
    under ``module.`` (its ``nn.DataParallel``): ``LXMERT.load_lxmert`` keeps only such keys.

    ``.safetensors`` files drop the tied decoder (safetensors refuses shared tensors; loading re-ties
    it); other suffixes use ``torch.save``, which stores the shared matrix once.
    """
    out = named_tensors(model, official)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        out.pop(TIED_DECODER, None)
        out.pop("module." + TIED_DECODER, None)
        save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    else:
        torch.save(out, path)
    return path
