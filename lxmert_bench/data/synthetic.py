"""A synthetic benchmark written in the real LXMERT files and formats, where grounding matters.

Every image is a small scene: a few objects (a class such as "dog", a colour, a size, a position)
and background clutter. A simulated detector turns it into an obj36 row: 36 boxes sorted by
confidence (each object's own box, then overlapping duplicates and parts of it at lower
confidence, then background clutter), labels that are right most of the time (objects_id < 1600,
attrs_id < 400), and 2048-d features = 3 x class embedding + colour + size embeddings + noise, so
features carry what the labels say and more. Captions, VQA / GQA / Visual7W-style questions and
NLVR2 statements are generated from the scenes with balanced answers: the same question text has many answers across images, so text
alone cannot answer them. The pretraining corpus covers more images than the task training splits
(as in the real data), so pretraining has something to teach fine-tuning.

Files (same layout as the official data root; see data/layout.py):
    mscoco_imgfeat/{train2014,val2014}_obj36.tsv   vg_gqa_imgfeat/{vg_gqa,gqa_testdev}_obj36.tsv
    nlvr2_imgfeat/{train,valid,test}_obj36.tsv
    vqa/{train,nominival,minival}.json + trainval_{ans2label,label2ans}.json
    gqa/{train,valid,testdev}.json + trainval_{ans2label,label2ans}.json
    nlvr2/{train,valid,test}.json
    lxmert/{mscoco_train,mscoco_nominival,mscoco_minival,vgnococo}.json + all_ans.json
    vocab.txt (1024 entries: the tiny / test model presets' vocab_size), synthetic.json (summary)
"""

from __future__ import annotations

import fcntl
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lxmert_bench.data.answers import convert_ans
from lxmert_bench.data.features import write_obj_tsv
from lxmert_bench.owner import publish_directory

GENERATOR_VERSION = "2"  # bump when the generated files change: it enters the data fingerprint
VOCAB_SIZE = 1024
MIN_IMAGES = 100
NUM_BOXES = 36

# --- the scene vocabulary, mapped to detector label ids (Visual Genome: 1600 objects, 400 attributes)
OBJECTS = ("dog", "cat", "car", "cup", "ball", "chair", "bird", "horse", "bus", "book", "bottle",
           "umbrella")
PLURALS = {name: name + ("es" if name.endswith("s") else "s") for name in OBJECTS}
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray")
SIZES = ("small", "big")
BACKGROUND = ("wall", "floor", "sky", "grass", "table", "window", "road", "tree", "building",
              "water")
BACKGROUND_ATTRS = ("dark", "bright", "wooden", "blurry")
OBJECT_IDS = {name: 31 + 127 * i for i, name in enumerate(OBJECTS)}  # all < 1600
BACKGROUND_IDS = {name: 17 + 127 * i for i, name in enumerate(BACKGROUND)}
COLOR_IDS = {name: 5 + 41 * i for i, name in enumerate(COLORS)}  # all < 400
SIZE_IDS = {"small": 13, "big": 54}
BACKGROUND_ATTR_IDS = {name: 21 + 41 * i for i, name in enumerate(BACKGROUND_ATTRS)}
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (375, 500), (640, 640))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
COUNT_P = (0.55, 0.25, 0.2)  # instances of a class in a scene: 1, 2, 3

# --- how the images are shared out (fractions of `images`); the rest goes to NLVR2
SHARES = {"coco_train": 0.28, "minival": 0.08, "nominival": 0.08, "vg": 0.26, "testdev": 0.06}
VQA_TRAIN_FRACTION = 0.6  # of COCO train images with VQA train questions (all are in pretraining)
GQA_TRAIN_FRACTION = 0.5  # of VG images with GQA train questions
GQA_VALID_FRACTION = 0.15
NLVR2_PAIRS_PER_SET = 4  # image pairs per statement (the identifier's 3rd field)
NLVR2_STATEMENTS_PER_SET = 6
VQA_PER_IMAGE, GQA_PER_IMAGE, V7W_PER_IMAGE, CAPTIONS_PER_IMAGE, REGIONS_PER_IMAGE = 8, 10, 4, 5, 6

# --- the simulated detector and annotators
LABEL_ACCURACY = 0.85  # objects_id is the true class this often
ATTR_ACCURACY = 0.75  # attrs_id is the true colour this often (else another colour or the size)
FEATURE_NOISE = 1.0
CLASS_WEIGHT = 3.0  # a detector's RoI features are mostly about the category (~9x the
# variance of colour + size + noise), as a linear probe on real Faster R-CNN features shows
# A Faster R-CNN's top 36 boxes hold several overlapping proposals and parts per salient object
# (NMS is per class and loose), so most boxes carry an object's appearance, not only one each.
EXTRA_DETECTIONS = (2, 4)  # further boxes per object, drawn from this range (inclusive)
MAX_OBJECT_BOXES = 28  # leave at least 8 boxes to the background clutter
DUPLICATE_CONF = (0.3, 0.45)  # detector confidence of those further boxes
ANNOTATOR_ACCURACY = 0.9  # each of the 10 VQA annotators


@dataclass(frozen=True)
class Design:
    """What ``data.synthetic_design`` chooses: the detector's feature size and label ids, its
    feature recipe, and whether scenes keep to a theme (the question and statement generators and
    the file formats are the same in every design)."""

    feature_dim: int = 2048
    object_ids: dict[str, int] = field(default_factory=lambda: {**OBJECT_IDS, **BACKGROUND_IDS})
    attr_ids: dict[str, int] = field(default_factory=lambda: {**COLOR_IDS, **SIZE_IDS,
                                                             **BACKGROUND_ATTR_IDS})
    class_weight: float = CLASS_WEIGHT
    feature_noise: float = FEATURE_NOISE
    orthogonal: bool = False  # class / attribute codes orthonormal (x sqrt(dim)), not Gaussian
    themes: tuple[tuple[str, ...], ...] = ()  # each scene's classes come from one (none: any)


# "v1": the original generator (Visual Genome-sized label spaces, 2048-d features; test and paper
# profiles). "compact": the same scenes with 64-d features whose class, colour and size codes are
# orthogonal, and label ids below 32 / 16, so the demo's tiny model can use 64-d inputs and
# 32 / 16-way object heads: its step is cheaper and the visual tasks are learnable in minutes.
DESIGNS: dict[str, Design] = {
    "v1": Design(),
    "compact": Design(
        feature_dim=64,
        object_ids={name: i for i, name in enumerate(OBJECTS + BACKGROUND)},
        attr_ids={name: i for i, name in enumerate(COLORS + SIZES + BACKGROUND_ATTRS)},
        class_weight=2.0, feature_noise=0.5, orthogonal=True),
}
# "themed": compact's detector on scenes that each keep to one theme's classes, as a photo of a
# kitchen shows cups and chairs, not buses; questions about absent objects name the theme's
# classes. A sentence of another image then mostly names another theme, so matching has a simple
# rule (benchmarks/matching_dynamics.py); every scene of the other designs mixes any classes.
THEMES = (("cat", "cup", "chair", "book"), ("car", "bus", "umbrella", "bottle"),
          ("dog", "ball", "bird", "horse"))
