"""``unmask rl`` on DiffusionGemma: the trainer picks the per-step path from the model's noise,
raises a toy reward, checkpoints and resumes exactly; LoRA trains only adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma_models import sharpened
from tiny_rl import assert_same_weights, read_metrics, untimed
from unmask.models.diffusion_gemma import DiffusionGemma, gemma_preset
from unmask.models.loading import load_model
from unmask.models.lora import PROJECTIONS, LoRAConfig, add_lora, has_lora, merge_lora
from unmask.models.saving import save_model
from unmask.objectives.step_objectives import get_step_objective
from unmask.objectives.step_replay import step_logprobs
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig
from unmask.tasks.registry import get_task
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig

SAMPLER = StepSamplerConfig(max_new_tokens=8, max_denoising_steps=4, entropy_bound=0.5)


def digits(prompts, completions, **_):
    """Toy reward: the fraction of digits (the sharpened random model writes about 10%)."""
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]


def digits_task():
    """Sudoku prompts scored by ``digits``; the accuracy reward stays at weight 0."""
    solved = get_task("sudoku").reward_funcs[1]
    return get_task("sudoku", reward_funcs=[digits, solved], reward_weights=[1.0, 0.0])


def toy_model() -> DiffusionGemma:
    """``diffusion-gemma-nano``, canvas 8, sharpened so the accepted tokens track the argmax
    output (see tests/test_diffusion_gemma_objectives.py), no EOS: fixed-length outputs."""
    model = sharpened(gemma_preset("diffusion-gemma-nano", canvas_length=8), 10.0)
    model.model.generation_config.eos_token_id = None
    return model


def config(out: Path, **changes) -> RLConfig:
    base = dict(
        model="diffusion-gemma-nano", output_dir=str(out), num_prompts=2, num_generations=8,
        max_steps=12, lr=1e-2, step_sampler=SAMPLER, progress=False, plots=False,
    )  # fmt: skip
    return RLConfig(**{**base, **changes})


@pytest.mark.parametrize("objective", ["tracerl", "agrpo"])
def test_rl_raises_a_toy_reward_and_resumes_exactly(tmp_path, objective):
    straight = RLTrainer(
        config(tmp_path / "straight", objective=objective, save_every=6, beta=0.01),
        model=toy_model(), task=digits_task(),
    )  # fmt: skip
    final = straight.train()
    metrics = read_metrics(tmp_path / "straight")
    rewards = [m["reward"] for m in metrics]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert all(m["kl"] >= 0 and m["num_views"] > 0 for m in metrics)
    assert load_model(final, device="cpu").noise == "uniform"  # saved through the native class

    middle = sorted((tmp_path / "straight" / "checkpoints").iterdir())[0]
    assert middle.name.endswith("6")
    resumed = RLTrainer(
        config(tmp_path / "resumed", objective=objective, beta=0.01, resume=str(middle)),
        model=toy_model(), task=digits_task(),
    )  # fmt: skip
    resumed.train()
    assert_same_weights(straight.core, resumed.core)
    lines = [untimed(read_metrics(tmp_path / n)) for n in ("straight", "resumed")]
    assert lines[1] == lines[0][6:]


def test_lora_trains_only_adapters(tmp_path):
    trainer = RLTrainer(
        config(tmp_path / "lora", max_steps=1, lora=LoRAConfig(r=4), beta=0.01),
        task=digits_task(),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.core.named_parameters()}
    trainer.step()
    changed = {n for n, p in trainer.core.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all("lora_" in n for n, p in trainer.core.named_parameters() if p.requires_grad)
    # the KL reference is the adapter-disabled base, in the encoder and decoder alike
    assert trainer.step()["kl"] > 0
    final = trainer.train()  # saves the adapters, then the merged native model
    assert (final.parent / "final_lora" / "adapter").is_dir()
    assert load_model(final, device="cpu").noise == "uniform"
    adapted = load_model(final.parent / "final_lora", device="cpu")  # adapters attached
    assert has_lora(adapted) and adapted.noise == "uniform"
    rollout = StepSampler(SAMPLER).generate(adapted, ["12+3=", "abc"])
    views = get_step_objective("tracerl").views(rollout)
    with torch.no_grad():
        reloaded = step_logprobs(adapted, rollout, views)
        merged = step_logprobs(trainer.core, rollout, views)  # train() merged it in place
    torch.testing.assert_close(reloaded, merged, atol=2e-5, rtol=0)


def test_a_lora_folder_loads_back_with_its_adapters(tmp_path):
    """What a LoRA run writes (``final_lora/``, checkpoints) loads through ``load_model`` with
    its adapters attached and trainable: the same weights, ties and log-probs, bit for bit."""
    model = _adapted(toy_model())
    save_model(model, tmp_path / "final_lora")
    loaded = load_model(tmp_path / "final_lora", device="cpu")
    assert isinstance(loaded, DiffusionGemma) and has_lora(loaded)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert len(list(loaded.parameters())) == len(list(model.parameters()))  # still tied
    rollout = StepSampler(SAMPLER).generate(model, ["12+3=", "abc"])
    again = StepSampler(SAMPLER).generate(loaded, ["12+3=", "abc"])
    assert torch.equal(again.completion_ids, rollout.completion_ids)
    views = get_step_objective("tracerl").views(rollout)
    with torch.no_grad():
        before, after = (step_logprobs(m, rollout, views) for m in (model, loaded))
    assert torch.equal(after, before)


def test_masked_only_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"uniform-noise.*block_size"):
        RLTrainer(config(tmp_path / "x", block_size=4), task=digits_task())
    with pytest.raises(ValueError, match="per-step form"):
        RLTrainer(config(tmp_path / "y", objective="diffu_grpo"), task=digits_task())


def test_lora_adapters_are_shared_by_encoder_and_decoder_and_merge_exactly():
    """The decoder's layers are the encoder's weights: one adapter each, so the merged model
    (a plain native one) computes what the adapted one did."""
    model = _adapted(toy_model())
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(PROJECTIONS)
    assert not any("vision_tower" in n for n, _ in model.named_parameters() if "lora_" in n)
    rollout = StepSampler(SAMPLER).generate(model, ["12+3=", "abc"])
    views = get_step_objective("tracerl").views(rollout)
    with torch.no_grad():
        before = step_logprobs(model, rollout, views)
        merge_lora(model)
        assert not has_lora(model) and model.native is model.model
        torch.testing.assert_close(step_logprobs(model, rollout, views), before, atol=2e-5, rtol=0)


def _adapted(model: DiffusionGemma) -> DiffusionGemma:
    """``model`` with rank-4 adapters whose ``B`` is random (a fresh adapter adds nothing)."""
    model = add_lora(model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model
