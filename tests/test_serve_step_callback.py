"""``Sampler.generate(on_step=...)``: one call per denoising step, showing the canvas."""

from __future__ import annotations

import torch

from unmask.sampling.sampler import Sampler, SamplerConfig, StepView


def _record(model, **settings) -> tuple[list[StepView], object]:
    views: list[StepView] = []
    rollout = Sampler(SamplerConfig(**settings)).generate(
        model, ["12", "40312"], on_step=views.append
    )
    return views, rollout


def test_one_view_per_step_matching_the_trace(block_model):
    views, rollout = _record(block_model, gen_length=8, steps_per_block=2, stop_at_eos=False)
    mask = block_model.mask_token_id
    assert [v.nfe for v in views] == list(range(1, rollout.nfe + 1))
    assert [v.block for v in views] == sorted(v.block for v in views)
    for view in views:
        assert view.completion_ids.shape == rollout.completion_ids.shape
    for row in range(2):
        step_of = rollout.steps[row]
        row_steps = 0  # the trace counts a row's steps that unmasked something in that row
        before = torch.zeros_like(step_of, dtype=torch.bool)
        for view in views:
            shown = view.completion_ids[row] != mask
            row_steps += int(bool((shown & ~before).any()))
            assert torch.equal(shown, (step_of >= 0) & (step_of < row_steps))
            assert torch.equal(view.completion_ids[row][shown], rollout.completion_ids[row][shown])
            before = shown
    assert torch.equal(views[-1].completion_ids, rollout.completion_ids)


def test_views_are_copies_and_the_callback_changes_nothing(full_model):
    views, with_callback = _record(full_model, gen_length=8, block_length=4)
    plain = Sampler(SamplerConfig(gen_length=8, block_length=4)).generate(
        full_model, ["12", "40312"]
    )
    assert torch.equal(with_callback.completion_ids, plain.completion_ids)
    assert torch.equal(with_callback.steps, plain.steps)
    first = views[0].completion_ids
    assert int((first != full_model.mask_token_id).sum()) == 2  # one token per row, 1st step
