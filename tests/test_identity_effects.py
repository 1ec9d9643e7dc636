"""No key enters a stage's identity without an effect (issue 12): every config key that the hash
reads changes the model's inputs (the examples a stage builds, the data root it reads), its
computation (the built model's losses) or its schedule (the real training loop on a toy model,
from the config through ``LoopSettings.from_run``), or the plan; keys that do not, stay out of the
hash as provenance. A new config field fails ``test_every_identity_key_has_a_witness`` until it
says here how it shows.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lxmert_bench.config import (
    IDENTITY,
    TASK_DEFAULTS,
    BertConfig,
    DataConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    leaf_fields,
)
from lxmert_bench.model.config import PRESETS
from lxmert_bench.model.heads import IGNORE
from lxmert_bench.plan import _data_config, apply, data_fingerprint, make_plan
from lxmert_bench.spec import SpecError, load_spec
from lxmert_bench.store import RunDir

ALL = leaf_fields(RunConfig)
IDENTITY_KEYS = sorted(k for k, (_tp, f) in ALL.items() if f.metadata.get(IDENTITY) != "never")
PROVENANCE_KEYS = sorted(k for k, (_tp, f) in ALL.items() if f.metadata.get(IDENTITY) == "never")

# Keys whose effect is what they are: the stage kind, the stage it starts from (whose weights the
# fine-tuning tests load), the data files' fingerprint and the declared code version.
BY_DESIGN = {
    "kind": "which stage runs (bert, pretrain, finetune)",
    "init_from": "the stage whose model.pt is loaded (tests/test_train_finetune.py)",
    "data.fingerprint": "the fingerprint of the files read; changes when they do",
    "code_version": "the declared version of result-affecting code (provenance.CODE_VERSION)",
}
# Keys whose effect is shown by a focused test elsewhere (loading weights needs checkpoints).
ELSEWHERE = {
    "pretrain.bert_layers": "tests/test_weights.py::test_hf_bert_bottom_or_top_layers",
    "finetune.bert_layers": "tests/test_weights.py::test_hf_bert_bottom_or_top_layers",
    "finetune.load_qa_head":
        "tests/test_train_finetune.py::test_qa_head_rows_are_transferred_and_unmapped_rows_zeroed",
    "finetune.init_checkpoint":
        "tests/test_train_finetune.py::test_a_checkpoint_without_encoder_weights_is_an_error_naming_it",
}
# In the hash since the first stages were planned, with no effect on what a stage computes; they
# cannot leave the hash without re-planning every finished stage, so they are shown and named:
# checkpoint_every only decides how often last.pt is written (a resume is exact);
# model.num_qa_labels is replaced by the answer table's size in every stage, and a spec is refused
# when it sets it.
NO_EFFECT = {"checkpoint_every": (7,), "model.num_qa_labels": (77,)}

# key -> (another value, witness, base overrides). Witnesses are below.
CHANGES: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "seed": (1, "loop", {}),
    "eval_every_epoch": (False, "loop", {}),
    "precision": ("bf16", "loop", {}),
    "data.vocab": ("<permuted>", "pretrain_examples", {}),
    "data.synthetic": (False, "data_root", {}),
    "data.synthetic_images": (200, "data_root", {}),
    "data.synthetic_seed": (1, "data_root", {}),
    "data.synthetic_design": ("compact", "data_root", {}),
    "data.feature_dtype": ("float16", "pretrain_examples", {}),
    "data.max_seq_length": (8, "pretrain_examples", {}),
    "data.pad_to": ("longest", "train_batches", {}),
    "data.image_limit": (10, "pretrain_examples", {}),
    "model.num_objects": (10, "pretrain_examples", {}),
    "bert.word_mask_rate": (0.5, "bert_examples", {}),
    "pretrain.mask_lm": (False, "model", {}),
    "pretrain.matched": (False, "model", {}),
    "pretrain.visual_losses": (("feat",), "model", {}),
    "pretrain.qa": (False, "model", {}),
    "pretrain.qa_weight": (2.0, "model", {}),
    "pretrain.feat_loss": ("l2", "model", {}),
    "pretrain.visual_loss_weight": (1.0, "model", {}),
    "pretrain.qa_start": (0.5, "pretrain_examples", {}),
    "pretrain.word_mask_rate": (0.5, "pretrain_examples", {}),
    "pretrain.obj_mask_rate": (0.5, "pretrain_examples", {}),
    "pretrain.obj_mask_mode": ("zero", "pretrain_examples", {}),
    "pretrain.label_targets": ("masked", "pretrain_examples", {}),
    "pretrain.mask_inactive": ("none", "pretrain_examples", {"pretrain.mask_lm": False}),
    "pretrain.train_splits": (("mscoco_train",), "pretrain_examples", {}),
    "pretrain.valid_split": ("mscoco_nominival", "pretrain_examples", {}),
    "pretrain.init": ("bert", "plan", {}),
    "pretrain.bert_checkpoint": ("bert.pt", "plan", {"pretrain.init": "bert"}),
    "pretrain.enabled": (False, "plan", {}),
    "finetune.task": ("nlvr2", "finetune_loss", {}),  # the planner sets it with the task's splits
    "finetune.train_splits": (("train",), "finetune_examples", {}),
    "finetune.valid_split": ("nominival", "finetune_examples", {}),
    "finetune.data_augmentation": (True, "finetune_examples", {}),
    "finetune.loss": ("ce", "finetune_loss", {}),
}
MODEL_CHANGES = {
    "vocab_size": 1000, "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 80,
    "l_layers": 1, "x_layers": 2, "r_layers": 2, "visual_feat_dim": 1024, "visual_pos_dim": 6,
    "hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3,
    "max_position_embeddings": 24, "type_vocab_size": 3, "layer_norm_eps": 1e-3,
    "initializer_range": 0.1, "num_object_labels": 1000, "num_attr_labels": 300,
}
CHANGES.update({f"model.{k}": (v, "model", {}) for k, v in MODEL_CHANGES.items()})
OPTIM_CHANGES = {"optimizer": "adamw", "lr": 0.05, "batch_size": 6, "epochs": 3, "warmup": 0.5,
                 "weight_decay": 0.5, "grad_clip": 0.01, "max_steps": 3}
for section in ("bert", "pretrain", "finetune"):
    CHANGES.update({f"{section}.optim.{k}": (v, "loop", {}) for k, v in OPTIM_CHANGES.items()})


def test_every_identity_key_has_a_witness():
    declared = set(CHANGES) | set(BY_DESIGN) | set(ELSEWHERE) | set(NO_EFFECT)
    assert sorted(declared) == IDENTITY_KEYS, (
        f"identity keys without a witness: {sorted(set(IDENTITY_KEYS) - declared)}; "
        f"declared but not identity keys: {sorted(declared - set(IDENTITY_KEYS))}")


# Why each provenance key cannot change results (a new one says so here).
PROVENANCE_REASONS = {
    "data.root": "where the files are; their fingerprint is hashed",
    "data.num_workers": "examples are functions of their coordinates, whichever process builds them",
    "log_every": "how often the log is written",
    "device": "where it runs (the precision, which can change numbers, is hashed)",
    # these two change numbers within rounding on CUDA (as precision does, which is hashed)
    "compile": "torch.compile of the same model and step (train/loop.py)",
    "tf32": "TF32 tensor cores for fp32 matmuls on CUDA",
    "tensorboard": "a copy of the log's numbers as TensorBoard events (train/trackers.py)",
    "wandb": "a copy of the log's numbers in a W&B run (train/trackers.py)",
    **{f"{s}.optim.micro_batch_size": "gradient accumulation: the same update as the whole batch "
       "(tests/test_train_accumulation.py)" for s in ("bert", "pretrain", "finetune")},
}


def test_provenance_keys_are_the_ones_that_cannot_change_results():
    assert set(PROVENANCE_KEYS) <= set(PROVENANCE_REASONS), \
        f"provenance keys without a reason: {sorted(set(PROVENANCE_KEYS) - set(PROVENANCE_REASONS))}"
    assert {"data.root", "data.num_workers", "log_every", "device"} <= set(PROVENANCE_KEYS)


def test_referenced_tests_exist():
    for ref in ELSEWHERE.values():
        path, name = ref.split("::")
        assert f"def {name}(" in (Path(__file__).parents[1] / path).read_text(), ref


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from lxmert_bench.data.root import ensure_data_root

    path = tmp_path_factory.mktemp("identity") / "syn"
    ensure_data_root(DataConfig(root=str(path), synthetic=True, synthetic_images=100))
    words = (path / "vocab.txt").read_text().splitlines()
    specials = [w for w in words if w.startswith("[")]
    rest = [w for w in words if not w.startswith("[")]
    (path.parent / "permuted_vocab.txt").write_text("\n".join(specials + rest[::-1]) + "\n")
    return path


def _kind(key: str) -> str:
    head = key.split(".")[0]
    return head if head in ("bert", "finetune") else "pretrain"


def base_config(key: str, root: Path, overrides: dict[str, Any]) -> RunConfig:
    data = DataConfig(root=str(root), synthetic=True, synthetic_images=100, fingerprint="x")
    optim = OptimConfig(batch_size=4, epochs=2, max_steps=None)
    cfg = RunConfig(kind=_kind(key), model=PRESETS["test"], data=data, code_version="t",
                    bert=BertConfig(optim=optim), pretrain=PretrainConfig(optim=optim),
                    finetune=dataclasses.replace(TASK_DEFAULTS["vqa"], optim=optim))
    return apply(cfg, overrides)


def changed_config(cfg: RunConfig, key: str, value: Any, root: Path) -> RunConfig:
    if value == "<permuted>":
        value = str(root.parent / "permuted_vocab.txt")
    return apply(cfg, {key: value})


# ------------------------------------------------------------------------------------------------
# witnesses: what a stage reads, computes or schedules, from the config alone
# ------------------------------------------------------------------------------------------------
def _summary(batch: dict[str, Any]) -> tuple:
    out = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape), str(v.dtype), round(float(v.double().sum()), 4)))
    return tuple(out)


def _pretraining_examples(cfg: RunConfig) -> tuple[Any, Any]:
    """The pretraining stage's training examples and validation corpus."""
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.pretrain import load_corpora, make_examples, qa_start_epoch

    p = cfg.pretrain
    train, valid = load_corpora(cfg)
    examples = make_examples(p, train, load_tokenizer(cfg.data), qa_start_epoch(p, p.optim.epochs))
    return examples, valid


