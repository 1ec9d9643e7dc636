"""Our pretraining checkpoints in the layout the official tools read (issue 12).

The official code (LXMERT_FACTS.md §7) saves ``LXRTPretraining`` wrapped in ``nn.DataParallel``
(keys ``module.*``). Its rules, emulated here since the official code is not installable:
- ``LXMERT.load_lxmert``: drop every key containing ``answer``, keep ONLY the keys starting with
  ``module.`` (prefix stripped), then ``load_state_dict(strict=False)``;
- ``load``: a strict ``load_state_dict`` into the DataParallel model built with the same flags,
  which has ``cls`` always, ``obj_predict_head`` only with object prediction (decoders for the
  chosen visual losses) and ``answer_head`` only with the QA task.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lxmert_bench.model import LxmertConfig, LxmertForPretraining, load_weights, save_weights

CONFIG = LxmertConfig.preset("test", num_qa_labels=12)
MLM = {"cls.predictions.bias", "cls.predictions.decoder.weight",
       *(f"cls.predictions.transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in ("weight", "bias"))}
MATCH = {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
OBJ_TRANSFORM = {f"obj_predict_head.transform.{m}.{p}" for m in ("dense", "LayerNorm")
                 for p in ("weight", "bias")}
QA = {f"answer_head.logit_fc.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}


def official_head_keys(visual_losses: tuple[str, ...], qa: bool) -> set[str]:
    """The head tensors of the official LXRTPretraining built with these flags."""
    keys = MLM | MATCH
    if visual_losses:
        keys |= OBJ_TRANSFORM | {f"obj_predict_head.decoder_dict.{v}.{p}" for v in visual_losses
                                 for p in ("weight", "bias")}
    return keys | (QA if qa else set())


def official_load_lxmert(model: torch.nn.Module, path: Path) -> set[str]:
    """The official load_lxmert's rules; returns the model keys it left unloaded."""
    state = torch.load(path, weights_only=True)
    state = {k: v for k, v in state.items() if "answer" not in k}
    state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    result = model.load_state_dict(state, strict=False)
    return set(result.missing_keys)


FLAGS = [((), False), (("obj", "attr", "feat"), True), (("feat",), False), ((), True),
         (("obj", "attr"), True)]


@pytest.mark.parametrize("visual_losses,qa", FLAGS)
def test_we_build_only_the_heads_the_flags_ask_for(visual_losses, qa):
    model = LxmertForPretraining(CONFIG, visual_losses=visual_losses, qa=qa)
    heads = {k for k in model.state_dict() if not k.startswith("bert.")}
    assert heads == official_head_keys(visual_losses, qa)


@pytest.mark.parametrize("visual_losses,qa", FLAGS)
def test_official_loaders_read_our_checkpoints(tmp_path, visual_losses, qa):
    torch.manual_seed(0)
    ours = LxmertForPretraining(CONFIG, visual_losses=visual_losses, qa=qa)
    path = save_weights(ours, tmp_path / "Epoch20_LXRT.pth")
    state = torch.load(path, weights_only=True)
    assert state and all(k.startswith("module.") for k in state)
    # load_lxmert: everything but the answer head arrives
    torch.manual_seed(1)
    official = LxmertForPretraining(CONFIG, visual_losses=visual_losses, qa=qa)
    missing = official_load_lxmert(official, path)
    assert missing == (QA if qa else set())
    assert torch.equal(official.bert.encoder.x_layers[0].visual_attention.att.key.weight,
                       ours.bert.encoder.x_layers[0].visual_attention.att.key.weight)
    # strict load into the DataParallel model built with the same flags
    torch.manual_seed(2)
    wrapped = torch.nn.DataParallel(LxmertForPretraining(CONFIG, visual_losses=visual_losses, qa=qa))
    wrapped.load_state_dict(state, strict=True)
    # and we read our own layout back, strictly
    again = LxmertForPretraining(CONFIG, visual_losses=visual_losses, qa=qa)
    report = load_weights(again, path, strict=True)
    assert report.format == "official" and not report.missing


def test_without_module_prefix_still_read(tmp_path):
    ours = LxmertForPretraining(CONFIG)
    path = tmp_path / "plain.pth"
    torch.save(ours.state_dict(), path)  # the older layout: no module.
    assert not load_weights(LxmertForPretraining(CONFIG), path, strict=True).missing
    # official checkpoint with every head into a model without QA / visual heads: reported unexpected
    full = save_weights(ours, tmp_path / "full.pth")
    report = load_weights(LxmertForPretraining(CONFIG, visual_losses=(), qa=False), full)
    assert not report.missing
    assert {"module.answer_head.logit_fc.3.weight", "module.obj_predict_head.transform.dense.weight"} \
        <= set(report.unexpected)
