"""Paper-vs-code switches are declared once, on their config fields, and every list of them (the
report's, the README's) is derived from those declarations and complete against LXMERT_FACTS.md §9."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lxmert_bench.config import (
    FIXED_DIFFERENCES,
    SWITCH,
    TASK_DEFAULTS,
    PretrainConfig,
    RunConfig,
    leaf_fields,
    switches,
)
from lxmert_bench.report.render import SWITCHES, readme_switches, switches_table
from lxmert_bench.spec import SCHEMA

REPO = Path(__file__).resolve().parents[1]
FACTS = REPO.parent / "shared" / "reference" / "LXMERT_FACTS.md"

# The topics of LXMERT_FACTS.md §9 ("Paper <-> code discrepancies"), as that table lists them; the
# test compares with the file where it is present (it lives outside the repository).
FACTS_TOPICS = (
    "feature regression loss", "loss weights", "label classification", "object masking",
    "QA pretraining", "NLVR² head", "BERT-init ablation", "text embedding", "GQA fine-tuning loss",
)


def _declared_keys() -> list[str]:
    keys = []
    for _tp, f in leaf_fields(RunConfig).values():
        keys += [s.key for s in f.metadata.get(SWITCH, ())]
    return list(dict.fromkeys(keys))


def test_every_declared_switch_is_in_the_report_list():
    assert [k for k, *_ in SWITCHES] == _declared_keys()
    assert len(SWITCHES) >= 9  # the eight of §9 with a switch, plus pretrain.mask_inactive


def test_readme_table_is_the_generated_one():
    readme = (REPO / "README.md").read_text()
    block = readme_switches()
    assert block in readme, ("README.md's paper-vs-code table is out of date; paste in:\n" + block)
    for key in _declared_keys():
        assert f"| `{key}` |" in readme, key
    for fixed in FIXED_DIFFERENCES:
        assert f"| {fixed.what} |" in readme, fixed.what


def test_facts_topics_match_the_reference_file():
    if not FACTS.is_file():
        pytest.skip(f"{FACTS} is not here (outside the repository)")
    text = FACTS.read_text()
    section = text[text.index("## 9."):]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header, rule
    topics = tuple(row.split("|")[1].strip() for row in rows)
    assert topics == FACTS_TOPICS


def test_every_difference_of_the_facts_is_declared():
    covered = {s.facts for s in (*switches(), *FIXED_DIFFERENCES)}
    assert set(FACTS_TOPICS) <= covered, set(FACTS_TOPICS) - covered


def _spec_key(key: str) -> str:
    return "pretrain.bert_layers" if key == "bert_layers" else key


def _default(key: str):
    section, *rest = _spec_key(key).split(".")
    if section == "pretrain":
        return getattr(PretrainConfig(), rest[0])
    task, name = rest
    return getattr(TASK_DEFAULTS[task], name)


@pytest.mark.parametrize("switch", switches(), ids=lambda s: s.key)
def test_each_switch_names_a_spec_key_whose_default_is_the_code(switch):
    assert _spec_key(switch.key) in SCHEMA
    default = _default(switch.key)
    code = round(default, 4) if isinstance(default, float) else default
    assert code == switch.code, (switch.key, default, switch.code)


def test_a_new_switch_reaches_the_report_table():
    """A field declared as a switch is in the report's table with no other edit (the table reads
    the declarations); shown with the switch the planner would write into config.json."""
    pre = dataclasses.asdict(PretrainConfig(feat_loss="l2"))
    table = switches_table({"A": {"pretrain": {"pretrain": pre}}})
    for key, what, *_ in SWITCHES:
        if key.startswith("pretrain."):
            assert what in table, what
    row = next(line for line in table.splitlines() if "RoI-feature regression loss" in line)
    assert "paper" in row.split("|")[-2]
    assert re.search(r"\|\s*l2\s*\|", row)