def w_pretrain_examples(cfg: RunConfig, tmp: Path) -> tuple:
    from lxmert_bench.train.loop import example_rng

    examples, valid = _pretraining_examples(cfg)
    batch = examples.collate([examples.example(i, 0, example_rng(cfg.seed, 0, 0, i))
                              for i in range(24)])
    return len(examples), len(valid.entries), _summary(batch)


def w_train_batches(cfg: RunConfig, tmp: Path) -> tuple:
    """The batches the training loop reads (LoopSettings.from_run -> iterate_batches)."""
    from lxmert_bench.train.loop import LoopSettings, iterate_batches

    settings = LoopSettings.from_run(cfg, RunDir(tmp, cfg.stage_id), cfg.pretrain.optim)
    examples, _valid = _pretraining_examples(cfg)
    batch = next(iterate_batches(examples, [range(8)], 0, cfg.seed, pad_to=settings.pad_to))
    return _summary(batch)


def w_bert_examples(cfg: RunConfig, tmp: Path) -> tuple:
    from lxmert_bench.train.bert import SentenceExamples, corpus_sentences
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.loop import example_rng

    sentences = corpus_sentences(cfg.data.root, PretrainConfig().train_splits, None)
    examples = SentenceExamples(sentences, load_tokenizer(cfg.data), cfg.bert.word_mask_rate)
    return _summary(examples.collate([examples.example(i, 0, example_rng(0, 0, 0, i))
                                      for i in range(8)]))


