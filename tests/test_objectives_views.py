"""What every objective's views may and may not do, on a hand-made rollout with every edge case:
left padding, a prompt tail sharing block 0, tokens decoded after the EOS, never-decoded blocks."""

from __future__ import annotations

import pytest
import torch

from unmask.objectives import OBJECTIVES, get_objective
from unmask.sampling import Rollout

MASK, EOS = 3, 2


@pytest.fixture(scope="module")
def rollout():
    # Row 0: prompt of 2 (padded), EOS at j=5, j=6..7 decoded after it in the same block.
    # Row 1: prompt of 3, EOS at j=1, the block after it never decoded.
    # Row 2: prompt of 3, no EOS, up to two tokens per step.
    return Rollout(
        prompt_ids=torch.tensor([[0, 5, 6], [5, 6, 5], [6, 6, 6]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool),
        completion_ids=torch.tensor(
            [[5, 6, 5, 6, 5, EOS, 6, 5], [6, EOS, 5, 0, 0, 0, 0, 0], [5, 6, 5, 6, 6, 5, 5, 6]]
        ),
        completion_mask=torch.tensor(
            [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1] * 8], dtype=torch.bool
        ),
        steps=torch.tensor(
            [[1, 0, 2, 3, 5, 4, 6, 7], [0, 1, 2, -1, -1, -1, -1, -1], [0, 1, 1, 2, 2, 3, 3, 4]]
        ),
        logprobs=-torch.rand(3, 8, generator=torch.Generator().manual_seed(0)),
        block_length=4,
        block_align="zero",
        mask_token_id=MASK,
        nfe=0,
    )


VARIANTS = [(name, {}) for name in OBJECTIVES] + [
    (name, {"two_stream": True}) for name, cls in OBJECTIVES.items() if cls.supports_two_stream
]
# views at random masks, not at the sampler's states (which may show what it decoded)
RANDOM_MASKS = [name for name, cls in OBJECTIVES.items() if not cls.scores_trace_states]
IDS = [f"{n}{'-2s' if o else ''}" for n, o in VARIANTS]


def _views(name, options, rollout, seed=0):
    return get_objective(name, **options).views(rollout, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_views_score_only_hidden_completion_tokens(rollout, name, options):
    views = _views(name, options, rollout)
    canvas = views.canvas
    rows = views.rollout_index
    completion = canvas.completion[rows]
    assert views.scored.any(dim=1).all()
    assert not (views.scored & ~completion).any()  # never the prompt or padding
    j = views.completion_index[views.scored]
    b = rows[:, None].expand_as(views.scored)[views.scored]
    assert rollout.completion_mask[b, j].all()  # never after the EOS, never undecoded
    assert (views.input_ids[views.scored] == MASK).all()
    assert (views.targets[views.scored] == rollout.completion_ids[b, j]).all()
    assert ((views.weights > 0) == views.scored).all()
    assert (views.completion_index[~views.scored] == -1).all()
    hidden = views.input_ids == MASK
    assert not (hidden & ~canvas.real[rows]).any()  # padding is never masked
    prompt = canvas.real[rows] & ~completion
    if not OBJECTIVES[name].masks_prompt:
        assert not (hidden & prompt).any()
    # positions never decoded are hidden in every view
    undecoded = torch.zeros_like(canvas.completion)
    undecoded[canvas.completion] = (rollout.steps < 0).flatten()
    assert hidden[undecoded[rows]].all()


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_views_are_deterministic_given_the_seed(rollout, name, options):
    a, b = _views(name, options, rollout, 1), _views(name, options, rollout, 1)
    for field in ("input_ids", "scored", "weights", "rollout_index", "completion_index"):
        assert torch.equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("name", RANDOM_MASKS)
def test_random_objectives_hide_the_tail_after_the_eos(rollout, name):
    # objectives that mask the prompt do it often here, so prompt masks cannot hide a tail bug
    views = _views(name, {"p_mask_prompt": 0.5} if OBJECTIVES[name].masks_prompt else {}, rollout)
    tail = torch.zeros_like(views.canvas.completion)
    tail[views.canvas.completion] = (~rollout.completion_mask).flatten()
    assert (views.input_ids[tail[views.rollout_index]] == MASK).all()


def test_diffu_grpo_masks_the_whole_completion_and_some_prompt(rollout):
    views = _views("diffu_grpo", {"p_mask_prompt": 0.5}, rollout, seed=3)
    rows = views.rollout_index
    completion = views.canvas.completion[rows]
    assert (views.input_ids[completion] == MASK).all()
    assert torch.equal(views.scored.sum(dim=1), rollout.completion_mask.sum(dim=1))
    prompt_hidden = (views.input_ids == MASK) & views.canvas.real[rows] & ~completion
    assert prompt_hidden.any()
    none = _views("diffu_grpo", {"p_mask_prompt": 0.0}, rollout)
    assert not ((none.input_ids == MASK) & ~views.canvas.completion[none.rollout_index]).any()


@pytest.mark.parametrize("two_stream", [False, True])
def test_coupled_pair_scores_every_token_exactly_once(rollout, two_stream):
    views = _views("coupled", {"mc_samples": 3, "two_stream": two_stream}, rollout)
    count = torch.zeros(rollout.completion_mask.shape)
    b = views.rollout_index[:, None].expand_as(views.scored)[views.scored]
    count.index_put_((b, views.completion_index[views.scored]), views.weights[views.scored], True)
    torch.testing.assert_close(count, rollout.completion_mask.float())  # 3 pairs, weight 1/3


def test_tracerl_views_follow_the_trace(rollout):
    views = _views("tracerl", {}, rollout)
    steps = views.per_token(rollout.steps)
    # one view per step that unmasks a completion token (not row 0 steps 6, 7 or row 1 step 2)
    assert len(views) == 6 + 2 + 5
    for row in range(len(views)):
        assert steps[row][views.scored[row]].unique().numel() == 1
    packed = _views("tracerl", {"two_stream": True}, rollout)
    assert len(packed) < len(views)


def test_agrpo_weights_sum_to_the_number_of_steps(rollout):
    views = _views("agrpo", {"mc_samples": 5}, rollout)
    per_view = views.weights.max(dim=1).values
    total = torch.zeros(3).index_add(0, views.rollout_index, per_view)
    torch.testing.assert_close(total, torch.tensor([6.0, 2.0, 5.0]))


def test_per_token_gathers_rollout_and_token_values(rollout):
    views = _views("tracerl", {}, rollout)
    per_rollout = views.per_token(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(
        per_rollout[views.scored],
        (views.rollout_index[:, None] + 1.0).expand_as(views.scored)[views.scored],
    )
    per_token = views.per_token(rollout.completion_ids)
    assert torch.equal(per_token[views.scored], views.targets[views.scored])
    assert (per_token[~views.scored] == 0).all()


def test_registry_errors():
    with pytest.raises(ValueError, match="tracerl"):
        get_objective("ppo")
    with pytest.raises(ValueError, match="shrink"):
        get_objective("tracerl", shrnk=2)
    with pytest.raises(ValueError, match="shrink"):
        get_objective("tracerl", shrink=0)
    with pytest.raises(ValueError, match="step_sampling"):
        get_objective("agrpo", step_sampling="entropy")
    with pytest.raises(ValueError, match="t_min"):
        get_objective("random_mask", t_min=0.9, t_max=0.1)
    assert get_objective("agrpo").old_logprobs == "sampler"
    assert get_objective("elbo").importance_sampling_level == "sequence"