DESIGNS["themed"] = replace(DESIGNS["compact"], themes=THEMES)


# ---------------------------------------------------------------------------------------------
# Scenes
@dataclass
class Thing:
    name: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # absolute x1, y1, x2, y2

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class Scene:
    img_id: str
    width: int
    height: int
    things: list[Thing] = field(default_factory=list)
    theme: tuple[str, ...] = OBJECTS  # the classes the scene could show (questions about absent
    # objects name one of these)

    def count(self, name: str) -> int:
        return sum(t.name == name for t in self.things)

    def names(self) -> list[str]:
        return sorted({t.name for t in self.things})

    def unique(self) -> list[Thing]:
        """Things whose class occurs once, so 'the dog' names exactly one object."""
        return [t for t in self.things if self.count(t.name) == 1]

    def neighbour(self, thing: Thing, side: str) -> Thing | None:
        """The nearest thing on that side of ``thing`` (by box centre)."""
        if side == "left":
            cands = [t for t in self.things if t.cx < thing.cx]
            return max(cands, key=lambda t: t.cx) if cands else None
        cands = [t for t in self.things if t.cx > thing.cx]
        return min(cands, key=lambda t: t.cx) if cands else None

    def has(self, name: str, color: str | None = None, size: str | None = None) -> bool:
        return any(t.name == name and color in (None, t.color) and size in (None, t.size)
                   for t in self.things)


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def pick_theme(rng: np.random.Generator, design: Design) -> tuple[str, ...]:
    """The classes a new scene may show: one of the design's themes, or all (no draw then)."""
    return _pick(rng, design.themes) if design.themes else OBJECTS


def new_scene(rng: np.random.Generator, img_id: str, design: Design) -> Scene:
    """A scene of 1-3 classes of a theme the design draws (any class where it has none)."""
    theme = pick_theme(rng, design)
    return make_scene(rng, img_id, theme, theme=theme)


def make_scene(rng: np.random.Generator, img_id: str, pool: Sequence[str] = OBJECTS,
               classes: tuple[int, int] = (1, 3), distractor: float = 0.0,
               theme: tuple[str, ...] = OBJECTS) -> Scene:
    """A scene with 1-3 classes from ``pool`` (1-3 instances each) and, with probability
    ``distractor``, one object of a class of ``theme`` outside the pool."""
    width, height = _pick(rng, IMAGE_SIZES)
    k = min(int(rng.integers(classes[0], classes[1] + 1)), len(pool))
    names = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    if distractor and rng.random() < distractor:
        names.append(_pick(rng, [n for n in theme if n not in pool]))
    specs = [name for name in names for _ in range(1 + int(rng.choice(3, p=COUNT_P)))]
    n = len(specs)
    # distinct, well separated horizontal slots so "left of" is never ambiguous
    slots = (np.arange(n) + rng.uniform(0.25, 0.75, n)) / n
    order = rng.permutation(n)
    scene = Scene(img_id, int(width), int(height), theme=tuple(theme))
    for i, name in enumerate(specs):
        color, size = _pick(rng, COLORS), _pick(rng, SIZES)
        frac = rng.uniform(0.16, 0.26) if size == "big" else rng.uniform(0.06, 0.11)
        bw, bh = frac * width, frac * height * rng.uniform(0.8, 1.4)
        cx, cy = slots[order[i]] * width, rng.uniform(0.3, 0.7) * height
        scene.things.append(Thing(name, color, size, _clip_box(cx, cy, bw, bh, width, height)))
    return scene


def _part_box(box: tuple[float, float, float, float], rng: np.random.Generator, width: int,
              height: int) -> tuple[float, float, float, float]:
    """A shifted, shrunken proposal inside an object's box (a part or a duplicate detection)."""
    x1, y1, x2, y2 = box
    bw, bh = (x2 - x1) * rng.uniform(0.5, 0.9), (y2 - y1) * rng.uniform(0.5, 0.9)
    cx = rng.uniform(x1 + bw / 2, x2 - bw / 2)
    cy = rng.uniform(y1 + bh / 2, y2 - bh / 2)
    return _clip_box(cx, cy, bw, bh, width, height)


def _clip_box(cx: float, cy: float, bw: float, bh: float, width: int, height: int
              ) -> tuple[float, float, float, float]:
    x1, x2 = max(0.0, cx - bw / 2), min(width - 1.0, cx + bw / 2)
    y1, y2 = max(0.0, cy - bh / 2), min(height - 1.0, cy + bh / 2)
    return (float(x1), float(y1), float(x2), float(y2))


