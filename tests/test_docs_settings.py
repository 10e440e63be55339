"""The settings tables in docs/ name exactly the fields of the config classes they document:
a field added, renamed or removed in code fails here until its table says so."""

from __future__ import annotations

import dataclasses
import importlib
import re

import pytest

from repo_root import REPO

# (doc, heading the table follows, "module:Class", prefix of the names in the table, names of
# other configs' fields the table documents beside the class's)
TABLES = [
    ("rl.md", "## Settings", "unmask.train.rl_config:RLConfig", "", set()),
    ("sft.md", "## Settings", "unmask.train.sft:SFTConfig", "", set()),
    ("sampling.md", "## Settings", "unmask.sampling.sampler:SamplerConfig", "", set()),
    ("sampling.md", "## The Rollout", "unmask.sampling.rollout:Rollout", "", set()),
    ("value.md", "## Settings", "unmask.objectives.value.config:ValueConfig", "", set()),
    ("scale.md", "## LoRA", "unmask.models.lora:LoRAConfig", "lora.", {"gradient_checkpointing"}),
    ("scale.md", "### What runs sharded", "unmask.train.sharding:FSDPConfig", "fsdp.", set()),
    ("viz.md", "## The trace page", "unmask.viz.trace:TraceConfig", "", set()),
    ("quickstart.md", "## Options", "unmask.quickstart:QuickstartConfig", "", set()),
    ("eval.md", "## Steps/accuracy sweep", "unmask.eval.sweep:EvalSweep", "sweep.", set()),
]


def _documented(doc: str, heading: str, prefix: str) -> set[str]:
    """Backticked names in the first column of the first table after ``heading``."""
    text = (REPO / "docs" / doc).read_text()
    start = next(i for i, line in enumerate(text.splitlines()) if line.startswith(heading))
    names: set[str] = set()
    in_table = False
    for line in text.splitlines()[start + 1 :]:
        if line.startswith("|"):
            in_table = True
            first = line.split("|")[1]
            found = re.findall(r"`([^`]+)`", first)  # `--flag` spellings are the CLI's
            names |= {n.removeprefix(prefix) for n in found if not n.startswith("-")}
        elif in_table:
            break
    assert in_table, f"docs/{doc}: no table after {heading!r}"
    return names


def _fields(target: str) -> set[str]:
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    return {f.name for f in dataclasses.fields(cls) if f.init}


@pytest.mark.parametrize(("doc", "heading", "target", "prefix", "others"), TABLES)
def test_a_settings_table_names_exactly_the_fields(doc, heading, target, prefix, others):
    documented, fields = _documented(doc, heading, prefix) - others, _fields(target)
    assert not documented - fields, f"docs/{doc} documents fields {target} does not have"
    assert not fields - documented, f"docs/{doc} does not document {sorted(fields - documented)}"
