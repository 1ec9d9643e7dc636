"""data.synthetic_design: the 'compact' generator the demo profile uses, beside the original 'v1'.

Checked: compact's files are the same obj36 TSV format (read back by the official-format reader),
with 64-d features and label ids that fit the demo's 32 / 16-way heads, and its features let a
linear read-out tell the object classes apart; 'v1' stays what it was (2048-d, Visual Genome ids,
no 'design' key in synthetic.json); the field keeps old stage ids and names its own data root."""

from __future__ import annotations

import base64
import csv
import json
import sys

import numpy as np
import pytest

from lxmert_bench.config import DataConfig
from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.synthetic import (
    DESIGNS,
    OBJECT_IDS,
    OBJECTS,
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