def w_finetune_examples(cfg: RunConfig, tmp: Path) -> tuple:
    from lxmert_bench.data.tasks import collate
    from lxmert_bench.train.common import load_tokenizer
    from lxmert_bench.train.finetune import load_datasets

    train, dev = load_datasets(cfg, load_tokenizer(cfg.data))
    picks = [0, len(train) // 2, len(train) - 1]
    return len(train), len(dev), _summary(collate([train[i] for i in picks]))


def w_finetune_loss(cfg: RunConfig, tmp: Path) -> float:
    from lxmert_bench.train.finetune import task_loss

    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 10, generator=g)
    logits = torch.randn(4, 10, generator=g)
    batch = {"target": target, "label": torch.tensor([0, 1, 1, 0])}
    return round(float(task_loss(cfg.finetune.task, logits, batch, cfg.finetune.loss)), 5)


def w_model(cfg: RunConfig, tmp: Path) -> tuple:
    """The pretraining model the stage builds, on one fixed batch in training mode (dropout)."""
    from lxmert_bench.train.loop import DistInfo, start_stage
    from lxmert_bench.train.pretrain import build_model, pretrain_forward

    m, p = cfg.model, cfg.pretrain
    start_stage(cfg, DistInfo())  # seeds the generators the initialisation draws from
    model = build_model(cfg, num_answers=5).train()
    g = torch.Generator().manual_seed(0)
    b, t, n = 2, 8, 5
    lm = torch.randint(0, 100, (b, t), generator=g)
    lm[:, ::2] = IGNORE
    batch = {
        "input_ids": torch.randint(0, 100, (b, t), generator=g),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "feats": torch.rand(b, n, m.visual_feat_dim, generator=g),
        "boxes": torch.rand(b, n, m.visual_pos_dim, generator=g),
        "masked_lm_labels": lm,
        "obj_labels": torch.randint(0, 300, (b, n), generator=g), "obj_weights": torch.ones(b, n),
        "attr_labels": torch.randint(0, 300, (b, n), generator=g), "attr_weights": torch.ones(b, n),
        "feat_labels": torch.rand(b, n, m.visual_feat_dim, generator=g),
        "feat_mask": torch.ones(b, n),
        "matched_label": torch.tensor([1, 0]), "ans": torch.tensor([3, IGNORE]),
    }
    torch.manual_seed(1)
    with torch.no_grad():
        out = pretrain_forward(model, batch, p, with_qa=p.qa, qa_weight=p.qa_weight)
    losses = tuple(sorted((k, round(float(v), 5)) for k, v in out["losses"].items()))
    return losses, round(float(out["loss"]), 5)


