"""load_weights / save_weights: every checkpoint format, file types, reports, errors, ties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lxmert_bench.model import (
    LoadReport,
    Lxmert,
    LxmertConfig,
    LxmertForNLVR2,
    LxmertForPretraining,
    LxmertForQuestionAnswering,
    load_weights,
    save_weights,
)
from lxmert_bench.model.weights import detect_format, hf_config, transfer_qa_head

CONFIG = LxmertConfig.preset("test", num_qa_labels=12)  # l_layers=2, 32 positions


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def pretraining(seed: int = 0) -> LxmertForPretraining:
    return randomized(LxmertForPretraining(CONFIG), seed)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, prefix_a: str = "",
                       prefix_b: str = "", only: str = "") -> int:
    """Every tensor of ``a`` under ``prefix_a + only`` equals ``b``'s tensor of the same name."""
    sb = b.state_dict()
    n = 0
    for name, value in a.state_dict().items():
        if name.startswith(prefix_a + only):
            assert torch.equal(value, sb[prefix_b + name.removeprefix(prefix_a)]), name
            n += 1
    assert n > 0
    return n


def assert_tied(model: LxmertForPretraining) -> None:
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_parallel", [True, False])
def test_official_pretraining_checkpoint(tmp_path: Path, data_parallel: bool) -> None:
    source = pretraining(1)
    state = source.state_dict()
    if data_parallel:  # model_LXRT.pth is a DataParallel state dict
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "model_LXRT.pth"
    torch.save(state, path)
    target = pretraining(2)
    report = load_weights(target, path, strict=True)
    assert report.format == "official"
    assert not report.missing and not report.unexpected and not report.skipped
    assert "cls.predictions.decoder.weight" in report.loaded
    assert_same_params(source, target)
    assert_tied(target)


def test_official_checkpoint_into_task_models_and_backbone() -> None:
    source = pretraining(1)
    # VQA with the pretraining answer table size: the QA head is the task head (load_lxmert_qa)
    qa = randomized(LxmertForQuestionAnswering(CONFIG, CONFIG.num_qa_labels), 3)
    report = load_weights(qa, source.state_dict())
    assert not report.missing
    assert {"cls.predictions.bias", "obj_predict_head.decoder_dict.feat.weight"} <= set(report.unexpected)
    assert torch.equal(qa.logit_fc[3].weight, source.answer_head.logit_fc[3].weight)
    assert_same_params(source, qa, only="bert.")
    # NLVR2: no answer head fits its 2-image classifier; the backbone loads
    nlvr2 = randomized(LxmertForNLVR2(CONFIG), 4)
    head_before = nlvr2.logit_fc[0].weight.clone()
    report = load_weights(nlvr2, source.state_dict())
    assert sorted({n.rsplit(".", 1)[0] for n in report.missing}) == ["logit_fc.0", "logit_fc.2", "logit_fc.3"]
    assert "answer_head.logit_fc.0.weight" in report.unexpected
    assert torch.equal(nlvr2.logit_fc[0].weight, head_before)
    assert_same_params(source, nlvr2, only="bert.")
    # a bare backbone: no prefix
    backbone = randomized(Lxmert(CONFIG), 5)
    report = load_weights(backbone, source.state_dict())
    assert not report.missing and "cls.predictions.bias" in report.unexpected
    assert_same_params(source, backbone, prefix_a="bert.")


