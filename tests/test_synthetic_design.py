"""data.synthetic_design: the 'compact' generator the demo profile uses, beside the original 'v1',
and 'themed' (compact's files with every scene on one theme).

Checked: compact's files are the same obj36 TSV format (read back by the official-format reader),
with 64-d features and label ids that fit the demo's 32 / 16-way heads, and its features let a
linear read-out tell the object classes apart; 'v1' stays what it was (2048-d, Visual Genome ids,
no 'design' key in synthetic.json) and the text of both is pinned; the field keeps old stage ids
and names its own data root; a themed image's sentences name the classes of one theme only."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lxmert_bench.config import DataConfig
from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.synthetic import (
    DESIGNS,
    GENERATOR_VERSION,
    OBJECT_IDS,
    OBJECTS,
    PLURALS,
    THEMES,
    ensure_synthetic_root,
    generate_synthetic,
    synthetic_root_problem,
)
from lxmert_bench.plan import synthetic_name

csv.field_size_limit(sys.maxsize)


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    out = tmp_path_factory.mktemp("compact") / "data"
    generate_synthetic(out, images=200, seed=0, design="compact", progress=False)
    return out


def test_compact_files_are_obj36_rows_with_small_features_and_ids(compact):
    rows = list(read_obj_tsv(compact / "mscoco_imgfeat" / "train2014_obj36.tsv"))
    assert rows and all(r["features"].shape == (36, 64) for r in rows)
    assert all(r["boxes"].shape == (36, 4) for r in rows)
    objects = np.concatenate([r["objects_id"] for r in rows])
    attrs = np.concatenate([r["attrs_id"] for r in rows])
    assert 0 <= objects.min() and objects.max() < 32
    assert 0 <= attrs.min() and attrs.max() < 16
    # the official reader's recipe: base64 float32, reshaped to (num_boxes, -1)
    with open(compact / "mscoco_imgfeat" / "train2014_obj36.tsv", newline="") as f:
        line = next(csv.reader(f, delimiter="\t"))
    raw = np.frombuffer(base64.b64decode(line[-1]), dtype=np.float32)
    assert raw.reshape(int(line[7]), -1).shape == (36, 64)  # num_boxes, the 8th field
    summary = json.loads((compact / "synthetic.json").read_text())
    assert summary["design"] == "compact" and summary["feature_dim"] == 64


def test_compact_features_tell_the_classes_apart_linearly(compact):
    """A least-squares read-out from the features of the confidently detected boxes predicts the
    detected class well above chance: what the demo's tiny model can learn in minutes."""
    feats, labels = [], []
    for r in read_obj_tsv(compact / "vg_gqa_imgfeat" / "vg_gqa_obj36.tsv"):
        keep = r["objects_conf"] >= 0.5  # primary detections, right 85% of the time
        feats.append(r["features"][keep])
        labels.append(r["objects_id"][keep])
    x, y = np.concatenate(feats), np.concatenate(labels)
    assert set(y) <= set(range(len(OBJECTS)))
    x = np.hstack([x, np.ones((len(x), 1), np.float32)])
    n = len(x) // 2
    w, *_ = np.linalg.lstsq(x[:n], np.eye(32)[y[:n]], rcond=None)
    accuracy = float((np.argmax(x[n:] @ w, 1) == y[n:]).mean())
    assert accuracy > 0.45  # chance: 1/12; ~15% of the labels are the detector's mistakes


def test_v1_is_unchanged(tmp_path):
    out = tmp_path / "v1"
    generate_synthetic(out, images=120, seed=0, progress=False)
    row = next(iter(read_obj_tsv(out / "mscoco_imgfeat" / "train2014_obj36.tsv")))
    assert row["features"].shape == (36, 2048)
    assert set(row["objects_id"][row["objects_conf"] >= 0.5]) <= set(OBJECT_IDS.values())
    assert "design" not in json.loads((out / "synthetic.json").read_text())
    assert DESIGNS["v1"].feature_dim == 2048


