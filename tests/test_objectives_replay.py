"""Invariant 1: a replayed view sees exactly what the sampler's forward saw at that step."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from unmask.models import from_preset
from unmask.models.attention import block_index, block_origin
from unmask.objectives import OBJECTIVES, get_objective, token_logprobs
from unmask.sampling import Sampler, SamplerConfig

PROMPTS = ["12", "hello there", "7", "abcd"]
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
# objectives whose views are the sampler's states, so they replay its log-probs exactly
TRACE_STATES = [name for name, cls in OBJECTIVES.items() if cls.scores_trace_states]


def _rollout(model, **kw):
    config = {"gen_length": 16, "return_logprobs": True, **SAMPLING, **kw}
    return Sampler(SamplerConfig(**config)).generate(model, PROMPTS)


def _check_replay(model, rollout, views, sampling=SAMPLING):
    with torch.no_grad():
        logp = token_logprobs(model, views, micro_batch_size=16, **sampling)
    # the sampler's token log-probs plus each token's share of its step's selection term
    # (exact selection, the trace objectives' default; 0 for rules that ignore the draws)
    sampled = views.per_token(get_objective("tracerl").sampler_logprobs(rollout))
    assert views.scored.any()
    torch.testing.assert_close(logp[views.scored], sampled[views.scored], atol=1e-5, rtol=0)


def _coverage(rollout, views):
    """How many times each completion token is scored."""
    count = torch.zeros(rollout.completion_mask.shape, dtype=torch.long)
    rows = views.rollout_index[:, None].expand_as(views.scored)[views.scored]
    count.index_put_((rows, views.completion_index[views.scored]), torch.ones_like(rows), True)
    return count


@pytest.fixture(scope="module")
def shifted_block_model():
    return from_preset("nano-block", seed=4, shift_logits=True).eval()


CASES = [
    ("block_model", {}),  # kv cache, 1 token per step, prompt tails share block 0
    ("block_model", {"steps_per_block": 2, "remasking": "random"}),
    ("block_model", {"remasking": "threshold", "threshold": 0.05, "stop_at_eos": True}),
    ("shifted_block_model", {"steps_per_block": 3}),
    ("full_model", {"block_length": 8}),  # no cache: every step forwards the whole canvas
    ("full_model", {"block_length": 4, "steps_per_block": 2, "remasking": "random"}),
]


@pytest.mark.parametrize(("model_name", "kw"), CASES)
def test_tracerl_views_reproduce_sampler_logprobs(model_name, kw, request):
    model = request.getfixturevalue(model_name)
    rollout = _rollout(model, **kw)
    views = get_objective("tracerl").views(rollout)
    _check_replay(model, rollout, views)
    # every completion token is scored exactly once, at the step that unmasked it
    assert torch.equal(_coverage(rollout, views), rollout.completion_mask.long())
    steps = views.per_token(rollout.steps)
    for row in range(len(views)):
        assert steps[row][views.scored[row]].unique().numel() == 1


@pytest.mark.parametrize("model_name", ["block_model", "shifted_block_model"])
def test_two_stream_tracerl_gives_the_same_logprobs_in_fewer_rows(model_name, request):
    model = request.getfixturevalue(model_name)
    rollout = _rollout(model, steps_per_block=2)
    single = get_objective("tracerl").views(rollout)
    packed = get_objective("tracerl", two_stream=True).views(rollout)
    assert len(packed) < len(single)
    _check_replay(model, rollout, packed)
    assert torch.equal(_coverage(rollout, packed), rollout.completion_mask.long())


def test_two_stream_views_need_a_block_model(full_model, block_model):
    rollout = _rollout(block_model)
    views = get_objective("tracerl", two_stream=True).views(rollout)
    with pytest.raises(ValueError, match="block-causal"):
        token_logprobs(full_model, views, 8)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.7, "top_k": 5, "top_p": 1.0},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.8},
    ],
)
def test_truncated_sampling_distribution_is_replayed(block_model, sampling):
    rollout = _rollout(block_model, **sampling)
    for name in TRACE_STATES:
        views = get_objective(name).views(rollout, torch.Generator().manual_seed(0))
        _check_replay(block_model, rollout, views, sampling)


def test_agrpo_views_are_sampler_states(full_model):
    rollout = _rollout(full_model, block_length=4, steps_per_block=2)
    views = get_objective("agrpo", mc_samples=3).views(rollout, torch.Generator().manual_seed(1))
    _check_replay(full_model, rollout, views)


def test_shrink_scores_merged_steps_from_the_state_before_the_first(block_model):
    rollout = _rollout(block_model)
    views = get_objective("tracerl", shrink=2).views(rollout)
    assert torch.equal(_coverage(rollout, views), rollout.completion_mask.long())
    canvas_steps = torch.full(views.canvas.ids.shape, -1)
    canvas_steps[views.canvas.completion] = rollout.steps.flatten()
    steps = canvas_steps[views.rollout_index]
    hidden = views.input_ids == rollout.mask_token_id
    for row in range(len(views)):
        decoded = steps[row] >= 0
        first = steps[row][decoded & hidden[row]].min()  # the state is "before step `first`"
        assert (steps[row][decoded & ~hidden[row]] < first).all()
        scored_steps = steps[row][views.scored[row]]
        assert (scored_steps >= first).all() and (scored_steps <= first + 1).all()


def test_agrpo_needs_sampler_logprobs(block_model):
    rollout = _rollout(block_model, return_logprobs=False)
    with pytest.raises(ValueError, match="return_logprobs"):
        get_objective("agrpo").views(rollout)


@pytest.mark.parametrize("two_stream", [False, True])
@pytest.mark.parametrize("kw", [{}, {"steps_per_block": 3}, {"remasking": "threshold"}])
def test_a_larger_block_keeps_the_replay_exact(block_model, two_stream, kw):
    """Block-size adaptation: the block-4 model sampled and scored at block 8."""
    adapted = copy.deepcopy(block_model)
    adapted.set_block_size(8)
    rollout = _rollout(adapted, **kw)
    assert rollout.block_length == 8
    same = _rollout(block_model, block_length=8, **kw)  # the sampler's override is the same
    assert torch.equal(rollout.completion_ids, same.completion_ids)
    views = get_objective("tracerl", two_stream=two_stream).views(rollout)
    _check_replay(adapted, rollout, views)
    assert torch.equal(_coverage(rollout, views), rollout.completion_mask.long())
    agrpo = get_objective("agrpo").views(rollout, torch.Generator().manual_seed(0))
    _check_replay(adapted, rollout, agrpo)
    # the check can fail: replayed with the native block's attention, the log-probs differ
    native = get_objective("tracerl").views(replace(rollout, block_length=4))
    with torch.no_grad():
        logp = token_logprobs(adapted, native, micro_batch_size=16, **SAMPLING)
    sampled = native.per_token(rollout.logprobs)[native.scored]
    assert (logp[native.scored] - sampled).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_builds_its_views_at_the_rollout_block(block_model, name):
    adapted = copy.deepcopy(block_model)
    adapted.set_block_size(8)
    rollout = _rollout(adapted)
    views = get_objective(name).views(rollout, torch.Generator().manual_seed(0))
    canvas = views.canvas
    origin = block_origin(rollout.prompt_lengths, 8, "zero")
    expected = block_index(canvas.positions, origin, 8)
    assert torch.equal(canvas.blocks[canvas.real], expected[canvas.real])
    assert int(canvas.blocks[canvas.completion].max()) == 2  # 16 tokens: block 8, a prompt tail
