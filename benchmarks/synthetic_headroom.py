"""What the demo's synthetic benchmark leaves to learn: a floor and a ceiling per task.

    python benchmarks/synthetic_headroom.py                 # the demo profile's data (generated)
    python benchmarks/synthetic_headroom.py --root DIR      # a synthetic root already on disk
                                                            # (its feature stores are made there
                                                            # if missing, as a run would)

*Floor* (text only): each dev question answered with the answer its exact text most often has in
the task's fine-tuning training splits, scored by ``lxmert_bench.metrics`` (VQA soft score, GQA
exact match, NLVR2 accuracy), so a model at the floor uses no image. *Ceiling* for image-sentence
matching: the pretraining task's pairs (half the sentences swapped for one of another image, as the
official code does) judged by a rule on the detector's labels alone: "matched" when every object
class the sentence names is among the labels of the image's boxes the model reads
(``model.num_objects``, by confidence). The rule uses no training, so its accuracy says the features
allow at least that much; a pretraining's ``matched_accuracy`` (log.jsonl) below it is a model that
has not learned to check membership.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from lxmert_bench.config import PretrainConfig
from lxmert_bench.data.synthetic import DESIGNS, OBJECTS, PLURALS, generate_synthetic
from lxmert_bench.data.tasks import PretrainCorpus
from lxmert_bench.io import read_json
from lxmert_bench.metrics import gqa_accuracy, nlvr2_metrics, vqa_soft_accuracy
from lxmert_bench.spec import load_profile

NAME_OF = {**{n: n for n in OBJECTS}, **{p: n for n, p in PLURALS.items()}}
CAPTION_SOURCES = ("mscoco", "vg")  # the corpus's descriptions; the other sources are questions


def text_only_answers(train: list[dict], dev: list[dict], id_key: str) -> dict[Any, Any]:
    """Each dev item's answer: the one its exact text most often has in ``train`` (weighted by
    the label's scores), or the most frequent overall for a text ``train`` never had."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    for d in train:
        by_text[d["sent"]].update(d["label"] if isinstance(d["label"], dict) else [d["label"]])
    overall = sum(by_text.values(), Counter())
    return {d[id_key]: (by_text.get(d["sent"]) or overall).most_common(1)[0][0] for d in dev}


def text_floors(root: Path) -> dict[str, float]:
    """The text-only floor (dev accuracy %) per task, scored by the tasks' own metrics."""
    def read(task: str, *splits: str) -> list[dict]:
        return [d for split in splits for d in read_json(root / task / f"{split}.json")]

    def floor(train: list[dict], dev: list[dict], id_key: str) -> tuple[dict, dict]:
        """(predictions, labels), both keyed by ``id_key``."""
        return text_only_answers(train, dev, id_key), {d[id_key]: d["label"] for d in dev}

    vqa = floor(read("vqa", "train", "nominival"), read("vqa", "minival"), "question_id")
    gqa = floor(read("gqa", "train", "valid"), read("gqa", "testdev"), "question_id")
    nlvr2 = floor(read("nlvr2", "train"), read("nlvr2", "valid"), "identifier")
    return {"VQA": vqa_soft_accuracy(*vqa), "GQA": gqa_accuracy(*gqa),
            "NLVR2": nlvr2_metrics(*nlvr2)["accuracy"]}


def named_classes(sentence: str) -> set[str]:
    return {NAME_OF[w] for w in re.findall(r"[a-z]+", sentence.lower()) if w in NAME_OF}


def matching_ceiling(root: Path, boxes: int, design: str, seed: int = 0) -> dict[str, float]:
    """The label rule's accuracy (%) on official-style matched / mismatched pairs of the
    pretraining corpus (its training splits, each image's first ``boxes`` boxes)."""
    id_of = {name: DESIGNS[design].object_ids[name] for name in OBJECTS}
    corpus = PretrainCorpus(root, PretrainConfig().train_splits, num_objects=boxes)
    labels = {img: set(corpus.features(img)["objects_id"].tolist()) for img in corpus.img_ids}
    entries = corpus.entries
    rng = np.random.default_rng(seed)
    right: dict[str, list[bool]] = defaultdict(list)
    for entry in entries:
        sent, matched = entry["sent"], rng.random() >= 0.5
        while not matched:  # a sentence of another image, resampled as the official code does
            other = entries[int(rng.integers(len(entries)))]
            if other["img_id"] != entry["img_id"]:
                sent = other["sent"]
                break
        says = all(id_of[name] in labels[entry["img_id"]] for name in named_classes(sent))
        right["all"].append(says == matched)
        right["captions" if entry["source"] in CAPTION_SOURCES else "questions"].append(
            says == matched)
    return {k: 100.0 * float(np.mean(v)) for k, v in right.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="a synthetic data root (default: generate the demo's)")
    demo = load_profile("demo").overrides  # the defaults: what the demo profile reads
    ap.add_argument("--images", type=int, default=demo["data.synthetic_images"])
    ap.add_argument("--design", default=demo["data.synthetic_design"])
    ap.add_argument("--boxes", type=int, default=demo["model.num_objects"],
                    help="boxes the model reads (num_objects; default: the demo profile's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "data"
        if not args.root:
            generate_synthetic(root, images=args.images, design=args.design, progress=False)
        floors = text_floors(root)
        ceiling = matching_ceiling(root, args.boxes, args.design)
    print(f"synthetic benchmark ({args.design}, {args.images} images, {args.boxes} boxes read)")
    print("text-only floor (dev accuracy %): "
          + "  ".join(f"{task} {value:.1f}" for task, value in floors.items()))
    print("image-sentence matching, rule on detected labels (%): "
          + "  ".join(f"{k} {v:.1f}" for k, v in sorted(ceiling.items())))


if __name__ == "__main__":
    main()