def test_design_field_keeps_old_ids_and_names_its_own_root(tmp_path):
    assert "synthetic_design" not in DataConfig().__dict__ or \
        "synthetic_design" not in json.dumps(_identity(DataConfig()))
    assert "synthetic_design" in json.dumps(_identity(DataConfig(synthetic_design="compact")))
    assert synthetic_name(DataConfig(synthetic=True)).endswith("-600-0")
    assert synthetic_name(DataConfig(synthetic=True, synthetic_design="compact")).endswith(
        "-600-0-compact")
    root = tmp_path / "data"
    ensure_synthetic_root(root, 120, 0, progress=False, design="compact")
    assert synthetic_root_problem(root, 120, 0, "compact") is None
    problem = synthetic_root_problem(root, 120, 0)  # asked for v1: these files are not it
    assert problem and "compact" in problem
    with pytest.raises(ValueError, match="synthetic design 'bogus'"):
        generate_synthetic(tmp_path / "x", images=120, design="bogus", progress=False)


def _identity(data: DataConfig) -> object:
    from lxmert_bench.config import _identity as identity

    return identity(data)


# sha256 over the relative path and bytes of every generated .json / .txt but synthetic.json, at
# 120 images, seed 0: the scenes, sentences and answers (the features are float data from a QR
# decomposition, which may differ in their last bits between BLAS builds). The themed design must
# not move them: a changed digest means every synthetic stage's data changed (GENERATOR_VERSION).
TEXT_DIGEST = {"2": "d640f9b7c93bb8eb1ad1520d8900fa16220988829b77b6a750ea03d2c952398b"}


def _text_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".json", ".txt") and path.name != "synthetic.json":
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("design", ["v1", "compact"])
def test_unthemed_designs_keep_their_text(tmp_path, design):
    generate_synthetic(tmp_path / "d", images=120, seed=0, design=design, progress=False)
    assert _text_digest(tmp_path / "d") == TEXT_DIGEST[GENERATOR_VERSION]


CLASS_OF = {**{n: n for n in OBJECTS}, **{p: n for n, p in PLURALS.items()}}
THEME_OF = {name: t for t, names in enumerate(THEMES) for name in names}


def _themes_per_image(root: Path) -> dict[str, set[int]]:
    """The themes of the classes each pretraining image's sentences name."""
    found: dict[str, set[int]] = {}
    for split in ("mscoco_train", "mscoco_nominival", "mscoco_minival", "vgnococo"):
        for datum in json.loads((root / "lxmert" / f"{split}.json").read_text()):
            words = re.findall(r"[a-z]+", " ".join(s for sents in datum["sentf"].values()
                                                   for s in sents).lower())
            found[datum["img_id"]] = {THEME_OF[CLASS_OF[w]] for w in words if w in CLASS_OF}
    return found


def test_themed_images_keep_to_one_theme(tmp_path, compact):
    themed = tmp_path / "themed"
    generate_synthetic(themed, images=200, seed=0, design="themed", progress=False)
    per_image = _themes_per_image(themed)
    assert per_image and all(len(t) == 1 for t in per_image.values())  # questions too
    assert {t for ts in per_image.values() for t in ts} == set(range(len(THEMES)))
    # an NLVR2 set's statements and pairs: one theme per set (the identifier's first two fields)
    sets: dict[str, set[int]] = {}
    for ex in json.loads((themed / "nlvr2" / "train.json").read_text()):
        words = re.findall(r"[a-z]+", ex["sent"].lower())
        sets.setdefault(ex["identifier"].rsplit("-", 2)[0], set()).update(
            THEME_OF[CLASS_OF[w]] for w in words if w in CLASS_OF)
    assert sets and all(len(t) == 1 for t in sets.values())
    # the same files and detector as compact; compact's images mix themes
    assert json.loads((themed / "synthetic.json").read_text())["design"] == "themed"
    assert DESIGNS["themed"].feature_dim == DESIGNS["compact"].feature_dim == 64
    assert sum(len(t) > 1 for t in _themes_per_image(compact).values()) > 50
