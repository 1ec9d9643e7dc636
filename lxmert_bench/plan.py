"""Spec -> plan: a DAG of content-hashed stages (bert? -> pretrain -> finetune per task) x seeds.

Identical stages (same frozen config, same data, same code) get the same hash and are planned once,
also across specs: the paper setup's pretraining that all three tables use is trained once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lxmert_bench.config import (
    OFFICIAL_SEED,
    TASK_DEFAULTS,
    BertConfig,
    DataConfig,
    FinetuneConfig,
    PretrainConfig,
    RunConfig,
)
from lxmert_bench.model.config import LxmertConfig
from lxmert_bench.spec import Spec, Variant

KIND_LEVEL = {"bert": 0, "pretrain": 1, "finetune": 2}
PRETRAIN_SEED = OFFICIAL_SEED  # one pretraining per variant unless seed_pretraining
BERT_SEED = 0


@dataclass
class Stage:
    config: RunConfig
    deps: list[str] = field(default_factory=list)
    users: list[tuple[str, str, int, str]] = field(default_factory=list)  # (spec, variant, seed, task)

    @property
    def stage_id(self) -> str:
        return self.config.stage_id

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def level(self) -> int:
        return KIND_LEVEL[self.kind]

    def describe(self) -> str:
        c = self.config
        if c.kind == "finetune":
            return f"finetune {c.finetune.task} seed {c.seed}"
        if c.kind == "pretrain":
            p = c.pretrain
            tasks = [t for t, on in (("mlm", p.mask_lm), ("match", p.matched), ("qa", p.qa)) if on]
            return f"pretrain [{'+'.join(tasks + list(p.visual_losses)) or 'none'}] init={p.init}"
        return "bert (text-only MLM)"


@dataclass(frozen=True)
class Entry:
    """One cell-run of a report: a variant's fine-tuning on one task with one seed."""

    spec: str
    variant: str
    seed: int
    task: str
    finetune: str
    pretrain: str | None
    bert: str | None


@dataclass
class Plan:
    specs: list[Spec]
    stages: dict[str, Stage]
    entries: list[Entry]

    def ordered(self) -> list[Stage]:
        return sorted(self.stages.values(), key=lambda s: (s.level, s.stage_id))

    def dependents(self, stage_id: str) -> list[str]:
        """Every stage that (transitively) depends on ``stage_id``."""
        out: list[str] = []
        frontier = [stage_id]
        while frontier:
            sid = frontier.pop()
            for st in self.stages.values():
                if sid in st.deps and st.stage_id not in out:
                    out.append(st.stage_id)
                    frontier.append(st.stage_id)
        return out


# ---------------------------------------------------------------------------------------------
def code_version() -> str:
    """The declared version of result-affecting code (``provenance.CODE_VERSION``): part of every
    stage's identity, so editing a comment never re-plans finished work, while a change that alters
    results (and bumps it) never mixes with old ones. ``LXMERT_BENCH_CODE_VERSION`` pins another
    value. The exact code is recorded as provenance in each result."""
    from lxmert_bench.provenance import CODE_VERSION

    return os.environ.get("LXMERT_BENCH_CODE_VERSION") or CODE_VERSION


def _split(settings: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in settings.items() if k.startswith(prefix)}