def w_data_root(cfg: RunConfig, tmp: Path) -> tuple:
    """The data root and fingerprint the planner gives a stage (the files it reads)."""
    d, default = cfg.data, DataConfig()
    settings = {f"data.{f.name}": getattr(d, f.name) for f in dataclasses.fields(d)
                if f.name not in ("root", "fingerprint") and getattr(d, f.name) != getattr(default, f.name)}
    data = _data_config(settings, Path("workdir"))  # one workdir for both: only the config differs
    return data.root, data_fingerprint(data, [])


def w_plan(cfg: RunConfig, tmp: Path) -> tuple:
    """The stages a one-variant spec with the config's pretraining settings plans."""
    default = PretrainConfig()
    settings = {f"pretrain.{f.name}": getattr(cfg.pretrain, f.name)
                for f in dataclasses.fields(default) if f.name != "optim"
                and getattr(cfg.pretrain, f.name) != getattr(default, f.name)}
    lines = "".join(f"\n    {k}: {v!r}" for k, v in settings.items())
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "one.yaml"
    spec.write_text(textwrap.dedent("""\
        name: one
        tasks: [vqa]
        variants:
          Only:""") + (lines or " {}") + "\n")
    plan = make_plan(load_spec(spec, "test"), tmp / "wd")
    return tuple(sorted((st.kind, tuple(d.split("/")[0] for d in st.deps))
                        for st in plan.stages.values()))


class _Toy:
    """Training data whose examples draw from their per-example generator (seeded by the loop)."""

    def __len__(self) -> int:
        return 24

    def example(self, index: int, epoch: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"x": torch.from_numpy(rng.normal(size=4).astype(np.float32))}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"x": torch.stack([e["x"] for e in examples])}


