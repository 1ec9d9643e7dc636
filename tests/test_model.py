"""The LXMERT model: sizes, pretraining task switches, the official loss normalisation by hand,
the shared cross-attention, the NLVR² head, dropout and bf16."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lxmert_bench.model import (
    Lxmert,
    LxmertConfig,
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
)
from lxmert_bench.model.lxmert import CrossAttentionBlock

CONFIG = LxmertConfig.preset("test", num_qa_labels=10)
OBJECTS = 5


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once


def inputs(batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    xy = torch.rand(batch, OBJECTS, 2, generator=g) * 0.5
    return {"input_ids": ids * mask, "attention_mask": mask,
            "feats": torch.rand(batch, OBJECTS, CONFIG.visual_feat_dim, generator=g),
            "boxes": torch.cat([xy, xy + 0.4], -1)}


def labels(x: dict[str, torch.Tensor], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, length = x["input_ids"].shape
    mlm = torch.full((b, length), -1)
    mlm[:, 1:3] = x["input_ids"][:, 1:3]
    feat_mask = torch.zeros(b, OBJECTS)
    feat_mask[:, :2] = 1
    return {
        "masked_lm_labels": mlm,
        "matched_label": torch.tensor([1, 0] * (b // 2)),
        "ans": torch.tensor([4, -1] * (b // 2)),
        "obj_labels": {
            "obj": (torch.randint(0, CONFIG.num_object_labels, (b, OBJECTS), generator=g),
                    torch.rand(b, OBJECTS, generator=g)),
            "attr": (torch.randint(0, CONFIG.num_attr_labels, (b, OBJECTS), generator=g),
                     torch.rand(b, OBJECTS, generator=g)),
            "feat": (torch.rand(b, OBJECTS, CONFIG.visual_feat_dim, generator=g), feat_mask),
        },
    }


def run(model: LxmertForPretraining, x: dict, y: dict, **kwargs) -> dict:
    return model(x["input_ids"], x["attention_mask"], x["feats"], x["boxes"], **y, **kwargs)


# ---------------------------------------------------------------------------------------------
# Sizes (LXMERT_FACTS.md §1)
# ---------------------------------------------------------------------------------------------
def test_base_parameter_counts() -> None:
    base = LxmertConfig.preset("base")
    with torch.device("meta"):  # shapes only
        backbone = Lxmert(base)
        pretrain = LxmertForPretraining(base, num_answers=9500)
        vqa = LxmertForQuestionAnswering(base, 3129)
        gqa = LxmertForQuestionAnswering(base, 1842)
        nlvr2 = LxmertForNLVR2(base)
    assert unique_params(backbone) == 207_936_768
    assert unique_params(backbone.embeddings) == 23_837_184
    assert unique_params(backbone.encoder.layer[0]) == 7_087_872
    assert unique_params(backbone.encoder.x_layers[0]) == 16_539_648
    assert unique_params(backbone.encoder.visn_fc) == 1_580_544
    # the MLM decoder is the word embedding matrix: counted once
    assert unique_params(pretrain) == 228_051_752
    assert unique_params(vqa) == 213_930_297
    assert unique_params(gqa) == 211_952_178
    assert unique_params(nlvr2) == 210_303_746


# ---------------------------------------------------------------------------------------------
# Task switches: any subset runs forward + backward, only its losses appear
# ---------------------------------------------------------------------------------------------
VISUAL_SUBSETS = [s for n in range(4) for s in itertools.combinations(("obj", "attr", "feat"), n)]
HEAD_PARAM = {
    "mlm": "cls.predictions.transform.dense.weight",
    "matched": "cls.seq_relationship.weight",
    "qa": "answer_head.logit_fc.0.weight",
    "obj": "obj_predict_head.decoder_dict.obj.weight",
    "attr": "obj_predict_head.decoder_dict.attr.weight",
    "feat": "obj_predict_head.decoder_dict.feat.weight",
}


TEXT_SWITCHES = list(itertools.product([True, False], repeat=3))  # (mlm, matched, qa)
# Every visual subset and every (mlm, matched, qa) setting, each twice, in 16 runs (a full product
# would be 64); the pairing includes nothing active at all and everything active.
CASES = [(v, *t) for v, t in zip(VISUAL_SUBSETS, TEXT_SWITCHES[::-1])] + \
    [(v, *t) for v, t in zip(VISUAL_SUBSETS, TEXT_SWITCHES)]


@pytest.mark.parametrize("visual, mlm, matched, qa", CASES,
                         ids=lambda v: ("+".join(v) or "none") if isinstance(v, tuple) else str(v))
def test_every_task_subset_runs_with_only_its_losses(visual: tuple[str, ...], mlm: bool,
                                                     matched: bool, qa: bool) -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(CONFIG, visual_losses=visual, mask_lm=mlm, matched=matched, qa=qa)
    if visual:
        assert set(model.obj_predict_head.decoder_dict) == set(visual)
    else:  # as the official model: no object head without object prediction
        assert model.obj_predict_head is None
    assert (model.answer_head is None) == (not qa)
    x = inputs()
    out = run(model, x, labels(x))
    active = {*visual} | {k for k, on in (("mlm", mlm), ("matched", matched), ("qa", qa)) if on}
    assert set(out["losses"]) == active
    if not active:
        assert "loss" not in out
        return
    assert torch.allclose(out["loss"], sum(out["losses"].values()))
    assert all(torch.isfinite(v) and v > 0 for v in out["losses"].values())
    out["loss"].backward()
    params = dict(model.named_parameters())
    for task, name in HEAD_PARAM.items():
        if task in active:
            assert params[name].grad is not None and params[name].grad.any(), task
        elif name in params:
            assert params[name].grad is None, task
    assert model.bert.encoder.x_layers[0].visual_attention.att.query.weight.grad is not None


def test_unknown_visual_loss_rejected() -> None:
    with pytest.raises(ValueError, match="unknown visual loss"):
        LxmertForPretraining(CONFIG, visual_losses=("obj", "color"))


# ---------------------------------------------------------------------------------------------
# The official loss normalisation, by hand
# ---------------------------------------------------------------------------------------------
def test_visual_losses_by_hand() -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(CONFIG).eval()
    x = inputs()
    y = labels(x)
    out = run(model, x, y)
    logits = out["visual_logits"]
    boxes = 2 * OBJECTS
    for key in ("obj", "attr"):
        target, conf = y["obj_labels"][key]
        logp = logits[key].log_softmax(-1)
        per_box = -logp.gather(-1, target[..., None])[..., 0]  # CE on EVERY box, masked or not
        expected = (per_box * conf).sum() / boxes / 0.15  # mean over all B x 36 boxes, x 1/0.15
        assert torch.allclose(out["losses"][key], expected, rtol=1e-5), key
    target, mask = y["obj_labels"]["feat"]
    d = (logits["feat"] - target).abs()
    smooth_l1 = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean(-1)  # SmoothL1, beta 1 ("l2" in OFF)
    expected = (smooth_l1 * mask).sum() / boxes / 0.15
    assert torch.allclose(out["losses"]["feat"], expected, rtol=1e-5)
    # only masked objects count for the feature loss
    changed = {k: v for k, v in y["obj_labels"].items()}
    changed["feat"] = (target + 100 * (1 - mask)[..., None], mask)
    again = run(model, x, {**y, "obj_labels": changed})
    assert torch.allclose(again["losses"]["feat"], out["losses"]["feat"])
    # the paper's L2: a different value, the squared error
    l2 = run(model, x, y, feat_loss="l2")["losses"]["feat"]
    expected_l2 = (((logits["feat"] - target) ** 2).mean(-1) * mask).sum() / boxes / 0.15
    assert torch.allclose(l2, expected_l2, rtol=1e-5)
    assert not torch.allclose(l2, out["losses"]["feat"])
    with pytest.raises(ValueError, match="feat_loss"):
        run(model, x, y, feat_loss="l1")
    # MLM: mean CE over the labelled tokens only; with labels the decoder runs on those alone
    mlm = y["masked_lm_labels"]
    keep = mlm != -1
    assert torch.equal(out["lm_labels"], mlm[keep])
    with torch.no_grad():
        full = model(x["input_ids"], x["attention_mask"], x["feats"], x["boxes"])["lm_logits"]
    assert full.shape == (2, 7, CONFIG.vocab_size)
    assert torch.allclose(out["lm_logits"], full[keep], atol=1e-5)
    expected = F.cross_entropy(full[keep], mlm[keep])
    assert torch.allclose(out["losses"]["mlm"], expected, rtol=1e-5)
    # no labelled word at all: 0, not NaN
    none = run(model, x, {**y, "masked_lm_labels": torch.full_like(mlm, -1)})
    assert none["losses"]["mlm"].item() == 0.0
    # the dense decoder (static shapes, for torch.compile) gives the same loss on all positions
    model.sparse_mlm = False
    dense = run(model, x, y)
    assert dense["lm_logits"].shape == (2, 7, CONFIG.vocab_size)
    assert torch.allclose(dense["losses"]["mlm"], out["losses"]["mlm"], rtol=1e-5)
    assert torch.allclose(dense["loss"], out["loss"], rtol=1e-5)


def test_qa_with_every_answer_ignored_is_zero_with_finite_grads() -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(CONFIG, visual_losses=(), mask_lm=False, matched=False)
    x = inputs()
    out = run(model, x, {"ans": torch.full((2,), -1)})
    assert out["losses"]["qa"].item() == 0.0 and not torch.isnan(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# The cross-modality layer
# ---------------------------------------------------------------------------------------------
def test_one_cross_attention_shared_by_both_directions() -> None:
    torch.manual_seed(0)
    model = Lxmert(CONFIG).eval()
    for layer in model.encoder.x_layers:
        cross = [n for n, m in layer.named_modules() if isinstance(m, CrossAttentionBlock)]
        assert cross == ["visual_attention"]
    assert not any("lang_attention" in n for n, _ in model.named_parameters())
    # one call per layer covers both directions (text and objects concatenated, block mask)...
    calls: list[tuple[int, int]] = []
    layer = model.encoder.x_layers[0]
    handle = layer.visual_attention.register_forward_hook(
        lambda mod, args, out: calls.append((args[0].shape[1], args[1].shape[1])))
    x = inputs()
    with torch.no_grad():
        model(**{k: x[k] for k in ("input_ids", "attention_mask", "feats", "boxes")})
    handle.remove()
    assert calls == [(7 + OBJECTS, 7 + OBJECTS)] * CONFIG.x_layers
    # ... and equals the official two calls: text over objects, objects over text (with padding)
    lang_in, visn_in = torch.randn(2, 7, 32), torch.randn(2, OBJECTS, 32)
    lang_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()[:, None, None, :]
    visn_mask = torch.tensor([[1] * OBJECTS, [1] * 3 + [0] * 2]).bool()[:, None, None, :]
    with torch.no_grad():
        for lm, vm in ((None, None), (lang_mask, None), (lang_mask, visn_mask)):
            got_lang, got_visn = layer.cross_attention(lang_in, lm, visn_in, vm)
            ref_lang, ref_visn = layer.cross_attention_by_direction(lang_in, lm, visn_in, vm)
            assert torch.allclose(got_lang, layer.visual_attention(lang_in, visn_in, vm), atol=1e-6)
            assert torch.allclose(got_visn, layer.visual_attention(visn_in, lang_in, lm), atol=1e-6)
            assert torch.allclose(got_lang, ref_lang, atol=1e-6)
            assert torch.allclose(got_visn, ref_visn, atol=1e-6)
    # perturbing it changes both outputs; perturbing the language self-attention only one
    with torch.no_grad():
        ref_lang, ref_visn = layer(lang_in, None, visn_in, None)
        layer.visual_attention.att.query.weight.add_(torch.randn(32, 32))
        new_lang, new_visn = layer(lang_in, None, visn_in, None)
        assert not torch.allclose(new_lang, ref_lang) and not torch.allclose(new_visn, ref_visn)
        layer.lang_self_att.self.value.weight.add_(torch.randn(32, 32))
        lang2, visn2 = layer(lang_in, None, visn_in, None)
        assert not torch.allclose(lang2, new_lang) and torch.equal(visn2, new_visn)


def test_nlvr2_pairs_the_sentence_with_each_image() -> None:
    torch.manual_seed(0)
    model = LxmertForNLVR2(CONFIG).eval()
    x = inputs(batch=3)
    g = torch.Generator().manual_seed(5)
    feats = torch.rand(3, 2, OBJECTS, CONFIG.visual_feat_dim, generator=g)
    boxes = torch.rand(3, 2, OBJECTS, 4, generator=g)
    with torch.no_grad():
        logits = model(x["input_ids"], x["attention_mask"], feats, boxes)
        pooled = [model.bert(x["input_ids"], x["attention_mask"], feats[:, i], boxes[:, i])[2]
                  for i in (0, 1)]
        expected = model.logit_fc(torch.cat(pooled, dim=-1))  # [x_img0; x_img1]
    assert logits.shape == (3, 2)
    assert torch.allclose(logits, expected, atol=1e-6)
    # the image order matters (not a symmetric pooling)
    with torch.no_grad():
        swapped = model(x["input_ids"], x["attention_mask"], feats.flip(1), boxes.flip(1))
    assert not torch.allclose(swapped, logits)


# ---------------------------------------------------------------------------------------------
# Dropout, bf16
# ---------------------------------------------------------------------------------------------
def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(CONFIG)
    x = inputs()
    y = labels(x)
    model.eval()
    with torch.no_grad():
        a, b = run(model, x, y), run(model, x, y)
    assert torch.equal(a["loss"], b["loss"])
    assert torch.equal(a["visual_logits"]["feat"], b["visual_logits"]["feat"])
    model.train()
    with torch.no_grad():
        c, d = run(model, x, y), run(model, x, y)
    assert not torch.equal(c["visual_logits"]["feat"], d["visual_logits"]["feat"])


def test_bf16_autocast_forward_on_cpu() -> None:
    torch.manual_seed(0)
    model = LxmertForPretraining(CONFIG).eval()
    x = inputs()
    y = labels(x)
    with torch.no_grad():
        ref = run(model, x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, x, y)
    assert out["match_logits"].dtype == torch.bfloat16  # the matmuls ran in bf16
    assert set(out["losses"]) == set(ref["losses"])
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert abs(out["loss"].item() - ref["loss"].item()) < 0.05 * ref["loss"].item()