class Detector:
    """Turns scenes into obj36 rows like a Faster R-CNN with a Visual Genome head would."""

    def __init__(self, seed: int, feature_dim: int, design: Design | None = None):
        rng = np.random.default_rng([seed, 1])
        self.design = design or DESIGNS["v1"]
        self.feature_dim = feature_dim
        self.class_index = {name: i for i, name in enumerate(OBJECTS + BACKGROUND)}
        self.attr_index = {name: i for i, name in enumerate(COLORS + SIZES + BACKGROUND_ATTRS)}
        n_cls, n_attr = len(self.class_index), len(self.attr_index)
        if self.design.orthogonal and n_cls + n_attr <= feature_dim:
            # one orthonormal basis for every class and attribute code (scaled to the Gaussian
            # codes' norm), so no two codes interfere and a linear read-out separates them
            q, _ = np.linalg.qr(rng.standard_normal((feature_dim, n_cls + n_attr)))
            codes = (q.T * np.sqrt(feature_dim)).astype(np.float32)
            self.class_emb, self.attr_emb = codes[:n_cls], codes[n_cls:]
        else:
            self.class_emb = rng.standard_normal((n_cls, feature_dim), dtype=np.float32)
            self.attr_emb = rng.standard_normal((n_attr, feature_dim), dtype=np.float32)

    def row(self, scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
        # each object once (its best detection), then duplicates / parts at lower confidence
        things = [(t, True) for t in scene.things]
        for t in scene.things:
            extra = int(rng.integers(EXTRA_DETECTIONS[0], EXTRA_DETECTIONS[1] + 1))
            things += [(t, False)] * extra
        things = things[:max(MAX_OBJECT_BOXES, len(scene.things))]
        n_real = min(len(things), NUM_BOXES)
        w, h = scene.width, scene.height
        ids, attr_ids = self.design.object_ids, self.design.attr_ids
        boxes = np.zeros((NUM_BOXES, 4), np.float32)
        obj_id = np.zeros(NUM_BOXES, np.int64)
        obj_conf = np.zeros(NUM_BOXES, np.float32)
        attr_id = np.zeros(NUM_BOXES, np.int64)
        attr_conf = np.zeros(NUM_BOXES, np.float32)
        cls = np.zeros(NUM_BOXES, np.int64)  # true class / attribute rows of the embeddings
        attr_a = np.zeros(NUM_BOXES, np.int64)
        attr_b = np.full(NUM_BOXES, -1, np.int64)
        for i, (t, primary) in enumerate(things[:n_real]):
            boxes[i] = t.box if primary else _part_box(t.box, rng, w, h)
            cls[i], attr_a[i], attr_b[i] = (self.class_index[t.name], self.attr_index[t.color],
                                            self.attr_index[t.size])
            if rng.random() < LABEL_ACCURACY:
                obj_id[i], obj_conf[i] = ids[t.name], rng.uniform(0.5, 0.99)
            else:  # a confusion with another object class, at lower confidence
                other = _pick(rng, [n for n in OBJECTS if n != t.name])
                obj_id[i], obj_conf[i] = ids[other], rng.uniform(0.25, 0.6)
            if not primary:  # a duplicate or part: less sure than the object's own box
                obj_conf[i] = rng.uniform(*DUPLICATE_CONF)
            u = rng.random()
            if u < ATTR_ACCURACY:
                attr_id[i] = attr_ids[t.color]
            elif u < ATTR_ACCURACY + (1 - ATTR_ACCURACY) / 2:
                attr_id[i] = attr_ids[_pick(rng, [c for c in COLORS if c != t.color])]
            else:
                attr_id[i] = attr_ids[t.size]
            attr_conf[i] = rng.uniform(0.2, 0.9)
        for i in range(n_real, NUM_BOXES):  # background clutter: large, low confidence
            bg, bg_attr = _pick(rng, BACKGROUND), _pick(rng, BACKGROUND_ATTRS)
            bw, bh = rng.uniform(0.1, 0.7) * w, rng.uniform(0.1, 0.7) * h
            boxes[i] = _clip_box(rng.uniform(0, 1) * w, rng.uniform(0, 1) * h, bw, bh, w, h)
            cls[i], attr_a[i] = self.class_index[bg], self.attr_index[bg_attr]
            obj_id[i], obj_conf[i] = ids[bg], rng.uniform(0.01, 0.3)
            attr_id[i], attr_conf[i] = attr_ids[bg_attr], rng.uniform(0.02, 0.3)
        feats = self.design.class_weight * self.class_emb[cls] + self.attr_emb[attr_a]
        feats[attr_b >= 0] += self.attr_emb[attr_b[attr_b >= 0]]
        feats += self.design.feature_noise * rng.standard_normal(feats.shape, dtype=np.float32)
        np.maximum(feats, 0, out=feats)  # post-ReLU, like pool5 features
        order = np.argsort(-obj_conf, kind="stable")  # the extractor keeps the top 36 by confidence
        return {
            "img_id": scene.img_id, "img_h": h, "img_w": w,
            "objects_id": obj_id[order], "objects_conf": obj_conf[order],
            "attrs_id": attr_id[order], "attrs_conf": attr_conf[order],
            "num_boxes": NUM_BOXES, "boxes": boxes[order], "features": feats[order],
        }


# ---------------------------------------------------------------------------------------------
# Questions. Each generator returns (question, answer, answer_type, question_type) or None when
# the scene does not support it; balanced choices keep text-only guessing at chance.
QA = tuple[str, str, str, str]


def _absent(scene: Scene) -> list[str]:
    return [n for n in scene.theme if not scene.count(n)]


def q_color(rng: np.random.Generator, s: Scene) -> QA | None:
    uniq = s.unique()
    if not uniq:
        return None
    t = _pick(rng, uniq)
    return f"what color is the {t.name}?", t.color, "other", "what color is the"


def q_count(rng: np.random.Generator, s: Scene) -> QA | None:
    # the answer is drawn first (0-3 uniformly), then a class with that many instances
    target = int(rng.integers(4))
    cands = _absent(s) if target == 0 else [n for n in s.names() if s.count(n) == target]
    if not cands:
        return None
    name = _pick(rng, cands)
    tail = "are there" if rng.random() < 0.5 else "are in the picture"
    return f"how many {PLURALS[name]} {tail}?", str(s.count(name)), "number", "how many"


def q_yes_no(rng: np.random.Generator, s: Scene) -> QA | None:
    """'is there a dog in the picture?' or 'is there a red dog?', yes half of the time."""
    if rng.random() < 0.5:
        return q_color_exists(rng, s)
    present = rng.random() < 0.5
    name = _pick(rng, s.names() if present else _absent(s))
    return (f"is there {_a(name)} in the picture?", "yes" if present else "no", "yes/no",
            "is there a")


def q_neighbour(rng: np.random.Generator, s: Scene) -> QA | None:
    side = _pick(rng, ("left", "right"))
    cands = [t for t in s.unique() if s.neighbour(t, side)]
    if not cands:
        return None
    t = _pick(rng, cands)
    return f"what is {side} of the {t.name}?", s.neighbour(t, side).name, "other", "what is"


def q_size(rng: np.random.Generator, s: Scene) -> QA | None:
    uniq = s.unique()
    if not uniq:
        return None
    t = _pick(rng, uniq)
    return f"what size is the {t.name}?", t.size, "other", "what size is the"


def q_color_exists(rng: np.random.Generator, s: Scene) -> QA | None:
    t = _pick(rng, s.things)
    color = t.color if rng.random() < 0.5 else _pick(rng, [c for c in COLORS if c != t.color])
    answer = "yes" if s.has(t.name, color=color) else "no"
    return f"is there {_a(color)} {t.name}?", answer, "yes/no", "is there a"


VQA_QUESTIONS: tuple[Callable[..., QA | None], ...] = (
    q_color, q_count, q_yes_no, q_neighbour, q_size)
V7W_QUESTIONS: tuple[Callable[..., QA | None], ...] = (q_color, q_neighbour)


def g_color(rng: np.random.Generator, s: Scene) -> QA | None:
    uniq = s.unique()
    if not uniq:
        return None
    t = _pick(rng, uniq)
    return f"what is the color of the {t.name}?", t.color, "attribute", "color"


def g_side(rng: np.random.Generator, s: Scene) -> QA | None:
    uniq = s.unique()
    if len(uniq) < 2:
        return None
    i, j = rng.choice(len(uniq), size=2, replace=False)
    a, b = uniq[i], uniq[j]
    answer = "left" if a.cx < b.cx else "right"
    return (f"is the {a.name} to the left or to the right of the {b.name}?", answer, "relation",
            "side")


def g_which(rng: np.random.Generator, s: Scene) -> QA | None:
    colors = Counter(t.color for t in s.things)
    cands = [t for t in s.things if colors[t.color] == 1]
    if not cands:
        return None
    t = _pick(rng, cands)
    return f"which object is {t.color}?", t.name, "object", "which"


def g_both(rng: np.random.Generator, s: Scene) -> QA | None:
    if len(s.names()) < 2:
        return None  # only where both answers are possible, so yes and no stay balanced
    a = _pick(rng, s.names())
    both = rng.random() < 0.5
    b = _pick(rng, [n for n in s.names() if n != a] if both else _absent(s))
    if rng.random() < 0.5:
        a, b = b, a
    return (f"are there both {PLURALS[a]} and {PLURALS[b]} in the image?", "yes" if both else "no",
            "logical", "both")


def g_size(rng: np.random.Generator, s: Scene) -> QA | None:
    uniq = s.unique()
    if not uniq:
        return None
    t = _pick(rng, uniq)
    return f"is the {t.name} small or big?", t.size, "attribute", "size"


def g_neighbour(rng: np.random.Generator, s: Scene) -> QA | None:
    side = _pick(rng, ("left", "right"))
    cands = [t for t in s.unique() if s.neighbour(t, side)]
    if not cands:
        return None
    t = _pick(rng, cands)
    return (f"what is the object to the {side} of the {t.name}?", s.neighbour(t, side).name,
            "relation", "neighbour")


GQA_QUESTIONS: tuple[Callable[..., QA | None], ...] = (
    g_color, g_side, g_which, g_both, g_size, g_neighbour)


def ask(rng: np.random.Generator, scene: Scene, generators: Sequence[Callable[..., QA | None]],
        n: int) -> list[QA]:
    """Up to ``n`` distinct questions about one scene. Generators take turns (one try each per
    round, in a random order) so every question type gets its share and retries never favour the
    answer that has more distinct phrasings."""
    out: list[QA] = []
    seen: set[str] = set()
    for _ in range(-(-n // len(generators)) + 1):
        for i in rng.permutation(len(generators)):
            qa = generators[i](rng, scene)
            if qa and qa[0] not in seen:
                seen.add(qa[0])
                out.append(qa)
                if len(out) == n:
                    return out
    return out


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(t: Thing, rng: np.random.Generator) -> str:
    words = [w for w in (t.size if rng.random() < 0.4 else "", t.color if rng.random() < 0.7 else "")
             if w]
    return _a(" ".join([*words, t.name]))


def captions(rng: np.random.Generator, s: Scene, n: int) -> list[str]:
    """COCO-style captions that describe the scene (true statements)."""
    out: list[str] = []
    for _ in range(3 * n):
        kind = int(rng.integers(4))
        t = _pick(rng, s.things)
        if kind == 0 and s.neighbour(t, "right"):
            text = f"{_article(t, rng)} to the left of {_article(s.neighbour(t, 'right'), rng)}"
        elif kind == 1:
            parts = [f"{NUMBER_WORDS[s.count(n)]} {PLURALS[n]}" if s.count(n) > 1 else _a(n)
                     for n in s.names()]
            text = " and ".join(parts) + " in the picture"
        elif kind == 2:
            text = f"a photo of {_article(t, rng)}"
        else:
            text = f"there is {_a(t.color)} {t.name} on the {'left' if t.cx < s.width / 2 else 'right'}"
        if text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out


def regions(rng: np.random.Generator, s: Scene, n: int) -> list[str]:
    """Visual Genome-style region descriptions: short phrases about one object."""
    out: list[str] = []
    for _ in range(3 * n):
        t = _pick(rng, s.things)
        kind = int(rng.integers(3))
        if kind == 0:
            text = f"{t.color} {t.name}"
        elif kind == 1:
            text = f"{t.size} {t.color} {t.name}"
        else:
            text = f"{t.name} on the {'left' if t.cx < s.width / 2 else 'right'} side"
        if text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out


# --- answers: simulated VQA annotators and Visual7W's sentence-like answers
_CONFUSIONS: dict[str, Sequence[str]] = {
    **{c: COLORS for c in COLORS}, **{n: OBJECTS for n in OBJECTS},
    "yes": ("no",), "no": ("yes",), "small": ("big",), "big": ("small",),
}


def annotate(rng: np.random.Generator, answer: str) -> list[str]:
    """Ten human answers: mostly right, otherwise a plausible confusion."""
    out = []
    for _ in range(10):
        if rng.random() < ANNOTATOR_ACCURACY:
            out.append(answer)
        elif answer.isdigit():
            out.append(str(max(0, int(answer) + _pick(rng, (-1, 1)))))
        else:
            out.append(_pick(rng, [a for a in _CONFUSIONS.get(answer, (answer,)) if a != answer]
                             or [answer]))
    return out


def soft_score(matches: int) -> float | int:
    """The VQA preprocessing's score for an answer given by ``matches`` of the 10 annotators."""
    return {1: 0.3, 2: 0.6, 3: 0.9}.get(matches, 1) if matches else 0


def v7w_answer(rng: np.random.Generator, answer: str) -> str:
    """Visual7W writes answers as short sentences ("Two.", "A dog.", "Grey."); convert_ans undoes it."""
    if answer.isdigit():
        return _sentence(NUMBER_WORDS[int(answer)]) + "."
    if answer == "gray" and rng.random() < 0.5:
        return "Grey."
    if answer in OBJECTS:
        return _sentence(_a(answer) if rng.random() < 0.5 else f"the {answer}") + "."
    return _sentence(answer) + "."


# --- NLVR2 statements about a pair of scenes: (text, predicate(left, right) -> bool)
Statement = tuple[str, Callable[[Scene, Scene], bool]]


def nlvr2_statement(rng: np.random.Generator, pool: Sequence[str]) -> Statement:
    name = _pick(rng, pool)
    pl = PLURALS[name]
    side = _pick(rng, ("left", "right"))
    pick = (lambda a, b: a) if side == "left" else (lambda a, b: b)
    kind = int(rng.integers(8))
    if kind == 0:
        other = "right" if side == "left" else "left"
        return (f"the {side} image has more {pl} than the {other} image",
                lambda a, b: pick(a, b).count(name) > pick(b, a).count(name))
    if kind == 1:
        return (f"both images contain at least one {name}",
                lambda a, b: a.has(name) and b.has(name))
    if kind == 2:
        color = _pick(rng, COLORS)
        return (f"there is {_a(color)} {name} in the {side} image",
                lambda a, b: pick(a, b).has(name, color=color))
    if kind == 3:
        n = int(rng.integers(1, 4))
        verb_noun = f"is exactly one {name}" if n == 1 else f"are exactly {NUMBER_WORDS[n]} {pl}"
        return (f"there {verb_noun} in the {side} image",
                lambda a, b: pick(a, b).count(name) == n)
    if kind == 4:
        return (f"only one of the images contains {_a(name)}",
                lambda a, b: a.has(name) != b.has(name))
    if kind == 5:
        n = int(rng.integers(2, 5))
        return (f"there are {NUMBER_WORDS[n]} {pl} in total",
                lambda a, b: a.count(name) + b.count(name) == n)
    if kind == 6:
        other_name = _pick(rng, [p for p in pool if p != name] or list(OBJECTS))

        def left_of(a: Scene, b: Scene) -> bool:
            s = pick(a, b)
            return any(x.name == name and y.name == other_name and x.cx < y.cx
                       for x in s.things for y in s.things)
        return f"in the {side} image {_a(name)} is to the left of {_a(other_name)}", left_of
    size = _pick(rng, SIZES)
    return (f"there is {_a(size)} {name} in the {side} image",
            lambda a, b: pick(a, b).has(name, size=size))


def nlvr2_set(rng: np.random.Generator, split: str, set_id: int, design: Design
              ) -> tuple[list[dict[str, Any]], list[Scene]]:
    """One NLVR2 'set': image pairs on a theme (three classes) and statements that are true for
    exactly half of the pairs, so the statement alone says nothing about its label."""
    theme = pick_theme(rng, design)
    pool = [theme[i] for i in rng.choice(len(theme), size=3, replace=False)]
    pairs = [tuple(make_scene(rng, f"{split}-{set_id}-{p}-img{k}", pool, classes=(1, 2),
                              distractor=0.3, theme=theme) for k in (0, 1))
             for p in range(NLVR2_PAIRS_PER_SET)]
    statements: list[tuple[str, list[bool]]] = []
    for _ in range(60 * NLVR2_STATEMENTS_PER_SET):
        text, holds = nlvr2_statement(rng, pool)
        truth = [holds(a, b) for a, b in pairs]
        if 2 * sum(truth) == len(truth) and all(text != t for t, _ in statements):
            statements.append((text, truth))
            if len(statements) == NLVR2_STATEMENTS_PER_SET:
                break
    examples = []
    for k, (text, truth) in enumerate(statements):
        for p, label in enumerate(truth):
            examples.append({
                "identifier": f"{split}-{set_id}-{p}-{k}",
                "img0": f"{split}-{set_id}-{p}-img0", "img1": f"{split}-{set_id}-{p}-img1",
                "label": int(label), "sent": _sentence(text) + ".",
            })
    return examples, [s for pair in pairs for s in pair]


# ---------------------------------------------------------------------------------------------
def _allocate(images: int) -> dict[str, int]:
    sizes = {k: max(1, round(v * images)) for k, v in SHARES.items()}
    per_set = 2 * NLVR2_PAIRS_PER_SET
    sets = max(3, (images - sum(sizes.values())) // per_set)
    valid = max(1, round(0.15 * sets))
    sizes.update(nlvr2_train=sets - 2 * valid, nlvr2_valid=valid, nlvr2_test=valid)
    return sizes


def _ids(rng: np.random.Generator, n: int, start: int) -> list[int]:
    """n increasing ids with random gaps (as real ids are sparse)."""
    return (start + np.cumsum(rng.integers(1, 60, size=n))).tolist()


def _dump(path: Path, obj: Any) -> None:
    """Compact JSON through a temporary file and a rename; ordinary (umask) permissions, so a data
    root on a shared filesystem is readable by the cluster's other users."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    tmp.replace(path)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())


def _answer_table(counts: Counter) -> tuple[dict[str, int], list[str]]:
    label2ans = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {a: i for i, a in enumerate(label2ans)}, label2ans


# --- the official GQA question and choices files (gqa/questions/), for the official metrics.
# Derived from the LXMERT-format records alone (no random draws), so every other file stays as
# it was. Each question template maps to its GQA types; "entailed" lists the other questions of
# the same image about one of the same objects (a stand-in for GQA's logical entailment).
_GQA_TEMPLATES: tuple[tuple[re.Pattern[str], str, str, str, str | None, tuple[str, ...]], ...] = (
    # pattern, structural, semantic, detailed, global group, valid answers
    (re.compile(r"What is the color of the (\w+)\?"), "query", "attr", "queryAttr", "color",
     COLORS),
    (re.compile(r"Is the (\w+) to the left or to the right of the (\w+)\?"), "choose", "rel",
     "chooseRel", None, ("left", "right")),
    (re.compile(r"Which object is (\w+)\?"), "query", "cat", "categoryAttr", "object", OBJECTS),
    (re.compile(r"Are there both (\w+) and (\w+) in the image\?"), "logical", "obj", "existAnd",
     None, ("yes", "no")),
    (re.compile(r"Is the (\w+) small or big\?"), "choose", "attr", "chooseAttr", None, SIZES),
    (re.compile(r"What is the object to the (?:left|right) of the (\w+)\?"), "query", "rel",
     "relS", "object", OBJECTS),
)
_SINGULAR = {plural: name for name, plural in PLURALS.items()}


def gqa_official_records(records: list[dict[str, Any]], plausible_from: list[dict[str, Any]]
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(balanced questions, choices) in the official GQA formats for LXMERT-format ``records``;
    an answer is plausible when some question of the same template about the same objects in
    ``plausible_from`` (all splits) has it."""
    def parse(d: dict[str, Any]) -> tuple[tuple, tuple[str, ...]]:
        for template in _GQA_TEMPLATES:
            m = template[0].fullmatch(d["sent"])
            if m:
                names = tuple(_SINGULAR.get(g, g) for g in m.groups() if g not in COLORS)
                return template, names
        raise ValueError(f"synthetic GQA question {d['sent']!r} matches no template")

    seen: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for d in plausible_from:
        template, names = parse(d)
        seen.setdefault((template[3], names), set()).update(d["label"])
    by_image: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    parsed = []
    for d in records:
        template, names = parse(d)
        parsed.append((d, template, names))
        by_image.setdefault(d["img_id"], []).append((d["question_id"], names))
    questions, choices = {}, {}
    for d, (_, structural, semantic, detailed, group, valid), names in parsed:
        qid, answer = d["question_id"], next(iter(d["label"]))
        entailed = [q for q, other in by_image[d["img_id"]] if q != qid and set(other) & set(names)]
        program = [{"operation": "select", "argument": n, "dependencies": []} for n in names]
        program.append({"operation": f"{structural} {semantic}", "argument": detailed,
                        "dependencies": list(range(len(names)))})
        questions[qid] = {
            "question": d["sent"], "imageId": d["img_id"], "answer": answer,
            "fullAnswer": f"The answer is {answer}.", "isBalanced": True,
            "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
            "groups": {"global": group, "local": f"{detailed}-{'-'.join(names)}"},
            "entailed": entailed, "equivalent": [qid], "semantic": program,
            "semanticStr": " ".join(f"{o['operation']}: {o['argument']}" for o in program),
            "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
        }
        choices[qid] = {"valid": list(valid),
                        "plausible": sorted(seen.get((detailed, names), {answer}))}
    return questions, choices


def write_gqa_official_files(out: Path, gqa_task: dict[str, list[dict[str, Any]]]) -> None:
    """``gqa/questions/{val,testdev}_balanced_questions.json`` and ``..._choices.json`` (the GQA
    release's names; LXMERT's ``valid`` split is its ``val`` tier)."""
    everything = [d for split in gqa_task.values() for d in split]
    for split, tier in (("valid", "val"), ("testdev", "testdev")):
        questions, choices = gqa_official_records(gqa_task[split], everything)
        _dump(out / "gqa" / "questions" / f"{tier}_balanced_questions.json", questions)
        _dump(out / "gqa" / "questions" / f"{tier}_choices.json", choices)


def generate_synthetic(out_dir: str | Path, images: int = 600, seed: int = 0,
                       feature_dim: int | None = None, progress: bool = True,
                       design: str = "v1") -> dict[str, Any]:
    """Write the synthetic benchmark into ``out_dir`` (deterministic in ``images``, ``seed``,
    ``design`` and ``feature_dim``, None: the design's); returns a summary (file counts, example
    counts, seconds)."""
    if design not in DESIGNS:
        raise ValueError(f"synthetic design {design!r}: expected one of {sorted(DESIGNS)}")
    recipe = DESIGNS[design]
    feature_dim = recipe.feature_dim if feature_dim is None else feature_dim
    if images < MIN_IMAGES:
        raise ValueError(f"images={images}: the synthetic benchmark needs at least {MIN_IMAGES} "
                         f"images to give every split some")
    if feature_dim < 1:
        raise ValueError(f"feature_dim={feature_dim}: must be positive")
    start = time.perf_counter()
    out = Path(out_dir)
    say = (lambda msg: print(f"[synthetic] {msg}", file=sys.stderr, flush=True)) if progress \
        else (lambda msg: None)
    sizes = _allocate(images)
    rng = np.random.default_rng([seed, 0])  # scenes and text; features use their own streams

    # --- images: COCO (train2014, val2014 = minival first, as the official topk=5000 expects),
    # Visual Genome (pretraining + GQA), GQA testdev, NLVR2 pairs
    coco = _ids(rng, sizes["coco_train"] + sizes["minival"] + sizes["nominival"], 9)
    n_tr, n_mv = sizes["coco_train"], sizes["minival"]
    coco_train = [new_scene(rng, f"COCO_train2014_{i:012d}", recipe) for i in coco[:n_tr]]
    minival = [new_scene(rng, f"COCO_val2014_{i:012d}", recipe) for i in coco[n_tr:n_tr + n_mv]]
    nominival = [new_scene(rng, f"COCO_val2014_{i:012d}", recipe) for i in coco[n_tr + n_mv:]]
    vg = [new_scene(rng, str(i), recipe) for i in _ids(rng, sizes["vg"], 2_300_000)]
    testdev = [new_scene(rng, f"n{i}", recipe) for i in _ids(rng, sizes["testdev"], 100_000)]
    say(f"{images} images: {len(coco_train)} COCO train, {len(minival)} minival, "
        f"{len(nominival)} nominival, {len(vg)} VG, {len(testdev)} GQA testdev")

    # --- VQA: questions for every COCO image (the pretraining corpus reuses them), 10 annotators
    vqa: dict[str, list[dict[str, Any]]] = {}
    raw: dict[str, list[tuple[dict[str, Any], list[str]]]] = {}
    majority: Counter = Counter()
    for name, scenes in (("train", coco_train), ("nominival", nominival), ("minival", minival)):
        raw[name] = []
        for s in scenes:
            number = int(s.img_id.rsplit("_", 1)[1])
            for k, (q, a, atype, qtype) in enumerate(ask(rng, s, VQA_QUESTIONS, VQA_PER_IMAGE)):
                humans = annotate(rng, a)
                majority[Counter(humans).most_common(1)[0][0]] += 1
                datum = {"answer_type": atype, "img_id": s.img_id, "label": {},
                         "question_id": number * 1000 + k, "question_type": qtype,
                         "sent": _sentence(q)}
                raw[name].append((datum, humans))
    vqa_a2l, vqa_l2a = _answer_table(majority)
    for name, items in raw.items():
        for datum, humans in items:
            datum["label"] = {a: soft_score(c) for a, c in Counter(humans).most_common()
                              if a in vqa_a2l}
        vqa[name] = [d for d, _ in items]
    task_train_imgs = {s.img_id for s in coco_train[:round(VQA_TRAIN_FRACTION * len(coco_train))]}
    vqa_task = {"train": [d for d in vqa["train"] if d["img_id"] in task_train_imgs],
                "nominival": vqa["nominival"], "minival": vqa["minival"]}

    # --- GQA: questions on VG images (train / valid subsets) and on testdev images
    qid = iter(_ids(rng, 10 * GQA_PER_IMAGE * (len(vg) + len(testdev)), 1_000_000))
    gqa_by_img: dict[str, list[dict[str, Any]]] = {}
    for s in vg + testdev:
        gqa_by_img[s.img_id] = [
            {"img_id": s.img_id, "label": {a: 1.0}, "question_id": f"{next(qid):08d}",
             "sent": _sentence(q)} for q, a, _, _ in ask(rng, s, GQA_QUESTIONS, GQA_PER_IMAGE)]
    n_gtr = round(GQA_TRAIN_FRACTION * len(vg))
    n_gva = max(1, round(GQA_VALID_FRACTION * len(vg)))
    gqa_task = {
        "train": [d for s in vg[:n_gtr] for d in gqa_by_img[s.img_id]],
        "valid": [d for s in vg[n_gtr:n_gtr + n_gva] for d in gqa_by_img[s.img_id]],
        "testdev": [d for s in testdev for d in gqa_by_img[s.img_id]],
    }
    gqa_a2l, gqa_l2a = _answer_table(Counter(
        a for split in gqa_task.values() for d in split for a in d["label"]))

    # --- NLVR2: sets of image pairs with balanced statements
    nlvr2: dict[str, list[dict[str, Any]]] = {}
    nlvr2_scenes: dict[str, list[Scene]] = {}
    for split in ("train", "valid", "test"):
        nlvr2[split], nlvr2_scenes[split] = [], []
        for set_id in _ids(rng, sizes[f"nlvr2_{split}"], 0):
            examples, scenes = nlvr2_set(rng, split, set_id, recipe)
            nlvr2[split] += examples
            nlvr2_scenes[split] += scenes
        for i, ex in enumerate(nlvr2[split]):
            ex["uid"] = f"nlvr2_{split}_{i}"

    # --- pretraining corpus: captions + QA on all COCO and VG images (more than the task splits)
    vqa_by_img: dict[str, list[dict[str, Any]]] = {}
    for split in vqa.values():
        for d in split:
            vqa_by_img.setdefault(d["img_id"], []).append(d)
    corpus: dict[str, list[dict[str, Any]]] = {}
    for name, scenes in (("mscoco_train", coco_train), ("mscoco_nominival", nominival),
                         ("mscoco_minival", minival)):
        corpus[name] = []
        for s in scenes:
            qs = vqa_by_img.get(s.img_id, [])
            corpus[name].append({
                "img_id": s.img_id, "labelf": {"vqa": [dict(d["label"]) for d in qs]},
                "sentf": {"mscoco": captions(rng, s, CAPTIONS_PER_IMAGE),
                          "vqa": [d["sent"] for d in qs]}})
    corpus["vgnococo"] = []
    for s in vg:
        v7w = ask(rng, s, V7W_QUESTIONS, V7W_PER_IMAGE)
        gq = gqa_by_img[s.img_id]
        corpus["vgnococo"].append({
            "img_id": s.img_id,
            "labelf": {"gqa": [dict(d["label"]) for d in gq],
                       "visual7w": [{v7w_answer(rng, a): 1} for _, a, _, _ in v7w]},
            "sentf": {"vg": regions(rng, s, REGIONS_PER_IMAGE), "gqa": [d["sent"] for d in gq],
                      "visual7w": [_sentence(q) for q, _, _, _ in v7w]}})
    all_ans_counts: Counter = Counter()
    all_ans_dsets: dict[str, set[str]] = {}
    for split in corpus.values():
        for datum in split:
            for source, labels in datum["labelf"].items():
                for label in labels:
                    for ans in label:
                        norm = convert_ans(ans)
                        all_ans_counts[norm] += 1
                        all_ans_dsets.setdefault(norm, set()).add(source)
    all_ans = [{"ans": a, "dsets": sorted(all_ans_dsets[a])}
               for a in _answer_table(all_ans_counts)[1]]

    # --- write the JSONs
    for name, data in vqa_task.items():
        _dump(out / "vqa" / f"{name}.json", data)
    _dump(out / "vqa" / "trainval_ans2label.json", vqa_a2l)
    _dump(out / "vqa" / "trainval_label2ans.json", vqa_l2a)
    for name, data in gqa_task.items():
        _dump(out / "gqa" / f"{name}.json", data)
    _dump(out / "gqa" / "trainval_ans2label.json", gqa_a2l)
    _dump(out / "gqa" / "trainval_label2ans.json", gqa_l2a)
    write_gqa_official_files(out, gqa_task)
    for name, data in nlvr2.items():
        _dump(out / "nlvr2" / f"{name}.json", data)
    for name, data in corpus.items():
        _dump(out / "lxmert" / f"{name}.json", data)
    _dump(out / "lxmert" / "all_ans.json", all_ans)

    # --- vocabulary from every generated text (sentences and raw answers)
    from lxmert_bench.data.text import write_vocab

    words: Counter = Counter()
    for split in corpus.values():
        for datum in split:
            for sents in datum["sentf"].values():
                for sent in sents:
                    words.update(_words(sent))
            for labels in datum["labelf"].values():
                for label in labels:
                    for ans in label:
                        words.update(_words(ans))
    for data in (*vqa_task.values(), *gqa_task.values(), *nlvr2.values()):
        for d in data:
            words.update(_words(d["sent"]))
            for ans in d.get("label", {}) if isinstance(d.get("label"), dict) else ():
                words.update(_words(ans))
    vocab_words = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    write_vocab(vocab_words, out / "vocab.txt", VOCAB_SIZE)

    # --- features, streamed file by file
    detector = Detector(seed, feature_dim, recipe)
    tsvs = {
        "mscoco_imgfeat/train2014_obj36.tsv": coco_train,
        "mscoco_imgfeat/val2014_obj36.tsv": minival + nominival,
        "vg_gqa_imgfeat/vg_gqa_obj36.tsv": vg,
        "vg_gqa_imgfeat/gqa_testdev_obj36.tsv": testdev,
        **{f"nlvr2_imgfeat/{split}_obj36.tsv": scenes for split, scenes in nlvr2_scenes.items()},
    }

    def rows(scenes: list[Scene], stream: int) -> Iterator[dict[str, Any]]:
        feat_rng = np.random.default_rng([seed, 2, stream])
        for s in scenes:
            yield detector.row(s, feat_rng)

    for stream, (rel, scenes) in enumerate(tsvs.items()):
        write_obj_tsv(out / rel, rows(scenes, stream))
        say(f"wrote {rel} ({len(scenes)} images)")
    test_splits = write_test_splits(out, seed, images, detector, testdev, say)

    summary: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION, "images": images, "seed": seed,
        "feature_dim": feature_dim,
        **({"design": design} if design != "v1" else {}),  # v1's summary stays as it was
        "feature_files": {rel: len(scenes) for rel, scenes in tsvs.items()},
        "examples": {**{f"vqa/{k}": len(v) for k, v in vqa_task.items()},
                     **{f"gqa/{k}": len(v) for k, v in gqa_task.items()},
                     **{f"nlvr2/{k}": len(v) for k, v in nlvr2.items()}},
        "pretrain_images": {k: len(v) for k, v in corpus.items()},
        "pretrain_sentences": {k: sum(len(s) for d in v for s in d["sentf"].values())
                               for k, v in corpus.items()},
        "answers": {"vqa": len(vqa_l2a), "gqa": len(gqa_l2a), "lxmert": len(all_ans)},
        "vocab_words": len(vocab_words),
    }
    summary.update(test_splits)
    _dump(out / "synthetic.json", summary)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    say(f"done in {summary['seconds']:.1f}s: " + ", ".join(
        f"{k} {v}" for k, v in summary["examples"].items()))
    return summary


# ---------------------------------------------------------------------------------------------
# Test splits (leaderboard inputs), written after everything else from their own random streams,
# so the other files are byte for byte what they were before these splits existed.
TEST_SCENE_STREAM = 3  # np.random.default_rng([seed, 3]): test scenes and questions
TEST_FEATURE_STREAM = 100  # + k: the k-th test TSV's feature stream (train/dev TSVs use 0..6)
TEST_VQA_SHARE = 0.05  # of the images: COCO test2015 images with VQA test questions
TEST_GQA_EXTRA = 2  # further questions per testdev image in the challenge submission file


def write_test_splits(out: Path, seed: int, images: int, detector: Detector,
                      testdev: Sequence[Scene], say: Callable[[str], None]) -> dict[str, Any]:
    """VQA ``test.json`` (+ ``test2015_obj36.tsv``), GQA ``submit.json`` and NLVR2 ``test2.json``
    (Test-U, + ``test2_obj36.tsv``) in the official formats, without labels as on the real
    leaderboards (GQA testdev and NLVR2 Test-P already exist, labelled, as released). Returns the
    summary's entries for them."""
    rng = np.random.default_rng([seed, TEST_SCENE_STREAM])
    n_vqa = max(2, round(TEST_VQA_SHARE * images))
    coco_test = [new_scene(rng, f"COCO_test2015_{i:012d}", detector.design)
                 for i in _ids(rng, n_vqa, 600_000)]
    vqa_test = []
    for s in coco_test:
        number = int(s.img_id.rsplit("_", 1)[1])
        for k, (q, _a, _atype, _qtype) in enumerate(ask(rng, s, VQA_QUESTIONS, VQA_PER_IMAGE)):
            vqa_test.append({"img_id": s.img_id, "question_id": number * 1000 + k,
                             "sent": _sentence(q)})
    # the challenge file: testdev's questions (unlabelled) and more questions on its images
    released = json.loads((out / "gqa" / "testdev.json").read_text(encoding="utf-8"))
    submit = [{k: d[k] for k in ("img_id", "question_id", "sent")} for d in released]
    qid = iter(_ids(rng, 10 * TEST_GQA_EXTRA * len(testdev), 90_000_000))
    for scene in testdev:
        for q, _a, _t, _u in ask(rng, scene, GQA_QUESTIONS, TEST_GQA_EXTRA):
            submit.append({"img_id": scene.img_id, "question_id": f"{next(qid):08d}",
                           "sent": _sentence(q)})
    test2, test2_scenes = [], []
    for set_id in _ids(rng, _allocate(images)["nlvr2_test"], 0):
        examples, scenes = nlvr2_set(rng, "test2", set_id, detector.design)
        test2 += [{k: v for k, v in ex.items() if k != "label"} for ex in examples]
        test2_scenes += scenes
    for i, ex in enumerate(test2):
        ex["uid"] = f"nlvr2_test2_{i}"
    _dump(out / "vqa" / "test.json", vqa_test)
    _dump(out / "gqa" / "submit.json", submit)
    _dump(out / "nlvr2" / "test2.json", test2)
    tsvs = {"mscoco_imgfeat/test2015_obj36.tsv": coco_test,
            "nlvr2_imgfeat/test2_obj36.tsv": test2_scenes}
    for k, (rel, scenes) in enumerate(tsvs.items()):
        feat_rng = np.random.default_rng([seed, 2, TEST_FEATURE_STREAM + k])
        write_obj_tsv(out / rel, (detector.row(s, feat_rng) for s in scenes))
        say(f"wrote {rel} ({len(scenes)} images, test split)")
    return {"test_feature_files": {rel: len(scenes) for rel, scenes in tsvs.items()},
            "test_examples": {"vqa/test": len(vqa_test), "gqa/submit": len(submit),
                              "nlvr2/test2": len(test2)}}


MARKER = "synthetic.json"  # written last: marks a complete synthetic benchmark of this tool


class DataRootError(ValueError):
    """A directory the synthetic benchmark may not be written into (or read from)."""


def synthetic_root_problem(root: str | Path, images: int, seed: int, design: str = "v1"
                           ) -> str | None:
    """Why ``root`` cannot serve as the synthetic benchmark (``images``, ``seed``) of this generator
    version, or None (also when nothing is there yet, or an empty directory). The tool writes only
    into a missing or empty directory or one it marked as its own (``synthetic.json``), so any
    other content is refused: it is somebody's data."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"{root}: is a file, expected a directory for the synthetic benchmark"
    summary_path = root / MARKER
    if not summary_path.is_file():
        try:
            found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        except OSError as e:
            return f"{root}: cannot be read ({e.strerror})"
        if not found:
            return None
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return (f"{root}: is not empty ({shown}) and is not a synthetic benchmark written by "
                f"lxmert-bench (no {MARKER}); refusing to write into it: point data.root (or --out) "
                "at a missing or empty directory")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{summary_path}: unreadable ({e}); remove {root} to regenerate it"
    if not isinstance(summary, dict):
        return f"{summary_path}: expected a JSON object; remove {root} to regenerate it"
    wanted = {"generator_version": GENERATOR_VERSION, "images": images, "seed": seed,
              "design": design}
    found_inputs = {k: summary.get(k, "v1" if k == "design" else None) for k in wanted}
    if found_inputs == wanted:
        return None
    return (f"{root}: holds a synthetic benchmark with {found_inputs} ({MARKER}), expected "
            f"{wanted}; remove the directory to regenerate it, or point data.root elsewhere")


def ensure_synthetic_root(root: str | Path, images: int, seed: int, progress: bool = True,
                          design: str = "v1"
                          ) -> bool:
    """Make ``root`` hold the synthetic benchmark (``images``, ``seed``); returns True when it was
    generated now, False when it was there already.

    Generated once (under a lock beside ``root``) into a temporary sibling named after this host
    and pid, then renamed into place, so no reader sees half of it. A temporary whose owner died
    (e.g. ``kill -9`` during generation) is removed on the next call on the same host. Raises
    :class:`DataRootError` for a directory holding anything else.
    """
    root = Path(root)
    problem = synthetic_root_problem(root, images, seed, design)
    if problem:
        raise DataRootError(problem)
    if (root / MARKER).is_file():
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            problem = synthetic_root_problem(root, images, seed, design)  # another may have won
            if problem:
                raise DataRootError(problem)
            if (root / MARKER).is_file():
                return False
            if not publish_directory(root, lambda tmp: generate_synthetic(
                    tmp, images, seed, progress=progress, design=design)):
                # someone wrote into it meanwhile, bypassing the lock: theirs stays, and is judged
                problem = synthetic_root_problem(root, images, seed, design)
                if problem:
                    raise DataRootError(problem)
                return False
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True
