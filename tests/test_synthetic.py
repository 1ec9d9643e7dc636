"""The synthetic benchmark: deterministic, in the official formats and layout, sized by --images,
and grounded (a text-only baseline is clearly below one that reads the detector's output)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lxmert_bench.cli import main as cli_main
from lxmert_bench.data.answers import convert_ans
from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.layout import LAYOUT, check_data_root
from lxmert_bench.data.synthetic import (
    DUPLICATE_CONF,
    MIN_IMAGES,
    OBJECT_IDS,
    generate_synthetic,
    synthetic_root_problem,
)

IMAGES = 1500  # enough examples for the baselines to separate; features kept small for speed
DIM = 8
GENERATED = list(LAYOUT)  # every split of the layout, the test splits too


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate_synthetic(root, images=IMAGES, seed=0, feature_dim=DIM, progress=False)


def _json(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path) -> None:
    a = _files_after(tmp_path / "a", seed=3)
    b = _files_after(tmp_path / "b", seed=3)
    c = _files_after(tmp_path / "c", seed=4)
    assert a.keys() == b.keys() == c.keys()
    assert a == b
    assert a["vqa/train.json"] != c["vqa/train.json"]
    assert a["mscoco_imgfeat/train2014_obj36.tsv"] != c["mscoco_imgfeat/train2014_obj36.tsv"]


def _files_after(root: Path, seed: int) -> dict[str, bytes]:
    generate_synthetic(root, images=MIN_IMAGES, seed=seed, feature_dim=DIM, progress=False)
    return _files(root)


def test_layout_is_complete_and_every_json_image_is_in_its_feature_file(bench) -> None:
    root, summary = bench
    assert check_data_root(root, GENERATED) == []
    ids_of: dict[tuple[str, int | None], set[str]] = {}
    for (dataset, split), entry in LAYOUT.items():
        if (dataset, split) not in GENERATED:
            continue
        loaded = ids_of.setdefault((entry.tsvs, entry.topk), {
            row["img_id"] for tsv in entry.tsvs for row in read_obj_tsv(root / tsv, topk=entry.topk)})
        data = _json(root, entry.json)
        assert data, f"{entry.json} is empty"
        used = {d[k] for d in data for k in ("img0", "img1", "img_id") if k in d}
        assert used <= loaded, f"{entry.json}: images missing from {', '.join(entry.tsvs)}"
    # minival images come first in val2014 (the official topk=5000 relies on it)
    val_ids = [r["img_id"] for r in read_obj_tsv(root / "mscoco_imgfeat/val2014_obj36.tsv")]
    minival = {d["img_id"] for d in _json(root, "vqa/minival.json")}
    assert set(val_ids[:len(minival)]) == minival


def test_feature_rows_follow_the_obj36_format(bench) -> None:
    root, summary = bench
    for rel, n in summary["feature_files"].items():
        rows = list(read_obj_tsv(root / rel))
        assert len(rows) == n > 0
        for r in rows:
            assert r["num_boxes"] == 36 and r["features"].shape == (36, DIM)
            assert r["features"].dtype == np.float32 and (r["features"] >= 0).all()
            assert r["objects_id"].dtype == np.int64 and r["objects_id"].max() < 1600
            assert r["attrs_id"].dtype == np.int64 and r["attrs_id"].max() < 400
            for key in ("objects_conf", "attrs_conf"):
                assert r[key].dtype == np.float32 and ((r[key] > 0) & (r[key] < 1)).all()
            assert (np.diff(r["objects_conf"]) <= 0).all(), "boxes sorted by confidence"
            b = r["boxes"]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
            assert (b[:, 2] <= r["img_w"]).all() and (b[:, 3] <= r["img_h"]).all()
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_features_carry_the_detector_labels(tmp_path) -> None:
    """Like a detector's RoI features, a nearest-centroid classifier on them recovers the label."""
    generate_synthetic(tmp_path, images=MIN_IMAGES, seed=1, feature_dim=256, progress=False)
    rows = [r for rel in ("vg_gqa_imgfeat/vg_gqa_obj36.tsv", "mscoco_imgfeat/train2014_obj36.tsv")
            for r in read_obj_tsv(tmp_path / rel)]
    feats = np.concatenate([r["features"] for r in rows])
    labels = np.concatenate([r["objects_id"] for r in rows])
    confident = np.concatenate([r["objects_conf"] for r in rows]) > 0.5
    half = len(rows) * 36 // 2
    train, test = slice(0, half), slice(half, None)
    classes = np.unique(labels[train][confident[train]])
    centroids = np.stack([feats[train][(labels[train] == c) & confident[train]].mean(0)
                          for c in classes])
    x, y = feats[test][confident[test]], labels[test][confident[test]]
    pred = classes[((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert (pred == y).mean() > 0.6  # the detector labels are themselves wrong ~15% of the time


def test_sizes_scale_with_images(bench, tmp_path) -> None:
    _, big = bench
    small = generate_synthetic(tmp_path, images=200, seed=0, feature_dim=DIM, progress=False)
    ratio = IMAGES / 200
    assert sum(big["feature_files"].values()) == pytest.approx(IMAGES, rel=0.05)
    assert sum(small["feature_files"].values()) == pytest.approx(200, rel=0.05)
    for key, n in big["examples"].items():
        assert 0.5 * ratio < n / small["examples"][key] < 2 * ratio, key
    for key, n in big["pretrain_sentences"].items():
        assert 0.5 * ratio < n / small["pretrain_sentences"][key] < 2 * ratio, key


def test_answer_tables_and_labels_are_consistent(bench) -> None:
    root, _ = bench
    for task in ("vqa", "gqa"):
        a2l = _json(root, f"{task}/trainval_ans2label.json")
        l2a = _json(root, f"{task}/trainval_label2ans.json")
        assert len(a2l) == len(l2a) > 10
        assert all(l2a[a2l[a]] == a for a in a2l)
        splits = ("train", "nominival", "minival") if task == "vqa" else ("train", "valid", "testdev")
        for split in splits:
            for d in _json(root, f"{task}/{split}.json"):
                assert set(d["label"]) <= set(a2l), d
    vqa = [d for s in ("train", "nominival", "minival") for d in _json(root, f"vqa/{s}.json")]
    assert {d["answer_type"] for d in vqa} == {"yes/no", "number", "other"}
    assert all(isinstance(d["question_id"], int) for d in vqa)
    assert len({d["question_id"] for d in vqa}) == len(vqa)
    assert {s for d in vqa for s in d["label"].values()} <= {0.3, 0.6, 0.9, 1}
    assert any(len(d["label"]) > 1 for d in vqa), "simulated annotators disagree sometimes"
    gqa = _json(root, "gqa/train.json")
    assert all(isinstance(d["question_id"], str) and list(d["label"].values()) == [1.0] for d in gqa)

    all_ans = _json(root, "lxmert/all_ans.json")
    table = {e["ans"] for e in all_ans}
    assert all(convert_ans(a) == a for a in table)
    assert {t for e in all_ans for t in e["dsets"]} == {"vqa", "gqa", "visual7w"}
    raw_answers = set()
    for split in ("mscoco_train", "mscoco_nominival", "mscoco_minival", "vgnococo"):
        for datum in _json(root, f"lxmert/{split}.json"):
            assert set(datum["labelf"]) <= set(datum["sentf"])
            for source, labels in datum["labelf"].items():
                assert len(labels) == len(datum["sentf"][source])
                raw_answers |= {a for label in labels for a in label}
    assert {convert_ans(a) for a in raw_answers} == table
    assert any(convert_ans(a) != a for a in raw_answers), "Visual7W answers need convert_ans"


def test_nlvr2_identifiers_group_into_balanced_sentences(bench) -> None:
    root, _ = bench
    for split in ("train", "valid", "test"):
        data = _json(root, f"nlvr2/{split}.json")
        assert len({d["uid"] for d in data}) == len({d["identifier"] for d in data}) == len(data)
        groups: dict[str, list[dict]] = defaultdict(list)
        for d in data:
            parts = d["identifier"].split("-")
            assert len(parts) == 4 and parts[0] == split
            prefix = "-".join(parts[:3])
            assert (d["img0"], d["img1"]) == (f"{prefix}-img0", f"{prefix}-img1")
            groups["-".join([parts[0], parts[1], "*", parts[3]])].append(d)
        for key, members in groups.items():
            assert len(members) >= 2, key
            assert len({m["sent"] for m in members}) == 1, key
            assert sum(m["label"] for m in members) * 2 == len(members), key


def test_pretraining_covers_more_images_than_fine_tuning(bench) -> None:
    root, _ = bench
    pre = {d["img_id"] for s in ("mscoco_train", "mscoco_nominival", "vgnococo")
           for d in _json(root, f"lxmert/{s}.json")}
    for task, splits in (("vqa", ("train", "nominival")), ("gqa", ("train", "valid"))):
        used = {d["img_id"] for s in splits for d in _json(root, f"{task}/{s}.json")}
        assert used < pre and len(pre) > 1.5 * len(used)
    held_out = {d["img_id"] for d in _json(root, "lxmert/mscoco_minival.json")}
    assert not held_out & pre, "minival stays out of pretraining"


def test_vocab_has_1024_entries_and_every_word(bench) -> None:
    root, _ = bench
    vocab = (root / "vocab.txt").read_text().splitlines()
    assert len(vocab) == len(set(vocab)) == 1024
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} <= set(vocab)
    words = set()
    for rel in ("vqa/train.json", "gqa/testdev.json", "nlvr2/valid.json"):
        for d in _json(root, rel):
            words |= set(re.findall(r"[a-z0-9]+", d["sent"].lower()))
    assert words <= set(vocab)


def test_cli_entry_point(tmp_path, capsys) -> None:
    assert cli_main(["data", "synthetic", "--out", str(tmp_path / "few"), "--images",
                     str(MIN_IMAGES - 1), "--seed", "0"]) == 2
    assert f"at least {MIN_IMAGES}" in capsys.readouterr().err
    assert not (tmp_path / "few").exists()


# ---------------------------------------------------------------------------------------------
# Grounding: a text-only baseline against one that also reads the detector's output. Both are the
# same multinomial logistic regression over sparse binary features (an EmbeddingBag is a sparse
# linear layer), trained on the training split and scored on the evaluation split.
CONFIDENT = 0.45  # real objects are detected above this; the background clutter below


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _detections(root: Path, rels: list[str]) -> dict[str, list[tuple[int, int, float, float]]]:
    """img_id -> confident boxes as (label, attribute, x-centre, width), left to right."""
    out = {}
    for rel in rels:
        for r in read_obj_tsv(root / rel):
            keep = r["objects_conf"] > CONFIDENT
            b = r["boxes"][keep] / r["img_w"]
            cx, width = (b[:, 0] + b[:, 2]) / 2, b[:, 2] - b[:, 0]
            objs, attrs = r["objects_id"][keep], r["attrs_id"][keep]
            out[r["img_id"]] = [(int(objs[k]), int(attrs[k]), float(cx[k]), float(width[k]))
                                for k in np.argsort(cx)]
    return out


def _lexicon(texts_images: list[tuple[str, list[str]]], det, min_lift: float = 0.3):
    """Word -> the detector label (and attribute) it names, learnt from training data alone: the
    one detected much more often in images whose text has the word than in images overall."""
    base_o, base_a, n_word = Counter(), Counter(), Counter()
    with_o, with_a = defaultdict(Counter), defaultdict(Counter)
    for text, imgs in texts_images:
        objs = {b[0] for i in imgs for b in det[i]}
        attrs = {b[1] for i in imgs for b in det[i]}
        base_o.update(objs)
        base_a.update(attrs)
        for w in set(_words(text)):
            n_word[w] += 1
            with_o[w].update(objs)
            with_a[w].update(attrs)

    def best(together: dict, base: Counter) -> dict[str, int]:
        lex = {}
        for w, counts in together.items():
            lift = {k: c / n_word[w] - base[k] / len(texts_images) for k, c in counts.items()}
            k = max(sorted(lift), key=lift.get)  # sorted: ties break the same way every run
            if lift[k] > min_lift and n_word[w] >= 3:
                lex[w] = k
        return lex
    return best(with_o, base_o), best(with_a, base_a)


def _anchor_facts(words: list[str], boxes, lex_o, lex_a) -> set[str]:
    """What the detector says about the (first two) objects the text names: count, attributes,
    size, neighbours' labels, whether a named attribute matches, their left-right order."""
    named_attrs = {lex_a[w] for w in words if w in lex_a}
    anchors = list(dict.fromkeys(lex_o[w] for w in words if w in lex_o))[:2]
    facts: set[str] = set()
    for k, label in enumerate(anchors):
        mine = [i for i, b in enumerate(boxes) if b[0] == label]
        facts.add(f"A{k}:n{len(mine)}")
        for i in mine:
            _, attr, _, width = boxes[i]
            facts |= {f"A{k}:a{attr}", f"A{k}:s{int(width > 0.13)}",
                      f"A{k}:match{int(attr in named_attrs)}"}
            if i > 0:
                facts.add(f"A{k}:L{boxes[i - 1][0]}")
            if i + 1 < len(boxes):
                facts.add(f"A{k}:R{boxes[i + 1][0]}")
        first = [b for b in boxes if b[0] == anchors[0]]
        if k == 1 and mine and first:
            facts.add(f"A1:order{int(first[0][2] < boxes[mine[0]][2])}")
    return facts


def _features(text: str, images: list, lex, use_image: bool) -> set[str]:
    words = _words(text)
    feats = {f"w:{w}" for w in words} | {f"p{i}:{w}" for i, w in enumerate(words)}
    if not use_image:
        return feats
    if len(images) == 1:
        facts = _anchor_facts(words, images[0], *lex)
    else:  # NLVR2: facts per side and comparisons of the named objects' counts
        left, right = (_anchor_facts(words, boxes, *lex) for boxes in images)
        facts = {f"L{f}" for f in left} | {f"R{f}" for f in right}
        for k in (0, 1):
            nl, nr = (max([int(f[4:]) for f in side if f.startswith(f"A{k}:n")] or [0])
                      for side in (left, right))
            facts |= {f"A{k}cmp{np.sign(nl - nr)}", f"A{k}tot{nl + nr}",
                      f"A{k}any{int(nl > 0) + int(nr > 0)}"}
    return feats | facts | {f"{w}|{f}" for w in feats for f in facts}


def _logistic_regression(train_feats, targets, n_out, steps: int = 150):
    torch.manual_seed(0)
    index: dict[str, int] = {}

    def bags(feats_list, grow: bool):
        ids = [[index.setdefault(f, len(index)) if grow else index.get(f, -1) for f in sorted(fs)]
               for fs in feats_list]
        ids = [[i for i in x if i >= 0] or [0] for x in ids]
        offsets = torch.tensor(np.cumsum([0] + [len(x) for x in ids[:-1]]))
        return torch.tensor([i for x in ids for i in x]), offsets

    flat, offsets = bags(train_feats, grow=True)
    weight = torch.zeros(len(index), n_out, requires_grad=True)
    bias = torch.zeros(n_out, requires_grad=True)
    target = torch.tensor(np.array(targets), dtype=torch.float32)
    opt = torch.optim.Adam([weight, bias], lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        logits = F.embedding_bag(flat, weight, offsets, mode="sum") + bias
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean() + 1e-5 * (weight ** 2).sum()
        loss.backward()
        opt.step()

    def predict(feats_list) -> list[int]:
        flat, offsets = bags(feats_list, grow=False)
        with torch.no_grad():
            return (F.embedding_bag(flat, weight, offsets, mode="sum") + bias).argmax(-1).tolist()
    return predict


def _vqa_accuracy(train, valid, det, use_image: bool) -> float:
    lex = _lexicon([(d["sent"], [d["img_id"]]) for d in train], det)
    answers = sorted({a for d in train for a in d["label"]})
    index = {a: i for i, a in enumerate(answers)}
    targets = []
    for d in train:
        t = np.zeros(len(answers))
        for a, s in d["label"].items():
            t[index[a]] = s
        targets.append(t / t.sum())
    feats = [_features(d["sent"], [det[d["img_id"]]], lex, use_image) for d in train]
    predict = _logistic_regression(feats, targets, len(answers))
    pred = predict([_features(d["sent"], [det[d["img_id"]]], lex, use_image) for d in valid])
    return 100 * sum(d["label"].get(answers[p], 0) for d, p in zip(valid, pred)) / len(valid)


def _nlvr2_accuracy(train, valid, det, use_image: bool) -> float:
    lex = _lexicon([(d["sent"], [d["img0"], d["img1"]]) for d in train], det)

    def feats(d):
        return _features(d["sent"], [det[d["img0"]], det[d["img1"]]], lex, use_image)
    predict = _logistic_regression([feats(d) for d in train],
                                   [np.eye(2)[d["label"]] for d in train], 2)
    pred = predict([feats(d) for d in valid])
    return 100 * float(np.mean([p == d["label"] for d, p in zip(valid, pred)]))


def _majority_per_text(train, valid, score) -> float:
    """Answer each question with the answer its exact text most often had in training."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for d in train:
        for ans, weight in score(d).items():
            by_text[d["sent"]][ans] += weight
            overall[ans] += weight
    total = 0.0
    for d in valid:
        guess = (by_text.get(d["sent"]) or overall).most_common(1)[0][0]
        total += score(d).get(guess, 0)
    return 100 * total / len(valid)


def test_text_alone_cannot_answer_but_the_detections_can(bench) -> None:
    torch.set_num_threads(1)
    root, _ = bench
    train = _json(root, "vqa/train.json") + _json(root, "vqa/nominival.json")
    minival = _json(root, "vqa/minival.json")
    det = _detections(root, ["mscoco_imgfeat/train2014_obj36.tsv",
                             "mscoco_imgfeat/val2014_obj36.tsv"])
    vqa = {"majority": _majority_per_text(train, minival, lambda d: d["label"]),
           "text": _vqa_accuracy(train, minival, det, use_image=False),
           "image": _vqa_accuracy(train, minival, det, use_image=True)}

    train = _json(root, "nlvr2/train.json")
    valid = _json(root, "nlvr2/valid.json")
    det = _detections(root, ["nlvr2_imgfeat/train_obj36.tsv", "nlvr2_imgfeat/valid_obj36.tsv"])
    nlvr2 = {"majority": _majority_per_text(train, valid, lambda d: {d["label"]: 1}),
             "text": _nlvr2_accuracy(train, valid, det, use_image=False),
             "image": _nlvr2_accuracy(train, valid, det, use_image=True)}
    print(f"VQA minival {vqa}\nNLVR2 valid {nlvr2}")
    assert max(vqa["majority"], vqa["text"]) < 55
    assert vqa["image"] >= max(vqa["majority"], vqa["text"]) + 15
    assert max(nlvr2["majority"], nlvr2["text"]) < 60  # labels are balanced per sentence
    assert nlvr2["image"] >= max(nlvr2["majority"], nlvr2["text"]) + 15


def test_most_boxes_show_objects_with_duplicates_inside_them(bench) -> None:
    """Like a detector's top 36: each object is seen by several overlapping boxes (its own, then
    parts / duplicates at lower confidence inside it), and the rest is low-confidence clutter."""
    root, _ = bench
    object_ids = list(OBJECT_IDS.values())
    low, high = DUPLICATE_CONF
    fractions, inside = [], []
    for r in read_obj_tsv(root / "mscoco_imgfeat/train2014_obj36.tsv"):
        fractions.append(np.isin(r["objects_id"], object_ids).mean())
        b, conf = r["boxes"], r["objects_conf"]
        for i in np.flatnonzero((conf >= low) & (conf <= high)):
            holders = (conf > high) & (b[:, 0] <= b[i, 0] + 1e-3) & (b[:, 1] <= b[i, 1] + 1e-3) \
                & (b[:, 2] >= b[i, 2] - 1e-3) & (b[:, 3] >= b[i, 3] - 1e-3)
            inside.append(holders.any())
    assert 0.3 < np.mean(fractions) < 0.8
    assert len(inside) > 100 and np.mean(inside) > 0.8  # the rest: duplicates of a confused box


def test_a_root_generated_with_other_inputs_is_refused_not_reused(tmp_path) -> None:
    from lxmert_bench.config import DataConfig
    from lxmert_bench.data.root import ensure_data_root

    root = tmp_path / "syn"
    generate_synthetic(root, images=MIN_IMAGES, seed=0, feature_dim=DIM, progress=False)
    assert synthetic_root_problem(root, MIN_IMAGES, 0) is None
    assert ensure_data_root(DataConfig(root=str(root), synthetic=True, synthetic_images=MIN_IMAGES)) == root
    problem = synthetic_root_problem(root, MIN_IMAGES + 20, 0)
    assert problem and "synthetic.json" in problem and f"'images': {MIN_IMAGES + 20}" in problem
    with pytest.raises(ValueError, match="remove the directory to regenerate it"):
        ensure_data_root(DataConfig(root=str(root), synthetic=True, synthetic_images=MIN_IMAGES + 20))
    assert (root / "vocab.txt").is_file()  # nothing removed
