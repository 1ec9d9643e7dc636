"""Why image-sentence matching stays at chance in the demo: its decision has no first-order part.

    python benchmarks/matching_dynamics.py          # the demo's budget (its pretraining steps)

On the "themed" synthetic design (every scene keeps to one of three themes' classes, data/synthetic.py)
a sentence of another image mostly names another theme, so a rule settles most pairs: "matched"
when the theme of the classes the sentence names is the theme of the image's detected labels. The
demo's model (the demo profile's tiny LXMERT, its boxes, batch size, optimizer, warm-up and
clipping; the matching head on the pooled output) is trained side by side, from the same
initialisation, on

- *image half*: "does the image show theme A?" (the sentence is the image's own),
- *text half*: "does the sentence name a class of theme A?",
- *matching*: the official pairs (half the sentences swapped for one of another image),
- *matching + masked LM*: the same pairs with the masked-LM loss beside it (the official code
  masks words on mismatched pairs too),

and a small MLP on the two halves handed over as inputs (mean word embedding, mean box feature)
on the same matching pairs. Both halves carry a signal on their own; matching is their agreement,
and since the official negatives pair a sentence and an image each drawn as often as in the
matched pairs, neither half alone says anything about the label. Its gradient reaches the encoders
only through the product of the two, which is near zero at initialisation. The table shows what
each learns per step. Masked LM gives the encoders a first-order reason to read both sides (to
fill in a class word the text must read the objects); measured here with the pretraining's own
optimizer, it has not carried matching off chance within 2,500 steps at peak lr 1e-3 either.

    python benchmarks/matching_dynamics.py --steps 2500 --lr 1e-3 --every 250 \
        --runs "matching,matching + masked LM"      # how long matching takes, and with what

Below the table, each column's gradient norm before clipping (whole model, and the visual feature
encoder): the masked boxes' zeroed features make it thousands at the first step and leave the
visual encoder a small share from step ~25 on, so clipping (``--grad-clip 0`` turns it off) is not
what keeps matching at chance.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lxmert_bench.data.synthetic import DESIGNS, PLURALS, THEMES

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "ablations" / "vision_tasks.yaml"
# the demo's No Vision Tasks pretraining with only the matching task left on
SETS = ("data.synthetic_design=themed", "pretrain.mask_lm=false", "pretrain.qa=false")
VALID_EXAMPLES = 1024
THEME_A = 0

Labeller = Callable[[list[int], dict[str, torch.Tensor]], torch.Tensor]


def stage_config(workdir: Path, images: int | None = None) -> Any:
    """The config of the demo's No Vision Tasks pretraining stage with matching as its one task."""
    from lxmert_bench.plan import make_plan
    from lxmert_bench.spec import load_spec

    sets = [*SETS, *([f"data.synthetic_images={images}"] if images else [])]
    plan = make_plan(replace(load_spec(SPEC, "demo", sets), seeds=(0,)), workdir)
    return next(st.config for st in plan.ordered()
                if st.kind == "pretrain" and not st.config.pretrain.visual_losses)


class Themes:
    """Theme of a sentence (by the classes it names) and of an image (by its detected labels)."""

    def __init__(self, tokenizer: Any):
        ids = DESIGNS["themed"].object_ids
        self.of_label = {ids[name]: t for t, names in enumerate(THEMES) for name in names}
        self.of_word = {tokenizer.backend.token_to_id(word): t for t, names in enumerate(THEMES)
                        for name in names for word in (name, PLURALS[name])}

    def sentence(self, input_ids: torch.Tensor) -> int | None:
        found = Counter(self.of_word[i] for i in input_ids.tolist() if i in self.of_word)
        return found.most_common(1)[0][0] if found else None

    def image(self, corpus: Any, index: int) -> int:
        """The theme most of the detected labels of entry ``index``'s image name."""
        objects_id = corpus.features(corpus.entries[index]["img_id"])["objects_id"]
        found = Counter(self.of_label[i] for i in objects_id.tolist() if i in self.of_label)
        return found.most_common(1)[0][0]


