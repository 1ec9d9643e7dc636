"""Ablation specs: YAML -> a validated :class:`Spec` (profile and ``--set`` overrides applied).

A spec names paired variants (each a set of dotted overrides on the paper's setup), the tasks, the
seeds and the paper table it reproduces. Every key is checked against the run-config schema before
anything runs; all problems are reported at once, each naming the file, line and key path.

Override precedence, lowest first: the paper's defaults < profile < spec ``base`` < variant < ``--set``.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lxmert_bench.config import (
    TASK_DEFAULTS,
    TASKS,
    VISUAL_LOSSES,
    ConfigTypeError,
    RunConfig,
    convert,
    leaf_fields,
    type_name,
)
from lxmert_bench.model.config import PRESETS, LxmertConfig

PROFILE_DIR = Path(__file__).parent / "profiles"
REFERENCES = ("table3", "table4", "table5")
EXECUTORS = ("auto", "slurm", "local", "debug")
SPEC_KEYS = {
    "name": "the spec's name (letters, digits, '_' or '-'); results go to results/<name>/",
    "title": "a human title for the report",
    "description": "free text",
    "reference": f"the paper table it reproduces: one of {', '.join(REFERENCES)} (or null)",
    "reference_variant": "the variant (with axes: the cell) the others are tested against for "
                         "significance",
    "base": "overrides applied to every variant",
    "variants": "a mapping of variant name -> overrides (or a list of {name, set})",
    "axes": "a mapping of key -> list of values, crossed with the variants (one cell per "
            "combination, named like 'Feat + Label, obj_mask_rate=0.3')",
    "tasks": f"fine-tuning tasks, a subset of {list(TASKS)}",
    "seeds": "a list of integer seeds (fine-tuning; pretraining too with seed_pretraining)",
    "seed_pretraining": "true: one pretraining per seed; false (default): one per variant",
}
PROFILE_KEYS = ("name", "description", "executor", "slurm_profile", "seeds", "max_seeds",
                "overrides")
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit
MAX_YAML_NODES = 100_000  # a spec or profile expanded through its YAML aliases (alias bombs)


class SpecError(Exception):
    """A spec or profile is invalid. ``problems`` are human-readable lines naming file, line and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------------------------
# YAML with line numbers and duplicate-key detection
# --------------------------------------------------------------------------------------------
class _LineLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys and remembers where each key path is."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (tuple) of a composed YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, k.value)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = (*prefix, i)
            lines[path] = v.start_mark.line + 1
            lines.update(_key_lines(v, path))
    return lines


def _expanded_size(node: yaml.Node | None, limit: int) -> int:
    """How many nodes ``node`` becomes once its aliases are expanded (counting stops past
    ``limit``); composing shares aliased nodes, so this is cheap where loading would not be."""
    memo: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        memo[id(n)] = limit + 1  # a recursive alias expands forever
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        memo[id(n)] = min(total, limit + 1)
        return memo[id(n)]

    return size(node) if node is not None else 0