def apply(obj: Any, flat: dict[str, Any]) -> Any:
    """Apply dotted overrides to a (nested) frozen dataclass."""
    direct = {k: v for k, v in flat.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if "." in k:
            head, rest = k.split(".", 1)
            nested.setdefault(head, {})[rest] = v
    for head, sub in nested.items():
        direct[head] = apply(getattr(obj, head), sub)
    names = {f.name for f in dataclasses.fields(obj)}
    return replace(obj, **{k: v for k, v in direct.items() if k in names})


def synthetic_name(data: DataConfig) -> str:
    """A synthetic benchmark's generator inputs (version, images, seed): its fingerprint and the
    name of its default directory, so a new generator version never reuses old files."""
    from lxmert_bench.data.synthetic import GENERATOR_VERSION

    name = f"synthetic-v{GENERATOR_VERSION}-{data.synthetic_images}-{data.synthetic_seed}"
    return name if data.synthetic_design == "v1" else f"{name}-{data.synthetic_design}"


def _data_config(settings: dict[str, Any], workdir: Path) -> DataConfig:
    data = apply(DataConfig(), _split(settings, "data."))
    if data.synthetic and "data.root" not in settings:
        data = replace(data, root=str(workdir / "data" / synthetic_name(data)))
    return data


def data_fingerprint(data: DataConfig, needs: list[tuple[str, str]]) -> str:
    """Fingerprint of the files a stage reads; for a synthetic benchmark, of its generator inputs."""
    if data.synthetic:
        return synthetic_name(data)
    if not Path(data.root).is_dir():
        return "missing"  # check_data() reports it before anything runs
    from lxmert_bench.data.layout import fingerprint_data_root

    return fingerprint_data_root(data.root, needs)


def data_needs(settings: dict[str, Any], tasks: tuple[str, ...]) -> list[tuple[str, str]]:
    """(dataset, split) pairs the stages of one variant read."""
    needs: list[tuple[str, str]] = []
    p = apply(PretrainConfig(), _split(settings, "pretrain."))
    if p.enabled or p.init == "bert":
        needs += [("lxmert", s) for s in (*p.train_splits, p.valid_split)]
    for task in tasks:
        ft = _finetune_config(settings, task)
        needs += [(task, s) for s in (*ft.train_splits, ft.valid_split)]
    return list(dict.fromkeys(needs))


def _finetune_config(settings: dict[str, Any], task: str) -> FinetuneConfig:
    ft = TASK_DEFAULTS[task]
    common = {k: v for k, v in _split(settings, "finetune.").items()
              if k.split(".")[0] not in TASK_DEFAULTS}
    ft = apply(ft, common)
    return apply(ft, _split(settings, f"finetune.{task}."))


def variant_stages(
    spec: Spec, variant: Variant, seed: int, workdir: Path, fingerprints: dict[str, str],
    version: str,
) -> tuple[list[Stage], list[Entry]]:
    """The stages one (variant, seed) needs, and its report entries (one per task)."""
    s = spec.settings(variant)
    model_over = _split(s, "model.")
    preset = model_over.pop("preset", "base")
    model = LxmertConfig.preset(preset, **model_over)
    data = _data_config(s, workdir)
    key = data.root
    if key not in fingerprints:
        fingerprints[key] = data_fingerprint(data, data_needs(s, spec.tasks))
    data = replace(data, fingerprint=fingerprints[key])
    run = {k: v for k, v in _split(s, "run.").items()}
    common = dict(model=model, data=data, code_version=version, **run)

    pretrain = apply(PretrainConfig(), _split(s, "pretrain."))
    stages: list[Stage] = []

    bert_stage: Stage | None = None
    if pretrain.init == "bert" and pretrain.bert_checkpoint is None:
        # A BERT-base-shaped text encoder (12 layers for the 9 language layers), so that both the
        # official bottom-9 and the paper's top-9 choice are meaningful.
        depth = max(model.l_layers, round(model.l_layers * 4 / 3))
        bert_model = replace(model, l_layers=depth, x_layers=0, r_layers=0)
        bert = apply(BertConfig(), _split(s, "bert."))
        bert_stage = Stage(RunConfig(kind="bert", seed=BERT_SEED, bert=bert,
                                     **{**common, "model": bert_model}))
        stages.append(bert_stage)

    pre_stage: Stage | None = None
    if pretrain.enabled:
        pre_seed = seed if spec.seed_pretraining else PRETRAIN_SEED
        pre_stage = Stage(
            RunConfig(kind="pretrain", seed=pre_seed, pretrain=pretrain,
                      init_from=bert_stage.stage_id if bert_stage else None, **common),
            deps=[bert_stage.stage_id] if bert_stage else [],
        )
        stages.append(pre_stage)

    entries: list[Entry] = []
    for task in spec.tasks:
        ft = _finetune_config(s, task)
        init_from = None
        if pre_stage is not None:
            init_from = pre_stage.stage_id
        elif bert_stage is not None:
            init_from = bert_stage.stage_id
        if pre_stage is None and pretrain.init == "bert":
            ft = replace(ft, bert_layers=pretrain.bert_layers,
                         init_checkpoint=pretrain.bert_checkpoint if bert_stage is None else None)
        if pre_stage is None or not pretrain.qa:
            # no pretrained QA head to transfer (as the official code's --loadLXMERT, not
            # --loadLXMERTQA, for a pretraining without the QA task: Table 4's P20 rows)
            ft = replace(ft, load_qa_head=False)
        fst = Stage(RunConfig(kind="finetune", seed=seed, finetune=ft, init_from=init_from, **common),
                    deps=[init_from] if init_from else [])
        stages.append(fst)
        entries.append(Entry(spec.name, variant.name, seed, task, fst.stage_id,
                             pre_stage.stage_id if pre_stage else None,
                             bert_stage.stage_id if bert_stage else None))
    return stages, entries


def make_plan(specs: list[Spec] | Spec, workdir: str | Path) -> Plan:
    """Expand specs into one plan; identical stages across variants, seeds and specs are merged."""
    if isinstance(specs, Spec):
        specs = [specs]
    workdir = Path(workdir)
    version = code_version()
    fingerprints: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    entries: list[Entry] = []
    for spec in specs:
        for variant in spec.variants:
            for seed in spec.seeds:
                vstages, ventries = variant_stages(spec, variant, seed, workdir, fingerprints, version)
                for st in vstages:
                    merged = stages.setdefault(st.stage_id, st)
                    for e in ventries:
                        if st.stage_id in (e.finetune, e.pretrain, e.bert):
                            user = (spec.name, e.variant, e.seed, e.task)
                            if user not in merged.users:
                                merged.users.append(user)
                entries.extend(ventries)
    return Plan(specs=list(specs), stages=stages, entries=entries)


def plan_notes(plan: Plan) -> list[str]:
    """What `plan` says about a spec beside its stages: seeds a profile leaves out, and a changed
    object mask rate with the visual loss weight kept at the official constant."""
    notes: list[str] = []
    for spec in plan.specs:
        if spec.seeds_note:
            notes.append(f"{spec.name}: {spec.seeds_note}")
        rates: dict[float, list[str]] = {}
        for v in spec.variants:
            s = spec.settings(v)
            p = apply(PretrainConfig(), _split(s, "pretrain."))
            if (p.enabled and p.visual_losses and "pretrain.visual_loss_weight" not in s
                    and p.obj_mask_rate != PretrainConfig.obj_mask_rate):
                rates.setdefault(p.obj_mask_rate, []).append(v.name)
        inert: dict[tuple[str, str], list[str]] = {}
        for v in spec.variants:
            for key, why in inert_settings(spec.settings(v), spec.tasks):
                inert.setdefault((key, why), []).append(v.name)
        for (key, why), names in inert.items():
            notes.append(f"{spec.name}: {key} has no effect in {_some(names)} ({why}), but it is "
                         "part of the stage's identity: set it only where it applies, or such "
                         "variants train the same stage twice")
        for rate, names in rates.items():
            notes.append(
                f"{spec.name}: pretrain.obj_mask_rate is {rate:g} in {_some(names)}, and "
                f"pretrain.visual_loss_weight stays the official constant 1/0.15 "
                f"({PretrainConfig.visual_loss_weight:.4g}), as the official code keeps it whatever "
                "the rate; set pretrain.visual_loss_weight to scale it (e.g. 1/rate)")
    return notes


def _some(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else "")


def inert_settings(settings: dict[str, Any], tasks: tuple[str, ...] = ()
                   ) -> list[tuple[str, str]]:
    """(key, why) for each key a variant sets that its stage never reads: such a key still
    enters the stage's hash (it always has), so it makes a second, identical stage. Fine-tuning
    keys are checked for ``tasks``, as ``finetune.<key>`` (every task) or ``finetune.<task>.<key>``."""
    p = apply(PretrainConfig(), _split(settings, "pretrain."))
    visual = set(p.visual_losses)
    rules = [
        ("pretrain.bert_layers", p.init != "bert", "pretrain.init is not bert"),
        ("pretrain.bert_checkpoint", p.init != "bert", "pretrain.init is not bert"),
        ("pretrain.qa_start", not p.qa, "pretrain.qa is off"),
        ("pretrain.qa_weight", not p.qa, "pretrain.qa is off"),
        ("pretrain.feat_loss", "feat" not in visual, "no feat loss"),
        ("pretrain.label_targets", not visual & {"obj", "attr"}, "no obj or attr loss"),
        ("pretrain.visual_loss_weight", not visual, "no visual loss"),
    ] if p.enabled else []  # no pretraining stage: none of its keys is hashed
    found = [(key, why) for key, inert, why in rules if inert and key in settings]
    for task in tasks:
        ft = _finetune_config(settings, task)
        ft_rules = (
            ("load_qa_head", task == "nlvr2" and ft.load_qa_head, "NLVR² has no QA head"),
            ("init_checkpoint", p.enabled and ft.init_checkpoint is not None,
             "fine-tuning starts from the pretraining"),
            ("bert_layers", p.enabled or (p.init != "bert" and ft.init_checkpoint is None),
             "no BERT weights are loaded into the fine-tuning"),
        )
        for name, inert, why in ft_rules:
            key = next((k for k in (f"finetune.{task}.{name}", f"finetune.{name}") if k in settings),
                       None)
            if inert and key and (key, why) not in found:
                found.append((key, why))
    return found


def check_data(plan: Plan) -> list[str]:
    """Problems with the data the plan reads (missing root or files), named by key and path."""
    from lxmert_bench.data.layout import check_data_root

    problems: list[str] = []
    needs_by_root: dict[str, list[tuple[str, str]]] = {}
    for spec in plan.specs:
        for v in spec.variants:
            s = spec.settings(v)
            data = apply(DataConfig(), _split(s, "data."))
            if data.synthetic:
                if "data.root" in s:  # the default root is named by generator version and inputs
                    from lxmert_bench.data.synthetic import synthetic_root_problem

                    problem = synthetic_root_problem(data.root, data.synthetic_images,
                                                     data.synthetic_seed, data.synthetic_design)
                    if problem:
                        problems.append(f"{spec.path}: data.root: {problem}")
                        continue
                # once generated, its files are checked like any data root's
                root = next((st.config.data.root for st in plan.stages.values()
                             if any(u[:2] == (spec.name, v.name) for u in st.users)), data.root)
                if (Path(root) / "synthetic.json").is_file():
                    needs_by_root.setdefault(root, []).extend(data_needs(s, spec.tasks))
                continue
            needs_by_root.setdefault(data.root, []).extend(data_needs(s, spec.tasks))
            if data.vocab and not Path(data.vocab).is_file():
                problems.append(f"{spec.path}: data.vocab: {data.vocab}: file not found "
                                f"(expected a BERT vocab.txt)")
    for root, needs in needs_by_root.items():
        if not Path(root).is_dir():
            problems.append(f"data.root: {root}: directory not found (expected the LXMERT data "
                            f"layout: vqa/, gqa/, nlvr2/, lxmert/ and the *_imgfeat/ TSVs; set it with "
                            f"--set data.root=PATH, or use --profile demo for the synthetic benchmark)")
            continue
        problems += [f"data.root: {p}" for p in check_data_root(root, list(dict.fromkeys(needs)))]
    return list(dict.fromkeys(problems))


SELECTOR_KEYS = ("kind", "variant", "task", "seed", "stage")


class SelectorError(ValueError):
    """A stage selector that names a key we do not know, or no stage at all."""


def match_stages(plan: Plan, selector: str) -> list[str]:
    """The stage ids a selector names, in plan order.

    A selector is a stage id (``pretrain/0123abcd4567``) or hash prefix, or comma-separated
    ``key=value`` terms, all of which must hold: ``kind`` (bert, pretrain, finetune), ``variant``
    (any spec variant using the stage), ``task`` and ``seed`` (a fine-tuning's own task and seed;
    terms a stage does not have never match it), ``stage`` (id or hash prefix).
    E.g. ``variant=Feat + Label,kind=pretrain`` or ``task=vqa,seed=0``.
    """
    selector = selector.strip()
    if "=" not in selector:
        terms = {"stage": selector}
    else:
        terms = {}
        for part in selector.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in SELECTOR_KEYS:
                raise SelectorError(f"selector {selector!r}: {part.strip()!r} is not KEY=VALUE with "
                                    f"KEY one of {', '.join(SELECTOR_KEYS)}")
            terms[key] = value
    out = [st.stage_id for st in plan.ordered() if _matches(st, terms)]
    if not out:
        raise SelectorError(f"selector {selector!r} names no stage of the plan "
                            f"({len(plan.stages)} stages; see `lxmert-bench plan`)")
    return out


def restrict(plan: Plan, only: list[str]) -> Plan:
    """The part of ``plan`` a selection names (``--only KEY=VALUE``, all terms must hold; keys as
    in :func:`match_stages`) plus every stage those need; stage ids are unchanged, so what runs
    under a selection is shared with the whole spec's run."""
    terms: dict[str, str] = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in SELECTOR_KEYS:
            raise SelectorError(f"--only {item!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(SELECTOR_KEYS)}")
        terms[key.strip()] = value.strip()
    keep = [st.stage_id for st in plan.ordered() if _matches(st, terms)]
    if not keep:
        raise SelectorError(f"--only {' '.join(only)}: names no stage of the plan "
                            f"({len(plan.stages)} stages; see `lxmert-bench plan`)")
    frontier = list(keep)
    while frontier:  # what the selected stages start from
        for dep in plan.stages[frontier.pop()].deps:
            if dep not in keep:
                keep.append(dep)
                frontier.append(dep)
    return Plan(specs=plan.specs, stages={sid: st for sid, st in plan.stages.items() if sid in keep},
                entries=[e for e in plan.entries if e.finetune in keep])


def _matches(st: Stage, terms: dict[str, str]) -> bool:
    c = st.config
    for key, value in terms.items():
        if key == "kind" and c.kind != value:
            return False
        if key == "stage" and not (st.stage_id == value or c.content_hash().startswith(value)):
            return False
        if key == "variant" and value not in {u[1] for u in st.users}:
            return False
        if key == "task" and not (c.kind == "finetune" and c.finetune.task == value):
            return False
        if key == "seed" and not (c.kind == "finetune" and str(c.seed) == value):
            return False
    return True


# GPU-hours per epoch of the stages whose samples/s nobody measured yet, for the base model
# (LXMERT_FACTS.md §3: VQA ~2 h/epoch, GQA ~4 h/epoch on one GPU; NLVR2 assumed ~1.5 h/epoch; the
# BERT stage assumed 24 h per 10 epochs). Pretraining is estimated from the measured samples/s in
# the slurm profile's ``throughput`` table instead (no reference time: the paper's "10 days on 4
# GPUs" was 2019 hardware).
REFERENCE_GPU_HOURS = {"bert": 24 / 10, "vqa": 2.0, "gqa": 4.0, "nlvr2": 1.5}  # per epoch
PRETRAIN_PAIRS = 9_180_000  # sentence-image pairs per pretraining epoch (LXMERT_FACTS.md, "all")


def _param_count(m: LxmertConfig) -> int:
    h, f = m.hidden_size, m.intermediate_size
    layer = 4 * h * h + 2 * h * f  # attention + FFN matrices
    xlayer = 2 * layer + 4 * h * h  # two self-att + two FFN + one shared cross-att
    emb = (m.vocab_size + m.max_position_embeddings + m.type_vocab_size) * h
    return (m.l_layers + m.r_layers) * layer + m.x_layers * xlayer + emb + m.visual_feat_dim * h


def throughput_problems(table: Any) -> list[str]:
    """What is wrong with a slurm profile's ``throughput`` table (``gpu``, ``source``,
    ``samples_per_s: {pretrain|bert|finetune: number or null}``)."""
    if not isinstance(table, dict):
        return ["throughput: expected a mapping (gpu, source, samples_per_s)"]
    out = [f"throughput.{k}: unknown key (known: gpu, samples_per_s, source)"
           for k in table if k not in ("gpu", "samples_per_s", "source")]
    rates = table.get("samples_per_s") or {}
    if not isinstance(rates, dict):
        return [*out, "throughput.samples_per_s: expected a mapping kind -> samples/s"]
    for kind, value in rates.items():
        if kind not in ("bert", "pretrain", "finetune"):
            out.append(f"throughput.samples_per_s.{kind}: unknown stage kind (bert, pretrain, finetune)")
        elif value is not None and not (isinstance(value, (int, float)) and value > 0):
            out.append(f"throughput.samples_per_s.{kind}: expected samples/s > 0 or null "
                       f"(not measured), got {value!r}")
    if rates and not table.get("gpu"):
        out.append("throughput.gpu: name the GPU type the samples/s were measured on")
    return out


def estimate_gpu_hours(config: RunConfig, throughput: dict[str, Any] | None = None) -> float | None:
    """A rough paper-scale estimate; 0 for the synthetic benchmark (minutes on a CPU). Pretraining:
    its samples (epochs x 9.18M pairs) over the profile's measured samples/s per GPU (None when
    that is not measured); other stages: the reference hours per epoch above. Both scale with the
    model's size relative to the base model's and with ``data.image_limit``."""
    if config.data.synthetic:
        return 0.0
    scale = _param_count(config.model) / _param_count(LxmertConfig())
    stage = config.stage
    epochs = stage.optim.epochs
    if config.kind == "pretrain":
        rate = ((throughput or {}).get("samples_per_s") or {}).get("pretrain")
        if not rate:
            return None
        hours = epochs * PRETRAIN_PAIRS / rate / 3600 * scale
    else:
        key = config.finetune.task if config.kind == "finetune" else config.kind
        hours = REFERENCE_GPU_HOURS[key] * epochs * scale
    if config.data.image_limit:
        hours *= min(1.0, config.data.image_limit / 100_000)
    return hours
