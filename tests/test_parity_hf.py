"""Numerical parity with ``transformers``' LXMERT: same random weights (through ``load_weights``),
same inputs, fp32, eval mode.

The base config (768 hidden, 9/5/5 layers) is checked once (batch 2, 20 tokens, 36 objects); the
test preset covers the losses, each task alone and all together, and the gradients.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.initialization import no_init_weights

from lxmert_bench.model import Lxmert, LxmertConfig, LxmertForPretraining, load_weights
from lxmert_bench.model.weights import hf_config

TOL = 1e-5


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (HF's init leaves LayerNorms at 1 / 0 and biases at 0, which
    would hide a swapped LayerNorm or a missing bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "LayerNorm.weight" in name or "layer_norm.weight" in name
                    or name.endswith("logit_fc.2.weight") else 0.05 * noise)


def make_inputs(config: LxmertConfig, batch: int = 2, length: int = 20, objects: int = 36,
                seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3:] = 0  # padded text positions in the last example
    ids = ids * mask
    feats = torch.rand(batch, objects, config.visual_feat_dim, generator=g)
    xy = torch.rand(batch, objects, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(batch, objects, 2, generator=g) * 0.5], -1)
    return {"input_ids": ids, "attention_mask": mask, "feats": feats, "boxes": boxes}


def make_labels(config: LxmertConfig, inputs: dict[str, torch.Tensor], seed: int = 2) -> dict:
    """Official labels (-1 = ignored), some ignored in every task."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, objects = inputs["feats"].shape[:2]
    mlm = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, -1)
    mlm[:, 1] = ids[:, 1]
    feat_mask = (torch.rand(b, objects, generator=g) < 0.15).float()
    feat_mask[:, 0] = 1.0
    return {
        "masked_lm_labels": mlm,
        "obj_labels": {
            "obj": (torch.randint(0, config.num_object_labels, (b, objects), generator=g),
                    torch.rand(b, objects, generator=g)),
            "attr": (torch.randint(0, config.num_attr_labels, (b, objects), generator=g),
                     torch.rand(b, objects, generator=g)),
            "feat": (torch.rand(b, objects, config.visual_feat_dim, generator=g), feat_mask),
        },
        "matched_label": torch.tensor([1, 0] * (b // 2) + [1] * (b % 2)),
        "ans": torch.tensor([3] + [-1] * (b - 1)),  # mismatched / unlabelled pairs are ignored
    }


def ours_forward(model: LxmertForPretraining, inputs: dict, labels: dict) -> dict:
    return model(inputs["input_ids"], inputs["attention_mask"], inputs["feats"], inputs["boxes"],
                 **labels)


def hf_forward(model: transformers.LxmertForPreTraining, inputs: dict, labels: dict):
    """HF ignores -100 where the official code uses -1."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 visual_feats=inputs["feats"], visual_pos=inputs["boxes"],
                 labels=labels["masked_lm_labels"].masked_fill(labels["masked_lm_labels"] < 0, -100),
                 obj_labels=labels["obj_labels"], matched_label=labels["matched_label"],
                 ans=labels["ans"].masked_fill(labels["ans"] < 0, -100))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Base config: backbone outputs and the total pretraining loss
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_pair() -> tuple[transformers.LxmertForPreTraining, LxmertForPretraining]:
    config = LxmertConfig.preset("base")
    with no_init_weights():  # randomize() sets every value below; HF's init would cost seconds
        hf = transformers.LxmertForPreTraining(hf_config(config)).eval()
    hf.tie_weights()  # no_init_weights also skips the tying
    assert hf.cls.predictions.decoder.weight is hf.lxmert.embeddings.word_embeddings.weight
    randomize(hf)
    ours = LxmertForPretraining(config).eval()
    report = load_weights(ours, hf.state_dict(), strict=True)
    assert report.format == "hf_lxmert" and not report.missing and not report.unexpected
    return hf, ours


def test_base_backbone_outputs_match_hf(base_pair) -> None:
    hf, ours = base_pair
    config = ours.config
    assert (config.hidden_size, config.l_layers, config.x_layers, config.r_layers) == (768, 9, 5, 5)
    inputs = make_inputs(config)
    with torch.no_grad():
        lang, visn, pooled = ours.bert(inputs["input_ids"], inputs["attention_mask"], inputs["feats"],
                                       inputs["boxes"])
        ref = hf.lxmert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        visual_feats=inputs["feats"], visual_pos=inputs["boxes"])
    assert lang.shape == (2, 20, 768) and visn.shape == (2, 36, 768) and pooled.shape == (2, 768)
    # outputs of O(1) magnitude: the tolerance is meaningful
    assert lang.abs().mean() > 0.1 and pooled.abs().mean() > 0.01
    assert max_diff(lang, ref.language_output) <= TOL
    assert max_diff(visn, ref.vision_output) <= TOL
    assert max_diff(pooled, ref.pooled_output) <= TOL


def test_base_pretraining_loss_matches_hf(base_pair) -> None:
    hf, ours = base_pair
    inputs = make_inputs(ours.config)
    labels = make_labels(ours.config, inputs)
    with torch.no_grad():
        out = ours_forward(ours, inputs, labels)
        ref = hf_forward(hf, inputs, labels)
    assert set(out["losses"]) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item()))
    # head logits of a few units: relative fp32 rounding
    keep = labels["masked_lm_labels"] != -1  # our decoder runs on the labelled words only
    assert max_diff(out["lm_logits"], ref.prediction_logits[keep]) <= 1e-4
    assert max_diff(out["qa_logits"], ref.question_answering_score) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Test preset: LxmertModel, every task alone and together, gradients
# ---------------------------------------------------------------------------------------------
def test_test_preset_backbone_matches_hf_lxmert_model() -> None:
    config = LxmertConfig.preset("test")
    torch.manual_seed(0)
    hf = transformers.LxmertModel(hf_config(config)).eval()
    randomize(hf, seed=3)
    ours = Lxmert(config).eval()
    report = load_weights(ours, hf.state_dict(), strict=True)
    assert report.format == "hf_lxmert_model"
    inputs = make_inputs(config, batch=3)
    visual_mask = torch.ones(3, 36, dtype=torch.long)
    visual_mask[0, 30:] = 0
    with torch.no_grad():
        for vmask in (None, visual_mask):
            lang, visn, pooled = ours(inputs["input_ids"], inputs["attention_mask"], inputs["feats"],
                                      inputs["boxes"], visual_attention_mask=vmask)
            ref = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     visual_feats=inputs["feats"], visual_pos=inputs["boxes"],
                     visual_attention_mask=vmask)
            assert max_diff(lang, ref.language_output) <= TOL
            assert max_diff(visn, ref.vision_output) <= TOL
            assert max_diff(pooled, ref.pooled_output) <= TOL


TASKS = {  # HF config switches -> our constructor switches
    "all": ({}, {}),
    "mlm": (dict(task_matched=False, task_obj_predict=False, task_qa=False),
            dict(matched=False, visual_losses=(), qa=False)),
    "matched": (dict(task_mask_lm=False, task_obj_predict=False, task_qa=False),
                dict(mask_lm=False, visual_losses=(), qa=False)),
    "qa": (dict(task_mask_lm=False, task_matched=False, task_obj_predict=False),
           dict(mask_lm=False, matched=False, visual_losses=())),
    "obj": (dict(task_mask_lm=False, task_matched=False, task_qa=False, visual_attr_loss=False,
                 visual_feat_loss=False),
            dict(mask_lm=False, matched=False, qa=False, visual_losses=("obj",))),
    "attr+feat": (dict(task_mask_lm=False, task_matched=False, task_qa=False, visual_obj_loss=False),
                  dict(mask_lm=False, matched=False, qa=False, visual_losses=("attr", "feat"))),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_test_preset_losses_and_gradients_match_hf(task: str) -> None:
    hf_switches, our_switches = TASKS[task]
    config = LxmertConfig.preset("test")
    torch.manual_seed(0)
    hf = transformers.LxmertForPreTraining(hf_config(config, **hf_switches)).eval()
    randomize(hf, seed=4)
    ours = LxmertForPretraining(config, **our_switches).eval()
    report = load_weights(ours, hf.state_dict())
    # both leave out the heads of disabled tasks (as the official model does)
    assert not report.unexpected and not report.missing
    inputs = make_inputs(config, batch=4)
    labels = make_labels(config, inputs)
    out = ours_forward(ours, inputs, labels)
    ref = hf_forward(hf, inputs, labels)
    expected = {"all": {"mlm", "matched", "obj", "attr", "feat", "qa"},
                "attr+feat": {"attr", "feat"}}.get(task, {task})
    assert set(out["losses"]) == expected
    assert out["loss"].item() > 0
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-5 * max(1.0, abs(ref.loss.item()))

    out["loss"].backward()
    ref.loss.backward()
    hf_grads = {name.replace("lxmert.", "bert.", 1): p.grad for name, p in hf.named_parameters()}
    compared = 0
    for name, p in ours.named_parameters():
        g_ref = hf_grads.get(name)  # None: a head HF does not build for this task set
        if p.grad is None or g_ref is None:  # parts no active loss reaches (e.g. an unused head)
            assert (p.grad is None or not p.grad.any()) and (g_ref is None or not g_ref.any()), name
            continue
        scale = max(1.0, g_ref.abs().max().item())
        assert max_diff(p.grad, g_ref) <= 1e-5 * scale, name
        compared += 1
    assert compared > 50
    # the tied MLM decoder: one matrix, gradients from both uses (as HF's tied weights)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