def _load_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "file not found"
        raise SpecError([f"{path}: {kind}"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SpecError([f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); save the file as UTF-8"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise SpecError([f"{path}: expands to more than {MAX_YAML_NODES:,} YAML nodes through "
                             "its aliases (&/*); a spec is a few dozen keys"])
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([f"{where}: invalid YAML: {problem}"]) from None
    return data, _key_lines(node)


class _Where:
    """Formats 'file:line: key.path' for messages."""

    def __init__(self, path: Path | str, lines: dict[tuple, int]):
        self.path, self.lines = path, lines

    def __call__(self, *keys: Any) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.lines:
                return f"{self.path}:{self.lines[keys[:n]]}"
        return str(self.path)


# --------------------------------------------------------------------------------------------
# The override schema: every dotted key a spec may set, with its type
# --------------------------------------------------------------------------------------------
def _build_schema() -> dict[str, Any]:
    schema: dict[str, Any] = {"model.preset": str}
    fields = leaf_fields(RunConfig)
    for key, (tp, _f) in fields.items():
        if key.split(".")[0] in ("model", "data", "bert", "pretrain"):
            schema[key] = tp
    schema.pop("data.fingerprint")  # filled in by the planner
    for key, (tp, _f) in fields.items():
        if key.startswith("finetune.") and key != "finetune.task":
            schema[key] = tp
            for task in TASKS:
                schema[key.replace("finetune.", f"finetune.{task}.", 1)] = tp
    for k in ("log_every", "checkpoint_every", "eval_every_epoch", "device", "precision", "compile",
              "tf32", "tensorboard", "wandb"):
        schema[f"run.{k}"] = fields[k][0]
    return schema


SCHEMA: dict[str, Any] = _build_schema()


def _check_type(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, normalised value) for a value against a schema type (config.convert's checks)."""
    try:
        return True, convert(tp, value)
    except (ConfigTypeError, KeyError):
        return False, value


def _check_value(key: str, value: Any) -> str | None:
    """Range and membership checks beyond the type; returns a problem or None."""
    leaf = key.rsplit(".", 1)[-1]
    if key == "model.preset" and value not in PRESETS:
        return f"unknown model preset {value!r}; known: {sorted(PRESETS)}"
    if key == "model.num_qa_labels":  # in the hash since the start, but no stage reads it
        return ("set by the answer table, not by a spec: lxmert/all_ans.json for pretraining, "
                "the task's answers for fine-tuning")
    if leaf == "visual_losses":
        bad = [v for v in value if v not in VISUAL_LOSSES]
        if bad:
            return f"unknown visual loss(es) {bad}; expected a subset of {list(VISUAL_LOSSES)}"
        if len(set(value)) != len(value):
            return f"repeated visual loss in {list(value)}"
    if leaf.endswith("_rate") or leaf in ("qa_start", "warmup") or key == "pretrain.qa_start":
        if not 0.0 <= value <= 1.0:
            return f"must be within [0, 1], got {value}"
    if leaf in ("lr", "batch_size", "micro_batch_size", "epochs", "log_every", "checkpoint_every",
                "max_seq_length") or (
        key.startswith("model.") and isinstance(value, int) and leaf not in ("x_layers", "r_layers")
    ):
        if isinstance(value, (int, float)) and value <= 0:
            return f"must be positive, got {value}"
    if leaf in ("x_layers", "r_layers", "synthetic_images", "max_steps", "image_limit"):
        if isinstance(value, int) and value < 0:
            return f"must not be negative, got {value}"
    if leaf in ("weight_decay", "grad_clip") and value < 0:
        return f"must not be negative, got {value}"
    if key == "data.max_seq_length" and value < 3:
        return f"must leave room for [CLS] and [SEP] and a word (>= 3), got {value}"
    return None


def flatten(overrides: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (``{pretrain: {optim: {lr: 1}}}`` -> ``pretrain.optim.lr``)."""
    flat: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in SCHEMA:
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def validate_overrides(
    overrides: Any, where: _Where, path: tuple, problems: list[str]
) -> dict[str, Any]:
    """Check a mapping of overrides; append problems; return the normalised flat mapping."""
    label = ".".join(str(p) for p in path)
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        problems.append(f"{where(*path)}: {label}: expected a mapping of key: value overrides, "
                        f"got {type(overrides).__name__}")
        return {}
    flat = flatten(overrides)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        loc = where(*path, *key.split(".")) if key.split(".")[0] in overrides else where(*path, key)
        problem = _key_problem(key)
        if problem is None:
            problem, value = _value_problem(key, value)
        if problem:
            problems.append(f"{loc}: {label}.{key}: {problem}")
            continue
        out[key] = value
    return out


def _key_problem(key: Any) -> str | None:
    """'unknown key' (with a did-you-mean) for a key the schema does not have, else None."""
    if isinstance(key, str) and key in SCHEMA:
        return None
    close = difflib.get_close_matches(str(key), SCHEMA.keys(), n=1, cutoff=0.6)
    return "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")


def _value_problem(key: str, value: Any) -> tuple[str | None, Any]:
    """(problem or None, normalised value) for a value of a schema key."""
    ok, norm = _check_type(SCHEMA[key], value)
    if not ok:
        return f"expected {type_name(SCHEMA[key])}, got {value!r}", value
    bad = _check_value(key, norm) if norm is not None else None
    return bad, norm


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` strings -> a mapping; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError([f"--set {item}: expected key=value (e.g. --set pretrain.optim.lr=5e-5)"])
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", raw.strip(), re.I):
            value = float(raw)  # YAML 1.1 reads '5e-5' as a string
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    executor: str = "auto"
    slurm_profile: str = "default"
    seeds: tuple[int, ...] | None = None  # used by specs that name no seeds
    max_seeds: int | None = None  # run only the first N of a spec's seeds
    overrides: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | None) -> Profile:
    name_or_path = name_or_path or "default"
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name_or_path, available_profiles(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SpecError([f"--profile {name_or_path}: unknown profile{hint} "
                             f"(known: {', '.join(available_profiles())}, or a path to a .yaml)"])
    data, lines = _load_yaml(path)
    where = _Where(path, lines)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError([f"{path}: expected a mapping at the top level"])
    for key in data:
        if key not in PROFILE_KEYS:
            close = difflib.get_close_matches(str(key), PROFILE_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where(key)}: {key}: unknown profile key{hint}")
    executor = data.get("executor", "auto")
    if executor not in EXECUTORS:
        problems.append(f"{where('executor')}: executor: expected one of {list(EXECUTORS)}, got {executor!r}")
    seeds = _checked_seeds(data, where, problems)
    max_seeds = data.get("max_seeds")
    if max_seeds is not None and not (isinstance(max_seeds, int) and not isinstance(max_seeds, bool)
                                      and max_seeds >= 1):
        problems.append(f"{where('max_seeds')}: max_seeds: expected a positive integer, "
                        f"got {max_seeds!r}")
    overrides = validate_overrides(data.get("overrides"), where, ("overrides",), problems)
    if problems:
        raise SpecError(problems)
    return Profile(
        name=str(data.get("name", path.stem)), description=str(data.get("description", "")),
        executor=executor, slurm_profile=str(data.get("slurm_profile", "default")),
        seeds=tuple(seeds) if seeds else None, max_seeds=max_seeds, overrides=overrides,
        path=str(path),
    )


def _checked_seeds(data: dict[str, Any], where: Any, problems: list[str]) -> list[int] | None:
    """The file's ``seeds`` (None when absent); a problem named by file:line and [] when bad."""
    seeds = data.get("seeds")
    problem = None if seeds is None else _seeds_problem(seeds)
    if problem:
        problems.append(f"{where('seeds')}: seeds: {problem}")
        return []
    return seeds


def _seeds_problem(seeds: Any) -> str | None:
    """What is wrong with a seeds list, or None."""
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        return f"expected a non-empty list of integers, got {seeds!r}"
    bad = [x for x in seeds if not 0 <= x <= MAX_SEED]
    if bad:
        return f"seeds must be between 0 and {MAX_SEED} (numpy and torch seeds), got {bad}"
    if len(set(seeds)) != len(seeds):
        return f"a seed is listed twice: {seeds}"
    return None


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row of a report: a declared variant, or one cell of a variant crossed with the axes
    (``group`` the declared variant's name, None without one; ``axis_values`` its axes' values,
    which ``overrides`` holds too)."""

    name: str
    overrides: dict[str, Any]
    group: str | None = None
    axis_values: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    path: str
    variants: tuple[Variant, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    profile: Profile
    reference: str | None = None
    reference_variant: str | None = None
    description: str = ""
    seed_pretraining: bool = False
    base: dict[str, Any] = field(default_factory=dict)
    cli_overrides: dict[str, Any] = field(default_factory=dict)
    declared_seeds: tuple[int, ...] = ()  # as the spec file lists them, before max_seeds
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key, values), crossed with the variants

    @property
    def seeds_note(self) -> str:
        """Says when the profile runs fewer seeds than the spec lists ('' otherwise)."""
        if self.declared_seeds and len(self.seeds) < len(self.declared_seeds):
            return (f"seeds {list(self.seeds)} of the spec's {list(self.declared_seeds)} "
                    f"(profile {self.profile.name}: max_seeds {self.profile.max_seeds})")
        return ""

    def settings(self, variant: Variant) -> dict[str, Any]:
        """The flat overrides in force for one variant, precedence applied."""
        merged: dict[str, Any] = {}
        for layer in (self.profile.overrides, self.base, variant.overrides, self.cli_overrides):
            merged.update(layer)
        return merged

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"{self.path}: no variant named {name!r}")


def load_spec(
    path: str | Path, profile: str | None = None, overrides: list[str] | None = None
) -> Spec:
    """Load and validate a spec; raises :class:`SpecError` listing every problem found."""
    path = Path(path)
    data, lines = _load_yaml(path)
    where = _Where(path, lines)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError([f"{path}: expected a mapping with keys {', '.join(SPEC_KEYS)}"])
    prof: Profile | None = None
    try:
        prof = load_profile(profile)
    except SpecError as e:
        problems.extend(e.problems)

    for key in data:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where(key)}: {key}: unknown spec key{hint} "
                            f"(known: {', '.join(SPEC_KEYS)})")

    name = data.get("name")
    if name is None:
        problems.append(f"{path}: name: missing ({SPEC_KEYS['name']})")
    elif not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        problems.append(f"{where('name')}: name: expected {SPEC_KEYS['name']}, got {name!r}")

    reference = data.get("reference")
    if reference is not None and reference not in REFERENCES:
        problems.append(f"{where('reference')}: reference: expected one of {list(REFERENCES)} "
                        f"or null, got {reference!r}")

    tasks = data.get("tasks", list(TASKS))
    if not isinstance(tasks, list) or not tasks:
        problems.append(f"{where('tasks')}: tasks: expected a non-empty list, a subset of {list(TASKS)}")
        tasks = []
    for i, t in enumerate(tasks):
        if t not in TASKS:
            close = difflib.get_close_matches(str(t), TASKS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where('tasks', i)}: tasks[{i}]: unknown task {t!r}{hint}")
    if len(set(map(str, tasks))) != len(tasks):
        problems.append(f"{where('tasks')}: tasks: a task is listed twice: {tasks}")

    seeds = _checked_seeds(data, where, problems)

    seed_pretraining = data.get("seed_pretraining", False)
    if not isinstance(seed_pretraining, bool):
        problems.append(f"{where('seed_pretraining')}: seed_pretraining: expected a boolean")

    base = validate_overrides(data.get("base"), where, ("base",), problems)

    axes = _load_axes(data.get("axes"), where, problems)
    variants: list[Variant] = []
    raw_variants = data.get("variants")
    if raw_variants is None and axes:
        variants.append(Variant("", {}))  # the axes alone: cells named by their values
    elif raw_variants is None:
        problems.append(f"{path}: variants: missing ({SPEC_KEYS['variants']})")
    elif isinstance(raw_variants, dict):
        if not raw_variants:
            problems.append(f"{where('variants')}: variants: empty; name at least one variant")
        for vname, vover in raw_variants.items():
            if not isinstance(vname, str) or not vname.strip():
                problems.append(f"{where('variants', vname)}: variants: a variant name must be a "
                                f"non-empty string, got {vname!r}")
                continue
            variants.append(Variant(vname, validate_overrides(
                vover if vover is not None else {}, where, ("variants", vname), problems)))
    elif isinstance(raw_variants, list):
        seen: set[str] = set()
        for i, item in enumerate(raw_variants):
            if not isinstance(item, dict) or "name" not in item:
                problems.append(f"{where('variants', i)}: variants[{i}]: expected {{name: ..., set: {{...}}}}")
                continue
            extra = set(item) - {"name", "set"}
            if extra:
                problems.append(f"{where('variants', i)}: variants[{i}]: unknown key(s) {sorted(extra)}; "
                                f"expected 'name' and 'set'")
            vname = item["name"]
            if vname in seen:
                problems.append(f"{where('variants', i)}: variants[{i}]: duplicate variant name {vname!r}")
                continue
            seen.add(vname)
            variants.append(Variant(str(vname), validate_overrides(
                item.get("set") or {}, where, ("variants", i, "set"), problems)))
    else:
        problems.append(f"{where('variants')}: variants: {SPEC_KEYS['variants']}")
    _check_variant_names(variants, where, problems)
    if axes:
        variants = _cross(variants, axes, where, problems)

    ref_variant = data.get("reference_variant")
    names = [v.name for v in variants]
    if ref_variant is not None and ref_variant not in names:
        close = difflib.get_close_matches(str(ref_variant), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        cells = " (with axes, a cell: the variant and its axis values)" if axes else ""
        problems.append(f"{where('reference_variant')}: reference_variant: {ref_variant!r} is not "
                        f"a variant{cells}{hint}")

    try:
        cli = parse_set(overrides)
    except SpecError as e:
        problems.extend(e.problems)
        cli = {}
    cli = validate_overrides(cli, _Where("--set", {}), ("--set",), problems)
    for key, _values in axes:
        if key in cli:
            problems.append(f"--set {key}: {key} is an axis of {path} (axes.{key}); --set would "
                            "give every cell the same value: change the axis instead")

    if problems:
        raise SpecError(problems)
    assert prof is not None
    spec = Spec(
        name=name, title=str(data.get("title") or name), path=str(path), variants=tuple(variants),
        tasks=tuple(tasks), seeds=effective_seeds(seeds, prof), profile=prof,
        reference=reference, reference_variant=ref_variant or (names[-1] if names else None),
        description=str(data.get("description", "")), seed_pretraining=seed_pretraining,
        base=base, cli_overrides=cli, declared_seeds=tuple(seeds or ()), axes=tuple(axes),
    )
    _check_consistency(spec, where, problems)
    if problems:
        raise SpecError(problems)
    return spec


def effective_seeds(spec_seeds: list[int] | None, profile: Profile) -> tuple[int, ...]:
    """Precedence, lowest first: [0] < the profile's ``seeds`` < the spec's ``seeds``; then the
    profile's ``max_seeds`` keeps the first N (the test profile runs one seed of any spec)."""
    seeds = tuple(spec_seeds) if spec_seeds else (profile.seeds or (0,))
    return seeds[:profile.max_seeds] if profile.max_seeds else seeds


def _load_axes(raw: Any, where: _Where, problems: list[str]) -> list[tuple[str, tuple[Any, ...]]]:
    """``axes: {key: [values]}`` -> [(key, normalised values)], each value checked like an
    override of that key."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{where('axes')}: axes: expected a non-empty mapping of key: [values] "
                        f"(e.g. axes: {{pretrain.obj_mask_rate: [0.1, 0.15, 0.3]}}), got {raw!r}")
        return []
    axes: list[tuple[str, tuple[Any, ...]]] = []
    for key, values in flatten(raw).items():
        keypath = tuple(str(key).split(".")) if str(key).split(".")[0] in raw else (key,)
        loc = where("axes", *keypath)
        problem = _key_problem(key)
        if problem:
            problems.append(f"{loc}: axes.{key}: {problem}")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{loc}: axes.{key}: expected a non-empty list of values, "
                            f"got {values!r}")
            continue
        norm: list[Any] = []
        for i, value in enumerate(values):
            problem, value = _value_problem(key, value)
            if problem:
                problems.append(f"{where('axes', *keypath, i)}: axes.{key}[{i}]: "
                                f"{problem}")
            elif value in norm:
                problems.append(f"{loc}: axes.{key}: the value {value!r} is listed twice")
            else:
                norm.append(value)
        if len(norm) == len(values):
            axes.append((key, tuple(norm)))
    return axes


def axis_label(key: str, keys: list[str] | tuple[str, ...]) -> str:
    """An axis as a cell name shows it: the last part of its key where that is unique among the
    spec's axes ('obj_mask_rate'), else the whole key ('pretrain.optim.lr')."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if [k.rsplit(".", 1)[-1] for k in keys].count(leaf) == 1 else key


def format_value(value: Any) -> str:
    """A setting as a cell name shows it, the way a spec would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(format_value, value)) + "]"
    return str(value)


def _cross(variants: list[Variant], axes: list[tuple[str, tuple[Any, ...]]], where: _Where,
           problems: list[str]) -> list[Variant]:
    """Every variant crossed with every combination of the axes' values (variants outermost,
    the last axis fastest), named '<variant>, <axis>=<value>, ...'."""
    keys = [k for k, _ in axes]
    cells: list[Variant] = []
    for v in variants:
        clash = [k for k in keys if k in v.overrides]
        if clash:
            problems.append(f"{where('variants', v.name)}: variant {v.name!r} sets "
                            f"{', '.join(clash)}, which is an axis; set it in axes only")
            continue
        for combo in itertools.product(*(values for _, values in axes)):
            values = tuple(zip(keys, combo))
            parts = [f"{axis_label(k, keys)}={format_value(x)}" for k, x in values]
            cells.append(Variant(", ".join([v.name, *parts] if v.name else parts),
                                 {**v.overrides, **dict(values)}, v.name or None, values))
    counts = Counter(c.name for c in cells)
    for name, n in counts.items():
        if n > 1:
            problems.append(f"{where('axes')}: axes: the cell name {name!r} comes out {n} times "
                            "(a variant named like a cell?); rename the variant")
    return cells


def _check_variant_names(variants: list[Variant], where: _Where, problems: list[str]) -> None:
    """A variant name is one line of printable text: it reaches reports, plots and log lines
    (which escape markup but cannot show a newline or a tab faithfully)."""
    for v in variants:
        if any(ord(c) < 32 or ord(c) == 127 for c in v.name):
            problems.append(f"{where('variants', v.name)}: variants: variant name {v.name!r} holds a "
                            "control character (newline, tab, ...); use one line of printable text")


def _check_consistency(spec: Spec, where: _Where, problems: list[str]) -> None:
    """Cross-key checks that only make sense once every layer is applied."""
    for v in spec.variants:
        s = spec.settings(v)
        loc = where("variants", v.group or v.name)  # a cell of the axes: its declared variant
        preset = s.get("model.preset", "base")
        model = PRESETS.get(preset, LxmertConfig())
        hidden = s.get("model.hidden_size", model.hidden_size)
        heads = s.get("model.num_attention_heads", model.num_attention_heads)
        if hidden % heads:
            problems.append(f"{loc}: variant {v.name!r}: model.hidden_size {hidden} is not divisible "
                            f"by model.num_attention_heads {heads}")
        for task in spec.tasks:
            ft = TASK_DEFAULTS[task]
            loss = s.get(f"finetune.{task}.loss", s.get("finetune.loss", ft.loss))
            if task == "nlvr2" and loss != "ce":
                problems.append(f"{loc}: variant {v.name!r}: finetune.nlvr2.loss must be 'ce' "
                                f"(NLVR2 is 2-way classification), got {loss!r}")
            augment = s.get(f"finetune.{task}.data_augmentation",
                            s.get("finetune.data_augmentation", ft.data_augmentation))
            if task == "nlvr2" and augment:
                problems.append(f"{loc}: variant {v.name!r}: finetune.nlvr2.data_augmentation: only "
                                "VQA and GQA take the other sources' questions; set "
                                "finetune.vqa.data_augmentation / finetune.gqa.data_augmentation")
