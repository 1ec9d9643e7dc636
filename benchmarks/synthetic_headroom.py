"""What the demo's synthetic benchmark leaves to learn: a floor and a ceiling per task.

    python benchmarks/synthetic_headroom.py                 # the demo profile's data (generated)
    python benchmarks/synthetic_headroom.py --root DIR      # a synthetic root already on disk

*Floor* (text only): each dev question answered with the answer its exact text most often has in
the training split (VQA scored with the 10-annotator soft score, GQA exactly, NLVR2 by statement),
so a model at the floor uses no image. *Ceiling* for image-sentence matching: the pretraining
task's pairs (half the sentences swapped for one of another image, as the official code does) judged
by a rule on the detector's labels alone: "matched" when every object class the sentence names is
among the labels of the image's boxes the model reads (``model.num_objects``, by confidence). The
rule uses no training, so its accuracy says the features allow at least that much; a pretraining's
``matched_accuracy`` (log.jsonl) below it is a model that has not learned to check membership.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lxmert_bench.data.features import read_obj_tsv
from lxmert_bench.data.synthetic import DESIGNS, OBJECTS, PLURALS, generate_synthetic

PRETRAIN_FEATURES = ("mscoco_imgfeat/train2014_obj36.tsv", "mscoco_imgfeat/val2014_obj36.tsv",
                     "vg_gqa_imgfeat/vg_gqa_obj36.tsv")
NAME_OF = {**{n: n for n in OBJECTS}, **{p: n for n, p in PLURALS.items()}}


def _load(root: Path, rel: str) -> list[dict]:
    return json.loads((root / rel).read_text())


def text_floor(train: list[dict], dev: list[dict], text: str, score) -> float:
    """Accuracy (%) of the most frequent training answer per exact question text."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for d in train:
        answers[d[text]].update(d["label"] if isinstance(d["label"], dict) else [d["label"]])
    overall = Counter()
    for c in answers.values():
        overall.update(c)
    fallback = overall.most_common(1)[0][0]
    hits = [score(d, (answers.get(d[text]) or Counter({fallback: 1})).most_common(1)[0][0])
            for d in dev]
    return 100.0 * float(np.mean(hits))


def named_classes(sentence: str) -> set[str]:
    return {NAME_OF[w] for w in re.findall(r"[a-z]+", sentence.lower()) if w in NAME_OF}


def matching_ceiling(root: Path, boxes: int, design: str, seed: int = 0) -> dict[str, float]:
    """The label rule's accuracy (%) on official-style matched / mismatched pairs."""
    id_of = {name: DESIGNS[design].object_ids[name] for name in OBJECTS}
    labels = {}
    for rel in PRETRAIN_FEATURES:
        for row in read_obj_tsv(root / rel):
            labels[row["img_id"]] = set(row["objects_id"][:boxes].tolist())
    sentences = [(datum["img_id"], source, s)
                 for split in ("mscoco_train", "mscoco_nominival", "vgnococo")
                 for datum in _load(root, f"lxmert/{split}.json")
                 for source, sents in datum["sentf"].items() for s in sents]
    rng = np.random.default_rng(seed)
    right: dict[str, list[bool]] = defaultdict(list)
    for img_id, source, sent in sentences:
        matched = rng.random() >= 0.5
        if not matched:
            while True:
                other = sentences[int(rng.integers(len(sentences)))]
                if other[0] != img_id:
                    sent = other[2]
                    break
        says = all(id_of[name] in labels[img_id] for name in named_classes(sent))
        right["all"].append(says == matched)
        right["captions" if source in ("mscoco", "vg") else "questions"].append(says == matched)
    return {k: 100.0 * float(np.mean(v)) for k, v in right.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="a synthetic data root (default: generate the demo's)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--design", default="compact")
    ap.add_argument("--boxes", type=int, default=16, help="boxes the model reads (num_objects)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "data"
        if not args.root:
            generate_synthetic(root, images=args.images, design=args.design, progress=False)
        vqa = text_floor(_load(root, "vqa/train.json") + _load(root, "vqa/nominival.json"),
                         _load(root, "vqa/minival.json"), "sent",
                         lambda d, a: min(1.0, d["label"].get(a, 0)))
        gqa = text_floor(_load(root, "gqa/train.json") + _load(root, "gqa/valid.json"),
                         _load(root, "gqa/testdev.json"), "sent",
                         lambda d, a: float(a in d["label"]))
        nlvr2 = text_floor(_load(root, "nlvr2/train.json"), _load(root, "nlvr2/valid.json"),
                           "sent", lambda d, a: float(a == d["label"]))
        ceiling = matching_ceiling(root, args.boxes, args.design)
    print(f"synthetic benchmark ({args.design}, {args.images} images, {args.boxes} boxes read)")
    print(f"text-only floor (dev accuracy %): VQA {vqa:.1f}  GQA {gqa:.1f}  NLVR2 {nlvr2:.1f}")
    print("image-sentence matching, rule on detected labels (%): "
          + "  ".join(f"{k} {v:.1f}" for k, v in sorted(ceiling.items())))


if __name__ == "__main__":
    main()
