"""`lxmert-bench export RUN --hf DIR` (issue 12): directories `transformers` loads, with the same
outputs as our model on the same inputs (eval mode, fp32), and no write over others' files."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from test_parity_hf import make_inputs, max_diff, randomize

from lxmert_bench.model import LxmertConfig, LxmertForPretraining
from lxmert_bench.model.heads import LxmertForNLVR2, LxmertForQuestionAnswering
from lxmert_bench.model.hf import MARKER, NLVR2_HEAD, ExportDirError, export_hf

TOL = 1e-5


def _config() -> LxmertConfig:
    return LxmertConfig.preset("test")


@pytest.mark.parametrize("visual_losses,qa", [(("obj", "attr", "feat"), True), (("feat",), False),
                                              ((), True)])
def test_pretraining_export_loads_in_hf_with_the_same_outputs(tmp_path, visual_losses, qa):
    config = _config()
    ours = LxmertForPretraining(config, visual_losses=visual_losses, qa=qa, num_answers=7).eval()
    randomize(ours)
    files = export_hf(ours, tmp_path / "hf")
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    hf, info = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "hf",
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.cls.predictions.decoder.weight.data_ptr() == \
        hf.lxmert.embeddings.word_embeddings.weight.data_ptr()  # re-tied, as ours
    assert hasattr(hf, "answer_head") == qa and hasattr(hf, "obj_predict_head") == bool(visual_losses)
    x = make_inputs(config)
    with torch.no_grad():
        lang, visn, pooled = ours.bert(x["input_ids"], x["attention_mask"], x["feats"], x["boxes"])
        mlm = ours.cls.predictions(lang)
        match = ours.cls.seq_relationship(pooled)
        ref = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                 visual_feats=x["feats"], visual_pos=x["boxes"])
    assert mlm.abs().mean() > 0.1  # O(1) outputs: the tolerance means something
    assert max_diff(mlm, ref.prediction_logits) <= TOL
    assert max_diff(match, ref.cross_relationship_score) <= TOL
    if qa:
        assert max_diff(ours.answer_head(pooled), ref.question_answering_score) <= TOL
    if visual_losses:
        obj = ours.obj_predict_head(visn)
        with torch.no_grad():
            hf_obj = hf.obj_predict_head(hf.lxmert(
                input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                visual_feats=x["feats"], visual_pos=x["boxes"]).vision_output)
        assert set(obj) == set(hf_obj) == set(visual_losses)
        for k in obj:
            assert max_diff(obj[k], hf_obj[k]) <= TOL


def test_qa_export_loads_in_hf_with_the_same_answer_scores(tmp_path):
    config = _config()
    answers = [f"answer {i}" for i in range(11)]
    ours = LxmertForQuestionAnswering(config, len(answers)).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "hf", id2label=answers)
    hf = transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label[3] == "answer 3" and hf.config.num_qa_labels == 11
    x = make_inputs(config)
    with torch.no_grad():
        logits = ours(x["input_ids"], x["attention_mask"], x["feats"], x["boxes"])
        ref = hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                 visual_feats=x["feats"], visual_pos=x["boxes"]).question_answering_score
    assert logits.shape == (2, 11) and logits.abs().mean() > 0.1
    assert max_diff(logits, ref) <= TOL


def test_nlvr2_export_is_lxmert_model_plus_our_head(tmp_path):
    """HF has no NLVR2 class: LxmertModel + nlvr2_head.safetensors give our logits."""
    config = _config()
    ours = LxmertForNLVR2(config).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "hf")
    hf = transformers.LxmertModel.from_pretrained(tmp_path / "hf").eval()
    with safe_open(str(tmp_path / "hf" / NLVR2_HEAD), "pt") as f:
        head = {k: f.get_tensor(k) for k in f.keys()}
        assert "logit_fc" in f.metadata()["what"]
    h = config.hidden_size
    fc = torch.nn.Sequential(torch.nn.Linear(2 * h, 2 * h), torch.nn.GELU(),
                             torch.nn.LayerNorm(2 * h, eps=config.layer_norm_eps),
                             torch.nn.Linear(2 * h, 2))
    fc.load_state_dict({k.removeprefix("logit_fc."): v for k, v in head.items()})
    x = make_inputs(config, batch=4)
    feats = x["feats"].reshape(2, 2, *x["feats"].shape[1:])
    boxes = x["boxes"].reshape(2, 2, *x["boxes"].shape[1:])
    ids, mask = x["input_ids"][:2], x["attention_mask"][:2]
    with torch.no_grad():
        logits = ours(ids, mask, feats, boxes)
        pooled = hf(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                    visual_feats=feats.flatten(0, 1), visual_pos=boxes.flatten(0, 1)).pooled_output
        ref = fc(pooled.reshape(2, -1))
    assert max_diff(logits, ref) <= TOL


def test_export_never_writes_over_others_files(tmp_path):
    model = LxmertForQuestionAnswering(_config(), 3)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ExportDirError, match="notes.txt"):
        export_hf(model, theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    # an earlier export is ours: written again; a file someone added to it is not
    out = tmp_path / "hf"
    export_hf(model, out)
    export_hf(LxmertForNLVR2(_config()), out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["architecture"] == "LxmertModel" and NLVR2_HEAD in marker["files"]
    export_hf(model, out)  # back to QA: the NLVR2 head it wrote is removed, as its own file
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", MARKER])
    (out / "README.md").write_text("theirs")
    with pytest.raises(ExportDirError, match="README.md"):
        export_hf(model, out)
    assert (out / "README.md").read_text() == "theirs"
