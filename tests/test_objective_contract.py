"""The contract every registered objective keeps, checked over the registries: a new objective
(one file plus one registry line) is held to it without touching this file.

An objective documents itself, is registered under its ``name``, takes its options as dataclass
fields with defaults, declares its capabilities with the types the trainer reads, passes
:func:`~unmask.objectives.check_options` with its own options, and builds views whose weights
are finite and zero off the scored cells.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unmask.objectives import (
    LOSS_TYPES,
    OBJECTIVES,
    SCALE_REWARDS,
    STEP_OBJECTIVES,
    ViewBatch,
    check_options,
    get_objective,
)
from unmask.sampling import Sampler, SamplerConfig

# capability -> its check; the per-step objectives declare the shared ones
SHARED = {
    "loss_type": lambda v: v in LOSS_TYPES,
    "importance_sampling_level": lambda v: v in ("token", "sequence"),
    "num_iterations": lambda v: type(v) is int and v >= 1,
    "scale_rewards": lambda v: v in SCALE_REWARDS,
    "scores_trace_states": lambda v: type(v) is bool,
    "supports_two_stream": lambda v: type(v) is bool,
}
MASKED_ONLY = {
    "old_logprobs": lambda v: v in ("recompute", "sampler"),
    "scores_sampling_distribution": lambda v: type(v) is bool,
    "masks_prompt": lambda v: type(v) is bool,
    "ratio_free": lambda v: type(v) is bool,
}
REGISTERED = [("masked", n, c) for n, c in OBJECTIVES.items()] + [
    ("step", n, c) for n, c in STEP_OBJECTIVES.items()
]
IDS = [f"{kind}-{name}" for kind, name, _ in REGISTERED]


def _options(cls: type) -> dict[str, object]:
    """Every option at its default."""
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("kind", "name", "cls"), REGISTERED, ids=IDS)
def test_objective_documents_itself_under_its_registry_name(kind, name, cls):
    # a dataclass without a docstring gets its signature as one
    assert cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("), cls
    assert cls.name == name


@pytest.mark.parametrize(("kind", "name", "cls"), REGISTERED, ids=IDS)
def test_options_are_dataclass_fields_with_defaults(kind, name, cls):
    assert dataclasses.is_dataclass(cls)
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING
        assert has_default or f.default_factory is not dataclasses.MISSING, f.name
    cls()  # every option has a default


@pytest.mark.parametrize(("kind", "name", "cls"), REGISTERED, ids=IDS)
def test_capabilities_have_their_declared_types(kind, name, cls):
    checks = SHARED | (MASKED_ONLY if kind == "masked" else {})
    for attribute, valid in checks.items():
        assert valid(getattr(cls, attribute)), (attribute, getattr(cls, attribute))
    options = {f.name for f in dataclasses.fields(cls)}
    assert not options & set(checks), "a capability is a class attribute, not an option"
    assert cls.supports_two_stream == ("two_stream" in options)


@pytest.mark.parametrize(("kind", "name", "cls"), REGISTERED, ids=IDS)
def test_check_options_accepts_its_own_options_and_refuses_a_bogus_one(kind, name, cls):
    check_options(name, _options(cls))
    with pytest.raises(ValueError, match=rf"objective '{name}' has no option\(s\) \['bogus'\]"):
        check_options(name, {**_options(cls), "bogus": 1})


def test_check_options_takes_the_union_of_the_masked_and_per_step_forms():
    check_options("tracerl", {"shrink": 2})  # the masked form only: the model kind is not known
    with pytest.raises(ValueError, match=r"its options: \[.*'mc_samples'.*'selection'"):
        check_options("agrpo", {"shrink": 2})
    with pytest.raises(ValueError, match=r"unknown objective 'ppo'; choose one of \[.*'tracerl'"):
        check_options("ppo", {})


@pytest.fixture(scope="module")
def rollout(block_model):
    config = SamplerConfig(gen_length=8, return_logprobs=True)
    return Sampler(config).generate(block_model, ["12", "hello there", "7"])


VARIANTS = [(name, {}) for name in OBJECTIVES] + [
    (name, {"two_stream": True}) for name, cls in OBJECTIVES.items() if cls.supports_two_stream
]


@pytest.mark.parametrize(
    ("name", "options"), VARIANTS, ids=[f"{n}{'-2s' if o else ''}" for n, o in VARIANTS]
)
def test_views_weigh_only_scored_cells_with_finite_weights(rollout, name, options):
    views = get_objective(name, **options).views(rollout, torch.Generator().manual_seed(0))
    assert isinstance(views, ViewBatch)
    assert views.scored.any()
    assert torch.isfinite(views.weights).all()
    assert (views.weights[~views.scored] == 0).all()
    assert views.two_stream == options.get("two_stream", False)


def test_the_capability_table_in_the_docs_matches_the_classes():
    """docs/objectives.md's table of each objective's capabilities says what the classes do."""
    from repo_root import REPO

    text = (REPO / "docs" / "objectives.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| name | `num_iter"))
    columns = [c.strip(" `") for c in header.strip("|").split("|")]
    rows = [
        [c.strip(" `") for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `") and len(line.split("|")) == len(header.split("|"))
    ]
    documented = {row[0]: dict(zip(columns[1:], row[1:], strict=True)) for row in rows}
    assert set(documented) >= set(OBJECTIVES), sorted(set(OBJECTIVES) - set(documented))
    for name, cls in OBJECTIVES.items():
        doc = documented[name]
        assert int(doc["num_iterations"]) == cls.num_iterations, name
        assert doc["scale_rewards"] == cls.scale_rewards, name
        assert doc["old_logprobs"].split()[0] == cls.old_logprobs, name
        for flag in ("scores_trace_states", "supports_two_stream", "masks_prompt", "ratio_free",
                     "scores_sampling_distribution"):  # fmt: skip
            assert (doc[flag] == "yes") == bool(getattr(cls, flag)), (name, flag)
