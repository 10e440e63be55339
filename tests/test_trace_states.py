"""The trace alone fixes every step's masked and committed sets, for every cache and rule.

Exact selection (docs/objectives.md) reads, for step t of a row, the candidates M (the
block's completion positions decoded at t or later) and the committed set S (decoded at t)
from the trace. This watches the sampler's canvas after every forward (``on_step``) and checks
that, for every row, its t-th change reveals exactly the positions with step t, all in one
block, that every position of that block with a later step was still masked then, and that
tokens after an EOS keep their steps in the EOS's block while later blocks are never decoded.
"""

from __future__ import annotations

import pytest
import torch

from unmask.sampling import Sampler, SamplerConfig

CASES = [  # model, cache, remasking settings
    ("block_model", "none", {"steps_per_block": 2}),
    ("block_model", "kv", {"steps_per_block": 2}),
    ("block_model", "kv", {"remasking": "threshold", "threshold": 0.2}),
    ("full_model", "none", {"remasking": "threshold", "threshold": 0.2, "block_length": 4}),
    ("full_model", "prefix", {"steps_per_block": 2, "block_length": 4}),
    ("full_model", "dual", {"remasking": "threshold", "threshold": 0.2, "block_length": 4}),
]


@pytest.mark.parametrize(("model_name", "cache", "kw"), CASES)
def test_each_step_is_the_trace_s_masked_and_committed_sets(model_name, cache, kw, request):
    model = request.getfixturevalue(model_name)
    config = SamplerConfig(gen_length=16, temperature=1.0, cache=cache, seed=3, **kw)
    canvases: list[torch.Tensor] = []
    rollout = Sampler(config).generate(
        model, ["12", "hello there", "7", "abcd"] * 4,
        on_step=lambda view: canvases.append(view.completion_ids.clone()),
    )  # fmt: skip
    mask, b = model.mask_token_id, rollout.block_length
    origin = rollout.block_origins() - rollout.prompt_lengths  # block 0's start, in completion
    for row in range(rollout.batch_size):
        steps, ids = rollout.steps[row], rollout.completion_ids[row]
        blocks = torch.div(torch.arange(len(steps)) - origin[row], b, rounding_mode="floor")
        seen = [c[row] for c in canvases]
        changes = [after for before, after in zip([None, *seen], seen, strict=False)
                   if before is None or not torch.equal(before, after)]  # fmt: skip
        changes = [c for c in changes if (c != mask).any()]
        assert len(changes) == int(steps.max()) + 1
        for t, canvas in enumerate(changes):
            now = canvas != mask
            assert torch.equal(now, (steps >= 0) & (steps <= t))  # revealed: steps <= t
            assert torch.equal(canvas[now], ids[now])
            committed = blocks[steps == t].unique()
            assert len(committed) == 1  # one block per step
            # before step t, that block's masks were exactly its positions with step >= t
            assert bool((steps[blocks == committed] >= 0).all())
        eos = (ids == model.tokenizer.eos_token_id) & (steps >= 0)
        if eos.any():  # the EOS's block is decoded to the end, later blocks never
            first = int(eos.nonzero()[0])
            assert bool((steps[blocks == blocks[first]] >= 0).all())
            assert bool((steps[blocks > blocks[first]] == -1).all())