@pytest.mark.parametrize("multi_gpu", [False, True])
def test_official_finetuned_checkpoint(tmp_path: Path, multi_gpu: bool) -> None:
    vqa = randomized(LxmertForQuestionAnswering(CONFIG, 7), 1)
    encoder = "lxrt_encoder.model.module." if multi_gpu else "lxrt_encoder.model."
    state = {(encoder + k if k.startswith("bert.") else k): v for k, v in vqa.state_dict().items()}
    assert any(k.startswith(encoder + "bert.encoder.x_layers.0.") for k in state)
    torch.save(state, tmp_path / "BEST.pth")
    target = randomized(LxmertForQuestionAnswering(CONFIG, 7), 2)
    report = load_weights(target, tmp_path / "BEST.pth", strict=True)
    assert report.format == "official_finetuned"
    assert_same_params(vqa, target)
    # its backbone into an NLVR2 model; the VQA head does not fit NLVR2's and is refused by name
    with pytest.raises(ValueError, match=r"logit_fc\.0\.weight.*\(64, 32\).*\(64, 64\)"):
        load_weights(LxmertForNLVR2(CONFIG), state)
    report = load_weights(LxmertForNLVR2(CONFIG), state, heads=False)
    assert report.skipped["logit_fc.0.weight"] == "heads=False"


# ---------------------------------------------------------------------------------------------
# HF LXMERT
# ---------------------------------------------------------------------------------------------
def test_hf_lxmert_model_directory_and_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = randomized(transformers.LxmertModel(hf_config(CONFIG)), 1)
    hf.save_pretrained(tmp_path / "hf")  # a HF model directory with model.safetensors
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    target = Lxmert(CONFIG)
    report = load_weights(target, tmp_path / "hf", strict=True)
    assert report.format == "hf_lxmert_model"
    assert_same_params(target, hf)
    report = load_weights(LxmertForPretraining(CONFIG), tmp_path / "hf" / "model.safetensors")
    assert report.format == "hf_lxmert_model" and not report.unexpected
    assert {"cls.predictions.bias", "answer_head.logit_fc.3.weight"} <= set(report.missing)


