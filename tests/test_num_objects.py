"""``model.num_objects``: the first N of each image's boxes (obj36 files sort them by detector
confidence) in pretraining and every task; 36, the official, by default (issue 12)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _helpers import synthetic_data

from lxmert_bench.config import TASK_DEFAULTS, DataConfig, PretrainConfig, RunConfig
from lxmert_bench.data.tasks import (
    GQADataset,
    ImageFeatures,
    NLVR2Dataset,
    PretrainCorpus,
    VQADataset,
)
from lxmert_bench.model import LxmertConfig
from lxmert_bench.train.common import load_tokenizer

SPLITS = ("mscoco_train", "mscoco_nominival", "vgnococo")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return synthetic_data(tmp_path_factory, images=100)


def test_datasets_give_the_first_n_boxes(data):
    tok = load_tokenizer(data)
    for cls, split in ((VQADataset, "minival"), (GQADataset, "testdev")):
        full, ten = cls(data.root, [split], tok), cls(data.root, [split], tok, num_objects=10)
        a, b = full[0], ten[0]
        assert a["feats"].shape[0] == 36 and b["feats"].shape == (10, a["feats"].shape[1])
        assert np.array_equal(b["feats"], a["feats"][:10])
        assert np.array_equal(b["boxes"], a["boxes"][:10])
    full, ten = NLVR2Dataset(data.root, ["valid"], tok), NLVR2Dataset(data.root, ["valid"], tok,
                                                                        num_objects=10)
    assert ten[0]["feats"].shape[:2] == (2, 10) and ten[0]["boxes"].shape == (2, 10, 4)
    assert np.array_equal(ten[0]["feats"], full[0]["feats"][:, :10])
    corpus = PretrainCorpus(data.root, SPLITS, num_objects=10)
    img = corpus.features(corpus.img_ids[0])
    whole = PretrainCorpus(data.root, SPLITS).features(corpus.img_ids[0])
    for key in ("features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        assert img[key].shape[0] == 10 and np.array_equal(img[key], whole[key][:10]), key
    assert corpus.random_feature(np.random.default_rng(0)).shape == (whole["features"].shape[1],)


def test_more_objects_than_the_files_hold_is_refused(data):
    from lxmert_bench.data.layout import split_files

    with pytest.raises(ValueError, match=r"num_objects=40.*36 boxes"):
        ImageFeatures(data.root, [split_files("vqa", "minival")], num_objects=40)


def test_stages_read_model_num_objects(data):
    from lxmert_bench.train.finetune import load_datasets
    from lxmert_bench.train.pretrain import load_corpora

    model = LxmertConfig.preset("test", num_objects=7)
    tok = load_tokenizer(data)
    for task in ("vqa", "gqa", "nlvr2"):
        cfg = RunConfig(kind="finetune", model=model, data=data, finetune=TASK_DEFAULTS[task])
        train, dev = load_datasets(cfg, tok)
        assert train[0]["feats"].shape[-2] == dev[0]["feats"].shape[-2] == 7, task
        default = dataclasses.replace(cfg, model=LxmertConfig.preset("test"))
        assert load_datasets(default, tok)[1][0]["feats"].shape[-2] == 36
    pre = RunConfig(kind="pretrain", model=model, data=data, pretrain=PretrainConfig())
    for corpus in load_corpora(pre):
        assert corpus.features(corpus.img_ids[0])["features"].shape[0] == 7