def w_loop(cfg: RunConfig, tmp: Path) -> tuple:
    """The real loop (start_stage, LoopSettings.from_run, train) on a toy model and toy data:
    final weights, steps and the epochs it evaluated."""
    from lxmert_bench.train.loop import DistInfo, EvalResult, LoopSettings, start_stage, train

    start_stage(cfg, DistInfo())
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    run = tmp / cfg.stage_id
    run_dir = RunDir(tmp, cfg.stage_id)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    settings = LoopSettings.from_run(cfg, run_dir, cfg.stage.optim)
    evaluated: list[int] = []

    def evaluate(_model: nn.Module, epoch: int) -> EvalResult:
        evaluated.append(epoch)
        return EvalResult(metrics={"loss": 0.0})

    def step(m: nn.Module, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        return {"loss": ((m(batch["x"]) - 3.0) ** 2).mean() * 10, "losses": {}}

    summary = train(model, _Toy(), step, settings, evaluate=evaluate)
    weights = tuple(round(float(v.double().sum()), 6) for v in model.state_dict().values())
    return weights, summary.steps, tuple(evaluated)


WITNESSES = {"pretrain_examples": w_pretrain_examples, "bert_examples": w_bert_examples,
             "finetune_examples": w_finetune_examples, "train_batches": w_train_batches, "finetune_loss": w_finetune_loss,
             "model": w_model, "data_root": w_data_root, "plan": w_plan, "loop": w_loop}


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_changing_an_identity_key_changes_what_the_stage_does(key, root, tmp_path, one_thread):
    value, witness, overrides = CHANGES[key]
    base = base_config(key, root, overrides)
    changed = changed_config(base, key, value, root)
    assert changed.content_hash() != base.content_hash(), f"{key} does not enter the hash"
    see = WITNESSES[witness]
    assert see(changed, tmp_path / "b") != see(base, tmp_path / "a"), \
        f"{key}={value!r} changes nothing the {witness} witness sees"


@pytest.mark.parametrize("key", sorted(NO_EFFECT))
def test_identity_keys_without_effect_are_named(key, root, tmp_path, one_thread):
    """What the lead is told: these enter the hash but change nothing a stage computes."""
    (value,) = NO_EFFECT[key]
    base = base_config(key, root, {})
    changed = changed_config(base, key, value, root)
    assert changed.content_hash() != base.content_hash()
    see = w_model if key.startswith("model.") else w_loop
    assert see(changed, tmp_path / "b") == see(base, tmp_path / "a")


def test_a_spec_may_not_set_num_qa_labels(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntasks: [vqa]\nvariants:\n  A: {model.num_qa_labels: 3129}\n")
    with pytest.raises(SpecError, match=r"s.yaml:4: variants.A.model.num_qa_labels: .*answer table"):
        load_spec(spec, "test")


@pytest.mark.parametrize("key", ["log_every", "device", "data.num_workers", "data.root"])
def test_provenance_keys_change_no_hash(key, root):
    base = base_config(key, root, {})
    value = {"log_every": 3, "device": "cpu", "data.num_workers": 2, "data.root": "/elsewhere"}[key]
    changed = apply(base, {key: value})
    assert changed.content_hash() == base.content_hash() and changed.to_dict() != base.to_dict()


# key set where it has no effect -> (the context, another value)
INERT = {
    "pretrain.qa_start": ({"pretrain.qa": False}, 0.5),
    "pretrain.qa_weight": ({"pretrain.qa": False}, 2.0),
    "pretrain.feat_loss": ({"pretrain.visual_losses": ("obj", "attr")}, "l2"),
    "pretrain.visual_loss_weight": ({"pretrain.visual_losses": ()}, 1.0),
}


@pytest.mark.parametrize("key", sorted(INERT))
def test_a_key_without_effect_in_its_variant_is_noted_by_plan(key, root, tmp_path, one_thread):
    """Such a key still makes its own pretraining (its hash differs) for the same computation;
    plan says so."""
    from lxmert_bench.plan import inert_settings, plan_notes

    context, value = INERT[key]
    base = base_config(key, root, context)
    changed = changed_config(base, key, value, root)
    assert changed.content_hash() != base.content_hash()
    for see in (w_model, w_pretrain_examples):
        assert see(changed, tmp_path / "b") == see(base, tmp_path / "a"), see.__name__
    assert [k for k, _ in inert_settings({**context, key: value})] == [key]
    assert inert_settings({key: value}) == []  # where it applies, nothing to say
    overrides = ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}"
                          for k, v in {**context, key: value}.items())
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ntasks: [vqa]\nvariants:\n  A: {{{overrides}}}\n")
    notes = plan_notes(make_plan(load_spec(spec, "test"), tmp_path / "wd"))
    assert any(f"{key} has no effect in 'A'" in n for n in notes), notes


def test_data_augmentation_for_nlvr2_is_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ntasks: [vqa, nlvr2]\nvariants:\n  A: {finetune.data_augmentation: true}\n")
    with pytest.raises(SpecError, match=r"s.yaml:4: variant 'A': finetune.nlvr2.data_augmentation"):
        load_spec(spec, "test")
    spec.write_text("name: s\ntasks: [vqa, nlvr2]\nvariants:\n  A: {finetune.vqa.data_augmentation: true}\n")
    assert load_spec(spec, "test").variants[0].name == "A"


@pytest.mark.parametrize("setting,why", [
    ({"finetune.init_checkpoint": "x.pt"}, "fine-tuning starts from the pretraining"),
    ({"finetune.bert_layers": "top"}, "no BERT weights are loaded into the fine-tuning"),
    ({"finetune.load_qa_head": True}, "NLVR² has no QA head"),
])
def test_plan_notes_fine_tuning_keys_without_effect(setting, why, tmp_path):
    from lxmert_bench.plan import inert_settings, plan_notes

    [(key, value)] = setting.items()
    assert inert_settings(setting, ("nlvr2",)) == [(key, why)]
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\ntasks: [nlvr2]\nvariants:\n  A: {{{key}: {value}}}\n  B: {{}}\n")
    plan = make_plan(load_spec(spec, "test"), tmp_path / "wd")
    finetunes = {e.variant: e.finetune for e in plan.entries}
    assert finetunes["A"] != finetunes["B"]  # a stage of its own, for the same computation
    assert any(f"{key} has no effect in 'A' ({why})" in n for n in plan_notes(plan))
