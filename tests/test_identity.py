"""A stage's identity: hashes of finished work never change with an upgrade (DEVELOPERS.md)."""

from __future__ import annotations

import dataclasses

from lxmert_bench.config import (
    ADDED_LATER,
    IDENTITY,
    PROVENANCE,
    TASK_DEFAULTS,
    DataConfig,
    PretrainConfig,
    RunConfig,
)

# Hashes of stages as planned before the identity became declared per field (commit b1c4aae). A
# change here re-plans every finished run of every user: never update these values.
GOLDEN = {
    "default": ("e9bfe2f29c8d", RunConfig()),
    "gqa finetune": ("28d6e4103f6b", RunConfig(kind="finetune", finetune=TASK_DEFAULTS["gqa"],
                                               data=DataConfig(fingerprint="x"), code_version="v")),
    "pretrain": ("ed51aa5578dc", RunConfig(kind="pretrain", pretrain=PretrainConfig(),
                                           code_version="v")),
}


def test_golden_hashes_are_stable():
    for name, (expected, config) in GOLDEN.items():
        assert config.content_hash() == expected, name


def test_provenance_fields_stay_out_of_the_hash():
    base = RunConfig()
    for changed in (dataclasses.replace(base, log_every=7), dataclasses.replace(base, device="cpu"),
                    dataclasses.replace(base, data=dataclasses.replace(base.data, root="/x",
                                                                       num_workers=4))):
        assert changed.content_hash() == base.content_hash()
        assert changed.to_dict() != base.to_dict()  # still recorded in config.json


def _walk_fields():
    from lxmert_bench.config import BertConfig, FinetuneConfig, OptimConfig
    from lxmert_bench.model.config import LxmertConfig

    for cls in (RunConfig, DataConfig, PretrainConfig, FinetuneConfig, BertConfig, OptimConfig,
                LxmertConfig):
        for f in dataclasses.fields(cls):
            yield f"{cls.__name__}.{f.name}", f


def test_added_later_fields_are_hashed_only_away_from_their_default():
    @dataclasses.dataclass(frozen=True)
    class Section:
        old: int = 1
        new: int = dataclasses.field(default=0, metadata=ADDED_LATER)

    from lxmert_bench.config import _identity

    assert _identity(Section()) == {"old": 1}
    assert _identity(Section(new=3)) == {"old": 1, "new": 3}


def test_every_identity_role_is_known():
    roles = {None, PROVENANCE[IDENTITY], ADDED_LATER[IDENTITY]}
    for name, f in _walk_fields():
        assert f.metadata.get(IDENTITY) in roles, name