def test_hf_pretraining_checkpoint_bin(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = randomized(transformers.LxmertForPreTraining(hf_config(CONFIG)), 1)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    target = pretraining(2)
    report = load_weights(target, tmp_path / "pytorch_model.bin", strict=True)
    assert report.format == "hf_lxmert"
    assert_same_params(target, hf, prefix_a="bert.", prefix_b="lxmert.")
    assert_same_params(target, hf, only="cls.")
    assert_same_params(target, hf, only="obj_predict_head.")
    assert_same_params(target, hf, only="answer_head.")
    assert_tied(target)
    # the pretraining QA head is a same-sized task model's logit_fc
    qa = LxmertForQuestionAnswering(CONFIG, CONFIG.num_qa_labels)
    load_weights(qa, hf.state_dict())
    assert torch.equal(qa.logit_fc[0].weight, hf.answer_head.logit_fc[0].weight)
    assert torch.equal(qa.logit_fc[3].bias, hf.answer_head.logit_fc[3].bias)


def test_hf_question_answering_head_sizes() -> None:
    torch.manual_seed(0)
    hf = randomized(transformers.LxmertForQuestionAnswering(hf_config(CONFIG, num_qa_labels=9)), 1)
    same = LxmertForQuestionAnswering(CONFIG, 9)
    report = load_weights(same, hf.state_dict(), strict=True)
    assert report.format == "hf_lxmert"
    for i in (0, 2, 3):
        assert torch.equal(same.logit_fc[i].weight, hf.answer_head.logit_fc[i].weight)
    # another answer table (9500 pretraining answers vs 3129 VQA answers): the head is skipped
    other = randomized(LxmertForQuestionAnswering(CONFIG, 5), 2)
    before = {k: v.clone() for k, v in other.logit_fc.state_dict().items()}
    report = load_weights(other, hf.state_dict())
    assert sorted(report.skipped) == [f"answer_head.logit_fc.{i}.{p}" for i in (0, 2, 3)
                                      for p in ("bias", "weight")]
    assert all("9 answers, the model 5" in why for why in report.skipped.values())
    assert {k.rsplit(".", 1)[0] for k in report.missing} == {"logit_fc.0", "logit_fc.2", "logit_fc.3"}
    assert all(torch.equal(v, before[k]) for k, v in other.logit_fc.state_dict().items())
    assert_same_params(other, hf, prefix_a="bert.", prefix_b="lxmert.")
    assert "QA head has 9 answers" in report.summary()


def test_transfer_qa_head_copies_rows_and_zeroes_the_rest() -> None:
    source = pretraining(1)  # 12 pretraining answers
    task = randomized(LxmertForQuestionAnswering(CONFIG, 4), 2)
    transfer_qa_head(task, source.state_dict(), task_rows=[0, 2, 3], pretrain_rows=[5, 0, 11])
    src = source.answer_head.logit_fc
    assert torch.equal(task.logit_fc[0].weight, src[0].weight)
    assert torch.equal(task.logit_fc[2].bias, src[2].bias)
    w, b = task.logit_fc[3].weight, task.logit_fc[3].bias
    assert torch.equal(w[[0, 2, 3]], src[3].weight[[5, 0, 11]])
    assert torch.equal(b[[0, 2, 3]], src[3].bias[[5, 0, 11]])
    assert not w[1].any() and b[1] == 0  # an answer missing from the pretraining table


def test_transfer_qa_head_names_the_file_without_a_head_and_a_table_of_another_size(tmp_path):
    task = LxmertForQuestionAnswering(CONFIG, 4)
    path = tmp_path / "model.pt"
    torch.save(LxmertForPretraining(CONFIG, qa=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"model\.pt: no pretrained QA head .*load_qa_head: false"):
        transfer_qa_head(task, str(path), [0], [1])
    with pytest.raises(ValueError, match=r"the QA head has 12 answers but the answer table "
                                         r"lxmert/all_ans\.json has 7"):
        transfer_qa_head(task, pretraining(1).state_dict(), [0], [1], pretrain_answers=7)


# ---------------------------------------------------------------------------------------------
# HF BERT
# ---------------------------------------------------------------------------------------------
def bert_source(seed: int = 1, layers: int = 4) -> transformers.BertForPreTraining:
    config = transformers.BertConfig(vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size,
                                     num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=CONFIG.intermediate_size,
                                     max_position_embeddings=512)
    torch.manual_seed(0)
    return randomized(transformers.BertForPreTraining(config), seed)


@pytest.mark.parametrize("bert_layers, first", [("bottom", 0), ("top", 2)])
def test_hf_bert_bottom_or_top_layers(bert_layers: str, first: int) -> None:
    bert = bert_source()
    state = bert.state_dict()
    target = pretraining(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_weights(target, state, bert_layers=bert_layers)
    assert report.format == "hf_bert"
    # our language layer i is BERT layer first + i: 4 BERT layers, 2 of ours
    ours = target.state_dict()
    for i in range(CONFIG.l_layers):
        for name, value in state.items():
            if name.startswith(f"bert.encoder.layer.{first + i}."):
                rest = name.removeprefix(f"bert.encoder.layer.{first + i}.")
                assert torch.equal(ours[f"bert.encoder.layer.{i}.{rest}"], value), name
    unused = {int(k.split(".")[3]) for k in report.skipped if k.startswith("bert.encoder.layer.")}
    assert unused == ({2, 3} if bert_layers == "bottom" else {0, 1})
    # embeddings (BERT's 512 positions cut to our 32), pooler and the MLM / NSP heads
    assert torch.equal(ours["bert.embeddings.word_embeddings.weight"], state["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(ours["bert.embeddings.position_embeddings.weight"],
                       state["bert.embeddings.position_embeddings.weight"][:32])
    assert report.adapted == {"bert.embeddings.position_embeddings.weight": "first 32 of 512 positions"}
    assert torch.equal(ours["bert.pooler.dense.weight"], state["bert.pooler.dense.weight"])
    assert torch.equal(ours["cls.predictions.transform.dense.weight"],
                       state["cls.predictions.transform.dense.weight"])
    assert torch.equal(ours["cls.predictions.bias"], state["cls.predictions.bias"])
    assert torch.equal(ours["cls.seq_relationship.weight"], state["cls.seq_relationship.weight"])
    assert_tied(target)
    # everything visual stays as it was and is reported missing
    for name in ("bert.encoder.visn_fc.visn_fc.weight", "bert.encoder.r_layers.0.output.dense.weight",
                 "bert.encoder.x_layers.0.visual_attention.att.query.weight",
                 "obj_predict_head.decoder_dict.obj.weight", "answer_head.logit_fc.3.weight"):
        assert name in report.missing
        assert torch.equal(ours[name], before[name])
    assert not any(n.startswith(("bert.encoder.layer.", "bert.embeddings.", "bert.pooler.", "cls."))
                   for n in report.missing)


def test_bert_model_without_prefix_and_old_layernorm_names(tmp_path: Path) -> None:
    bert = bert_source().bert  # BertModel: embeddings.*, encoder.layer.N.*, pooler.*
    state = bert.state_dict()
    assert "embeddings.word_embeddings.weight" in state
    # TF-converted checkpoints: LayerNorm.gamma / LayerNorm.beta
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    torch.save(old, tmp_path / "bert.pt")
    target = Lxmert(CONFIG)
    report = load_weights(target, tmp_path / "bert.pt", bert_layers="top")
    assert report.format == "hf_bert" and not report.unexpected
    assert torch.equal(target.embeddings.LayerNorm.weight, state["embeddings.LayerNorm.weight"])
    assert torch.equal(target.encoder.layer[1].output.LayerNorm.bias,
                       state["encoder.layer.3.output.LayerNorm.bias"])
    # a BERT too shallow for the language encoder
    shallow = bert_source(layers=1).state_dict()
    with pytest.raises(ValueError, match="1 layers.*needs 2"):
        load_weights(Lxmert(CONFIG), shallow)


# ---------------------------------------------------------------------------------------------
# Errors, reports, formats
# ---------------------------------------------------------------------------------------------
def test_shape_mismatch_names_the_tensor_and_copies_nothing() -> None:
    source = pretraining(1).state_dict()
    source["bert.encoder.x_layers.0.lang_inter.dense.weight"] = torch.zeros(65, 32)
    target = pretraining(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"bert\.encoder\.x_layers\.0\.lang_inter\.dense\.weight.*"
                                         r"\(65, 32\).*\(64, 32\)"):
        load_weights(target, source)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # a vocabulary of another size is refused too (no rule can map it)
    bigger = LxmertForPretraining(LxmertConfig.preset("test", vocab_size=2048))
    with pytest.raises(ValueError, match="word_embeddings"):
        load_weights(bigger, source)
    # fewer positions than the model needs: refused
    more_positions = Lxmert(LxmertConfig.preset("test", max_position_embeddings=64))
    with pytest.raises(ValueError, match="position_embeddings.*\\(32, 32\\).*\\(64, 32\\)"):
        load_weights(more_positions, source)


def test_missing_and_unexpected_reported_and_strict() -> None:
    source = pretraining(1).state_dict()
    del source["bert.pooler.dense.bias"]
    source["bert.encoder.extra.weight"] = torch.zeros(3)
    target = LxmertForPretraining(CONFIG, visual_losses=("obj",))
    report = load_weights(target, source)
    assert report.missing == ["bert.pooler.dense.bias"]
    assert set(report.unexpected) == {"bert.encoder.extra.weight", "obj_predict_head.decoder_dict.attr.weight",
                                      "obj_predict_head.decoder_dict.attr.bias",
                                      "obj_predict_head.decoder_dict.feat.weight",
                                      "obj_predict_head.decoder_dict.feat.bias"}
    text = report.summary()
    assert "1 missing" in text and "bert.pooler.dense.*" in text and "decoder_dict.attr" in text
    assert str(report) == text and isinstance(report, LoadReport)
    with pytest.raises(ValueError, match="strict"):
        load_weights(target, source, strict=True)


def test_decoder_stays_tied_after_load() -> None:
    target = pretraining(2)
    embedding = target.bert.embeddings.word_embeddings.weight
    source = pretraining(1).state_dict()
    source["cls.predictions.decoder.weight"] = source["cls.predictions.decoder.weight"].clone()
    load_weights(target, source)
    assert target.bert.embeddings.word_embeddings.weight is embedding  # copied in, not replaced
    assert_tied(target)
    assert torch.equal(embedding, source["bert.embeddings.word_embeddings.weight"])
    # only the decoder stored (a safetensors file drops one of two shared tensors)
    only_decoder = pretraining(3).state_dict()
    del only_decoder["bert.embeddings.word_embeddings.weight"]
    report = load_weights(target, only_decoder, strict=True)
    assert not report.missing
    assert torch.equal(embedding, only_decoder["cls.predictions.decoder.weight"])
    assert_tied(target)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    source = pretraining(1)
    path = save_weights(source, tmp_path / f"model{suffix}")
    target = pretraining(2)
    report = load_weights(target, path, strict=True)
    assert report.format == "official" and not report.missing
    assert_same_params(source, target)
    assert_tied(target)


def test_saved_names_are_official_or_hf(tmp_path: Path) -> None:
    source = pretraining(1)
    state = torch.load(save_weights(source, tmp_path / "a.pth"), weights_only=True)
    # the official model_LXRT.pth layout: module.bert.*, module.cls.*, ... (its DataParallel)
    assert set(state) == {"module." + k for k in source.state_dict()}
    # torch.save keeps the tied matrix once
    assert state["module.cls.predictions.decoder.weight"].data_ptr() == \
        state["module.bert.embeddings.word_embeddings.weight"].data_ptr()
    backbone = randomized(Lxmert(CONFIG), 2)
    state = torch.load(save_weights(backbone, tmp_path / "b.pth"), weights_only=True)
    assert all(k.startswith("bert.") for k in state) and detect_format(state) == "official"
    # HF names load into transformers' own classes, strictly
    hf = transformers.LxmertForPreTraining(hf_config(CONFIG))
    hf.load_state_dict(torch.load(save_weights(source, tmp_path / "hf.bin", official=False)), strict=True)
    assert torch.equal(hf.lxmert.encoder.x_layers[0].visual_attention.att.key.weight,
                       source.bert.encoder.x_layers[0].visual_attention.att.key.weight)
    qa = randomized(LxmertForQuestionAnswering(CONFIG, 6), 3)
    hf_qa = transformers.LxmertForQuestionAnswering(hf_config(CONFIG, num_qa_labels=6))
    hf_qa.load_state_dict(torch.load(save_weights(qa, tmp_path / "qa.bin", official=False)), strict=True)
    assert torch.equal(hf_qa.answer_head.logit_fc[3].weight, qa.logit_fc[3].weight)
    with pytest.raises(ValueError, match="NLVR2"):
        save_weights(LxmertForNLVR2(CONFIG), tmp_path / "n.bin", official=False)


def test_in_memory_wrapped_and_unknown_sources(tmp_path: Path) -> None:
    source = pretraining(1)
    target = pretraining(2)
    # our training checkpoints wrap the state dict: {"model": ..., "optimizer": ...}
    torch.save({"model": source.state_dict(), "step": 3}, tmp_path / "last.pt")
    report = load_weights(target, tmp_path / "last.pt", strict=True)
    assert report.format == "official"
    assert_same_params(source, target)
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        load_weights(target, {"foo.weight": torch.zeros(2)})
    with pytest.raises(FileNotFoundError):
        load_weights(target, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="bert_layers"):
        load_weights(target, source.state_dict(), bert_layers="middle")  # type: ignore[arg-type]