def image_half(corpus: Any, themes: Themes) -> Labeller:
    def label(indices: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor([int(themes.image(corpus, i) == THEME_A) for i in indices])
    return label


def text_half(themes: Themes) -> Labeller:
    def label(indices: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor([int(themes.sentence(ids) == THEME_A) for ids in batch["input_ids"]])
    return label


def matched(indices: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["matched_label"]


def theme_rule(corpus: Any, themes: Themes, batches: list[tuple[list[int], dict]]) -> float:
    """Accuracy (%) of "matched when the sentence names no class or the image's theme"."""
    right = total = 0
    for indices, batch in batches:
        for i, ids, label in zip(indices, batch["input_ids"], batch["matched_label"].tolist()):
            said = themes.sentence(ids)
            image = themes.image(corpus, i)
            right += int(said is None or said == image) == label
            total += 1
    return 100.0 * right / total


class GivenHalves(torch.nn.Module):
    """Matching from the halves as inputs: mean word embedding and mean box feature, one hidden
    GELU layer (what the pooler and head are to the encoders' output)."""

    def __init__(self, vocab_size: int, feature_dim: int, hidden: int):
        super().__init__()
        self.words = torch.nn.Embedding(vocab_size, hidden)
        self.boxes = torch.nn.Linear(feature_dim, hidden)
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * hidden, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, feats: torch.Tensor,
                boxes: torch.Tensor, matched_label: torch.Tensor | None = None) -> dict[str, Any]:
        mask = attention_mask[..., None].float()
        text = (self.words(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.head(torch.cat([text, self.boxes(feats).mean(1)], -1))
        out: dict[str, Any] = {"match_logits": logits}
        if matched_label is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, matched_label)
        return out


def batches(examples: Any, count: int, size: int, seed: int) -> list[tuple[list[int], dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        indices = [int(i) for i in rng.integers(len(examples), size=size)]
        out.append((indices, examples.collate([examples.example(i, 0, rng) for i in indices])))
    return out


def accuracy(model: torch.nn.Module, valid: list[tuple[list[int], dict]], label: Labeller) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for indices, b in valid:
            logits = model(b["input_ids"], b["attention_mask"], b["feats"], b["boxes"])["match_logits"]
            right += int((logits.argmax(-1) == label(indices, b)).sum())
            total += len(indices)
    model.train()
    return 100.0 * right / total


@dataclass
class Probe:
    """One column: a model, its examples, and the labels it is trained and validated on."""

    make: Callable[[], torch.nn.Module]
    examples: Any  # PretrainExamples over the training corpus
    valid: str  # which validation batches: "own" sentences or matching "pairs"
    train_label: Labeller
    valid_label: Labeller
    mask_lm: bool = False  # the masked-LM loss beside the head's


def train(probe: Probe, valid: list, optim: Any, steps: int, every: int
          ) -> tuple[list[float], list[tuple[float, float]]]:
    """Validation accuracy every ``every`` steps under the pretraining's optimizer, schedule and
    clipping, and per step the gradient norm before clipping: of the whole model and of the
    visual feature encoder (``visn_fc``: the boxes' projection and LayerNorm)."""
    from lxmert_bench.train.optim import build_optimizer

    model = probe.make()
    params = list(model.parameters())
    visual = [p for name, p in model.named_parameters() if ".visn_fc." in name]
    opt, schedule = build_optimizer(model.parameters(), optim, steps)
    curve, norms = [], []
    for step, (indices, b) in enumerate(batches(probe.examples, steps, optim.batch_size, 0), 1):
        extra = {"masked_lm_labels": b["masked_lm_labels"]} if probe.mask_lm else {}
        loss = model(b["input_ids"], b["attention_mask"], b["feats"], b["boxes"],
                     matched_label=probe.train_label(indices, b), **extra)["loss"]
        loss.backward()
        # one total norm serves the record and the clipping (clip_grad_norm_'s two halves)
        total = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
        if visual:  # an LXMERT (GivenHalves has no visual feature encoder)
            visual_norm = torch.nn.utils.get_total_norm([q.grad for q in visual
                                                         if q.grad is not None])
            norms.append((float(total), float(visual_norm)))
        if optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, optim.grad_clip, total)
        schedule.step()
        opt.step()
        opt.zero_grad()
        if step % every == 0 or step == steps:
            curve.append(accuracy(model, valid, probe.valid_label))
    return curve, norms


NORM_STEPS = (1, 2, 3, 10, 25)  # the first steps, where zeroed (masked) boxes dominate


def norm_line(name: str, norms: list[tuple[float, float]]) -> str:
    """Gradient norms before clipping, ``total (visual feature encoder)``, at the first steps and
    as the median over the rest: a masked box's zeroed features project to the bias alone, 0 at
    initialisation, and the LayerNorm after it divides by that vector's spread (eps 1e-12)."""
    def pair(t: float, v: float) -> str:
        return f"{t:.3g} ({v:.3g})"

    cells = [f"step {s} {pair(*norms[s - 1])}" for s in NORM_STEPS if s <= len(norms)]
    rest = norms[max(NORM_STEPS):]
    if rest:
        total, visual = (float(np.median([n[i] for n in rest])) for i in (0, 1))
        cells.append(f"median of steps {max(NORM_STEPS) + 1}-{len(norms)} {pair(total, visual)}")
    return f"- {name}: " + ", ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, help="training steps (default: the demo's pretraining)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the demo's)")
    ap.add_argument("--grad-clip", type=float,
                    help="gradient clipping norm, 0 for none (default: the demo's, 1.0)")
    ap.add_argument("--every", type=int, default=100, help="validate every this many steps")
    ap.add_argument("--images", type=int, help="synthetic images (default: the demo's)")
    ap.add_argument("--runs", help=f"comma-separated columns (default: all of {', '.join(RUNS)})")
    ap.add_argument("--workdir", help="plan and data here (default: a temporary directory)")
    args = ap.parse_args()
    runs = args.runs.split(",") if args.runs else list(RUNS)
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"--runs: unknown {unknown}; expected some of {list(RUNS)}")
    with tempfile.TemporaryDirectory() as tmp:
        print(run(Path(args.workdir or tmp), args.steps, args.every, args.images, args.lr, runs,
                  args.grad_clip))


RUNS = ("image half", "text half", "matching", "matching + masked LM", "matching, halves given")


def run(workdir: Path, steps: int | None = None, every: int = 100, images: int | None = None,
        lr: float | None = None, runs: list[str] | None = None,
        grad_clip: float | None = None) -> str:
    """Train the columns ``runs`` (default: all) side by side; returns the table."""
    from lxmert_bench.data.root import ensure_data_root
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.loop import steps_per_epoch
    from lxmert_bench.train.pretrain import build_model, load_corpora, make_examples

    torch.set_num_threads(1)
    config = stage_config(workdir, images)
    ensure_data_root(config.data)
    p = config.pretrain
    optim = replace(p.optim, lr=lr or p.optim.lr,
                    grad_clip=p.optim.grad_clip if grad_clip is None else grad_clip)
    train_corpus, valid_corpus = load_corpora(config)
    tokenizer = load_tokenizer(config.data)
    themes = Themes(tokenizer)

    def examples(corpus: Any, **task: bool) -> Any:
        return make_examples(replace(p, **task), corpus, tokenizer, None)

    def lxmert(**task: bool) -> Callable[[], torch.nn.Module]:
        return lambda: build_model(replace(config, pretrain=replace(p, **task)),
                                   len(train_corpus.answer_table))

    budget = p.optim.epochs * steps_per_epoch(len(examples(train_corpus)), p.optim.batch_size)
    steps = steps or budget
    size = optim.batch_size
    valid_sets = {"own": batches(examples(valid_corpus, matched=False),
                                 VALID_EXAMPLES // size, size, seed=1),
                  "pairs": batches(examples(valid_corpus), VALID_EXAMPLES // size, size, seed=1)}
    own, pairs = examples(train_corpus, matched=False), examples(train_corpus)
    probes = {
        "image half": Probe(lxmert(), own, "own", image_half(train_corpus, themes),
                            image_half(valid_corpus, themes)),
        "text half": Probe(lxmert(), own, "own", text_half(themes), text_half(themes)),
        "matching": Probe(lxmert(), pairs, "pairs", matched, matched),
        "matching + masked LM": Probe(lxmert(mask_lm=True), examples(train_corpus, mask_lm=True),
                                      "pairs", matched, matched, mask_lm=True),
        "matching, halves given": Probe(
            lambda: GivenHalves(config.model.vocab_size, config.model.visual_feat_dim,
                                config.model.hidden_size), pairs, "pairs", matched, matched),
    }
    runs = list(runs or RUNS)
    curves, norms, seconds = {}, {}, {}
    for name in runs:
        torch.manual_seed(0)  # every LXMERT column starts from the same weights
        start = time.perf_counter()
        curves[name], norms[name] = train(probes[name], valid_sets[probes[name].valid], optim,
                                          steps, every)
        seconds[name] = time.perf_counter() - start
    rule = theme_rule(valid_corpus, themes, valid_sets["pairs"])
    checkpoints = [min(k * every, steps) for k in range(1, -(-steps // every) + 1)]
    lines = [f"validation accuracy (%, {VALID_EXAMPLES} examples; chance ~50) per training step; "
             f"demo model, batch {size}, peak lr {optim.lr:g}, {config.model.num_objects} boxes; "
             f"the demo's pretraining is {budget} steps at lr {p.optim.lr:g}",
             "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for i, step in enumerate(checkpoints):
        lines.append(f"| {step} | " + " | ".join(f"{curves[n][i]:.1f}" for n in runs) + " |")
    lines.append("| seconds | " + " | ".join(f"{seconds[n]:.0f}" for n in runs) + " |")
    lines.append(f"theme rule on the same matching pairs (no training): {rule:.1f} %")
    clipping = f"then clipped at {optim.grad_clip:g}" if optim.grad_clip else "no clipping"
    lines.append(f"gradient norm ({clipping}), total (visual feature encoder):")
    lines += [norm_line(name, norms[name]) for name in runs if norms[name]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
