"""DiffusionGemma through its native class: the preset, save/load, and the traced sampler,
token for token against the native ``generate``."""

from __future__ import annotations

import pytest
import torch

from gemma_models import char_gemma
from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig

PROMPTS = ["12+3=", "4*5=", "hello", "abc"]


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    return char_gemma()


def _config(**changes) -> StepSamplerConfig:
    base = dict(
        max_new_tokens=24, max_denoising_steps=6, entropy_bound=0.5, stability_threshold=1,
        confidence_threshold=1.0,
    )  # fmt: skip
    return StepSamplerConfig(**{**base, **changes})


def _native(model: DiffusionGemma, prompts: list[str], config: StepSamplerConfig, seed: int):
    encoded = [model.tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    torch.manual_seed(seed)
    out = model.model.generate(ids, attention_mask=mask, **config.generation_kwargs())
    return out.sequences[:, width:], out.tokens_per_forward


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_traced_sampler_gives_the_native_tokens(model, seed):
    config = _config(seed=seed)
    rollout = StepSampler(config).generate(model, PROMPTS)
    native, tokens_per_forward = _native(model, PROMPTS, config, seed)
    assert torch.equal(rollout.completion_ids, native)
    # the trace's active steps are the native count of decoder forwards per row
    valid = (native != model.model.generation_config.pad_token_id).sum(dim=1)
    forwards = rollout.trace.active.sum(dim=0)  # active steps of each row
    torch.testing.assert_close(valid / forwards, tokens_per_forward.float())


def test_native_match_covers_stops_eos_and_several_acceptances(model):
    rollout = StepSampler(_config(seed=3)).generate(model, PROMPTS)
    trace = rollout.trace
    assert (rollout.steps == -1).any()  # an EOS ended a row before the last canvas
    assert not trace.active.all()  # the adaptive stop fired
    assert (trace.scored.sum(dim=-1) > 1).any()  # several positions passed the entropy bound
    assert len(rollout.completion_ids[0]) == 24


def test_trace_records_each_step(model):
    """The next canvas keeps every accepted token; the temperature follows the schedule."""
    config = _config(seed=0)
    trace = StepSampler(config).generate(model, PROMPTS).trace
    for s in range(trace.num_steps - 1):
        if trace.block[s + 1] != trace.block[s]:
            continue
        live = trace.active[s + 1]
        kept = trace.accepted[s] & live[:, None]
        assert torch.equal(trace.canvas[s + 1][kept], trace.tokens[s][kept])
        first = trace.block == trace.block[s]
        index = s - int(first.nonzero()[0])
        expected = config.t_min + (config.t_max - config.t_min) * (6 - index) / 6
        assert trace.temperature[s].item() == pytest.approx(expected, abs=1e-6)
    assert (trace.self_conditioning[0] == 0).all()
    assert (trace.logprobs <= 0).all() and (trace.logprobs[~trace.accepted] == 0).all()


def test_on_step_changes_nothing_and_shows_each_step(model):
    """The hook sees every step (the finished canvases final, the current one's argmax) and
    the tokens and trace are those of a run without it."""
    config = _config(seed=3)
    updates = []
    watched = StepSampler(config).generate(model, PROMPTS, on_step=updates.append)
    plain = StepSampler(config).generate(model, PROMPTS)
    assert torch.equal(watched.completion_ids, plain.completion_ids)
    assert torch.equal(watched.trace.logprobs, plain.trace.logprobs)
    assert [u.nfe for u in updates] == list(range(1, plain.nfe + 1))
    length = model.canvas_length
    for update in updates:
        done = update.block * length
        assert torch.equal(update.outputs, plain.completion_ids[:, :done])
    # the last canvas's output is its last argmax, up to the padding after an EOS
    kept = plain.completion_mask[:, -length:]
    assert kept.any() and not kept.all()
    assert torch.equal(updates[-1].argmax[kept], plain.completion_ids[:, -length:][kept])


def test_sampler_leaves_the_global_random_state(model):
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    StepSampler(_config(seed=1)).generate(model, PROMPTS[:1])
    assert torch.equal(torch.rand(3), before)


def test_save_and_load_through_the_native_class(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = DiffusionGemma.from_pretrained(tmp_path, device="cpu")
    assert loaded.model.config.model_type == "diffusion_gemma"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    config = _config(seed=2)
    a = StepSampler(config).generate(model, PROMPTS[:2]).completion_ids
    b = StepSampler(config).generate(loaded, PROMPTS[:2]).completion_ids
    assert torch.equal(a, b)


def test_preset_is_a_mixture_of_experts_loadable_by_name():
    model = DiffusionGemma.from_pretrained("diffusion-gemma-nano", device="cpu")
    assert model.config.text_config.num_experts > 1
    assert model.noise == "uniform"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="t_min"):
        StepSamplerConfig(t_min=0.0)
    with pytest.raises(ValueError, match="entropy_bound"):
        StepSamplerConfig(entropy_bound=0.0)
