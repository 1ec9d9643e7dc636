"""Export to a ``transformers`` LXMERT directory (``config.json`` + ``model.safetensors``), which
``LxmertForPreTraining`` / ``LxmertForQuestionAnswering`` / ``LxmertModel.from_pretrained`` read.

- :class:`LxmertForPretraining` -> ``LxmertForPreTraining``, with the HF task flags set to the heads
  the model has (``task_obj_predict`` and the ``visual_*_loss`` flags from its visual losses,
  ``task_qa`` and ``num_qa_labels`` from its answer head), so HF's model has the same modules.
- :class:`LxmertForQuestionAnswering` (VQA / GQA) -> ``LxmertForQuestionAnswering``, with the
  answer strings as ``id2label`` when given.
- :class:`LxmertForNLVR2`: ``transformers`` has no NLVR2 model. The encoder is exported as
  ``LxmertModel`` and our pair head as ``nlvr2_head.safetensors`` (``logit_fc.{0,2,3}.*``; the
  logits are ``logit_fc(cat(pooled(sentence, image0), pooled(sentence, image1)))``, with
  ``logit_fc`` = Linear(2h, 2h) -> GELU -> LayerNorm(eps) -> Linear(2h, 2); what it is is also in
  the file's metadata).

``config.json`` is written without importing ``transformers`` (a test-only dependency): the keys
of its ``LxmertConfig``. The directory holds only files this tool wrote: it must be missing, empty,
or an earlier export (``.lxmert-bench-export.json`` lists its files); anything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lxmert_bench.io import atomic_write_json, atomic_write_with
from lxmert_bench.model.heads import (
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
)
from lxmert_bench.model.lxmert import Lxmert
from lxmert_bench.model.weights import TIED_DECODER, named_tensors

MARKER = ".lxmert-bench-export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NLVR2_HEAD = "nlvr2_head.safetensors"
NLVR2_HEAD_DOC = ("LXMERT NLVR2 head (lxmert-bench): logits[B, 2] = logit_fc(cat(pooled(sentence, "
                  "img0), pooled(sentence, img1))), pooled = LxmertModel(...).pooled_output; "
                  "logit_fc = Sequential(Linear(2h, 2h), GELU, LayerNorm(2h, eps), Linear(2h, 2)); "
                  "label 1 = True")


class ExportDirError(ValueError):
    """A directory the export may not write into (it holds files the tool did not write)."""


def hf_architecture(model: nn.Module) -> str:
    """The ``transformers`` class an exported ``model`` is loaded with."""
    if isinstance(model, LxmertForPretraining):
        return "LxmertForPreTraining"
    if isinstance(model, LxmertForQuestionAnswering):
        return "LxmertForQuestionAnswering"
    if isinstance(model, (Lxmert, LxmertForNLVR2)):
        return "LxmertModel"
    raise TypeError(f"cannot export {type(model).__name__} to HF")


def hf_config_dict(model: nn.Module, id2label: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``model``'s HF counterpart (``transformers.LxmertConfig`` keys)."""
    backbone: Lxmert = model if isinstance(model, Lxmert) else model.bert  # type: ignore[assignment]
    c = backbone.config
    out: dict[str, Any] = {
        "architectures": [hf_architecture(model)], "model_type": "lxmert",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "hidden_act": "gelu", "hidden_dropout_prob": c.hidden_dropout_prob,
        "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
        "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.initializer_range, "layer_norm_eps": c.layer_norm_eps,
        "l_layers": c.l_layers, "x_layers": c.x_layers, "r_layers": c.r_layers,
        "visual_feat_dim": c.visual_feat_dim, "visual_pos_dim": c.visual_pos_dim,
        "num_object_labels": c.num_object_labels, "num_attr_labels": c.num_attr_labels,
        "num_qa_labels": c.num_qa_labels,
        "visual_loss_normalizer": 1 / 0.15,  # the official constant (HF's default rounds it: 6.67)
        "tie_word_embeddings": True,
    }
    if isinstance(model, LxmertForPretraining):
        qa = model.answer_head is not None
        out.update(
            task_mask_lm=model.mask_lm, task_matched=model.matched, task_qa=qa,
            task_obj_predict=bool(model.visual_losses),
            visual_obj_loss="obj" in model.visual_losses,
            visual_attr_loss="attr" in model.visual_losses,
            visual_feat_loss="feat" in model.visual_losses,
        )
        if qa:
            out["num_qa_labels"] = model.answer_head.logit_fc[3].out_features
    elif isinstance(model, LxmertForQuestionAnswering):
        out["num_qa_labels"] = model.logit_fc[3].out_features
        if id2label is not None:
            if len(id2label) != out["num_qa_labels"]:
                raise ValueError(f"{len(id2label)} answer strings for a head of "
                                 f"{out['num_qa_labels']} answers")
            out["id2label"] = {str(i): a for i, a in enumerate(id2label)}
            out["label2id"] = {a: i for i, a in enumerate(id2label)}
    return out


def _owned_files(out: Path) -> set[str] | None:
    """The files an earlier export wrote into ``out`` (None: not an export of this tool)."""
    try:
        listed = json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(listed) if isinstance(listed, list) else None


def export_dir_problem(out: str | Path) -> str | None:
    """Why ``out`` may not receive an export, or None (missing, empty, or only an earlier export's
    files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"{out}: is a file, expected a directory for the HF export"
    if not out.is_dir():
        return None
    found = sorted(p.name for p in out.iterdir())
    if not found:
        return None
    owned = _owned_files(out)
    foreign = [f for f in found if owned is None or (f not in owned and f != MARKER)]
    if not foreign:
        return None
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    why = "files an earlier export did not write" if owned is not None else \
        f"not an export of lxmert-bench (no {MARKER})"
    return (f"{out}: holds {shown} ({why}); refusing to write into it: choose a missing or empty "
            "directory")


def _save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_with(path, lambda f: f.write(data))


def export_hf(model: nn.Module, out: str | Path, id2label: Sequence[str] | None = None,
              source: dict[str, Any] | None = None) -> list[Path]:
    """Write ``model`` as a ``transformers`` LXMERT directory ``out``; returns the files written.

    Every file is written atomically; the marker listing them comes last. Raises
    :class:`ExportDirError` for a directory holding files this tool did not write. ``source``
    (e.g. the run directory and stage id) is recorded in the marker.
    """
    out = Path(out)
    problem = export_dir_problem(out)
    if problem:
        raise ExportDirError(problem)
    backbone = model.bert if isinstance(model, LxmertForNLVR2) else model
    tensors = named_tensors(backbone, official=False)
    tensors.pop(TIED_DECODER, None)  # tied to the word embeddings; HF re-ties it on load
    files: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(out / WEIGHTS, tensors, {"format": "pt"})
    files[WEIGHTS] = out / WEIGHTS
    if isinstance(model, LxmertForNLVR2):
        head = {f"logit_fc.{k}": v.detach().cpu() for k, v in model.logit_fc.state_dict().items()}
        _save_safetensors(out / NLVR2_HEAD, head, {"format": "pt", "what": NLVR2_HEAD_DOC})
        files[NLVR2_HEAD] = out / NLVR2_HEAD
    atomic_write_json(out / CONFIG, hf_config_dict(model, id2label))
    files[CONFIG] = out / CONFIG
    previous = _owned_files(out) or set()
    for stale in previous - set(files):  # an earlier export's file this one does not write
        (out / stale).unlink(missing_ok=True)
    atomic_write_json(out / MARKER, {"files": sorted(files), "architecture": hf_architecture(model),
                                     "source": source or {}})
    return list(files.values())
