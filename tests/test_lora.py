"""LoRA through peft: targets per family, the adapter-disabled reference, save/load/merge, and
both trainers with adapters and gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from unmask.cli import main
from unmask.models import DiffusionLM, DiffusionSettings, build_char_tokenizer, from_preset
from unmask.models.lora import (
    PROJECTIONS,
    LoRAConfig,
    add_lora,
    has_lora,
    merge_lora,
    reference_model,
)
from unmask.sampling import SamplerConfig
from unmask.train.common import training_model
from unmask.train.rl import RLTrainer
from unmask.train.rl_config import RLConfig, RLData
from unmask.train.sft import SFTConfig, SFTTrainer


def _llama() -> DiffusionLM:
    """A tiny Llama, the class LLaDA converts into."""
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    settings = DiffusionSettings(mask_token_id=tok.mask_token_id)
    return DiffusionLM(LlamaForCausalLM(config), settings, tok).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(n)[None], torch.zeros(1, 1, n, n))


def _perturb(model: DiffusionLM) -> None:
    """Move the adapters off their zero start (lora_B is initialised to 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


IDS = torch.tensor([[5, 9, 12, 40, 41, 7]])


@pytest.mark.parametrize("build", [_llama, lambda: from_preset("nano-full")])
def test_default_targets_cover_every_projection_and_freeze_the_base(build):
    model = add_lora(build(), LoRAConfig(r=4))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(PROJECTIONS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layers = model.config.num_hidden_layers
    assert len(trainable) == 2 * len(PROJECTIONS) * layers


def test_llada_names_are_translated_and_unmatched_targets_refused():
    model = add_lora(_llama(), LoRAConfig(r=4, target_modules=["q_proj", "attn_out", "ff_proj"]))
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "o_proj", "gate_proj"}
    with pytest.raises(ValueError, match=r"\['wq', 'c_attn'\] match no linear layer.*o_proj"):
        add_lora(_llama(), LoRAConfig(target_modules=["q_proj", "wq", "c_attn"]))
    with pytest.raises(ValueError, match=r"lora\.r"):
        LoRAConfig(r=0)


def test_reference_is_the_adapter_disabled_base_without_a_copy():
    model = _llama()
    base = _logits(model, IDS)
    add_lora(model, LoRAConfig(r=4))
    reference = reference_model(model)
    _perturb(model)
    assert not torch.allclose(_logits(model, IDS), base, atol=1e-4)
    assert torch.equal(_logits(reference, IDS), base)
    assert not isinstance(reference, nn.Module)  # a view of the policy's own weights
    assert reference.mask_token_id == model.mask_token_id


def test_merge_keeps_the_function_and_saves_a_native_model(tmp_path):
    model = add_lora(_llama(), LoRAConfig(r=4))
    _perturb(model)
    adapted = _logits(model, IDS)
    model.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "config.json").read_text())["lora"]["r"] == 4
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    loaded = DiffusionLM.from_pretrained(tmp_path / "lora", device="cpu")
    assert has_lora(loaded) and torch.equal(_logits(loaded, IDS), adapted)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    merge_lora(model)
    assert not has_lora(model) and type(model.model) is LlamaForCausalLM
    torch.testing.assert_close(_logits(model, IDS), adapted, atol=1e-5, rtol=1e-5)
    assert main(["convert", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    merged = DiffusionLM.from_pretrained(tmp_path / "merged", device="cpu")
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(_logits(merged, IDS), adapted, atol=1e-5, rtol=1e-5)


def test_four_bit_without_bitsandbytes_or_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="load_in_4bit needs"):
        training_model(None, "nano-full", torch.device("cpu"), LoRAConfig(load_in_4bit=True))


def test_sft_with_lora_and_checkpointing_trains_adapters_resumes_and_merges(tmp_path):
    pairs = [([5, 6, 7], [8, 9, 10, 2]), ([11, 12], [13, 14, 2])] * 4
    run = tmp_path / "sft"

    def config(steps: int, resume: str | None = None) -> SFTConfig:
        return SFTConfig(model="nano-block", output_dir=str(run), max_steps=steps, batch_size=4,
                         lr=1e-2, lora=LoRAConfig(r=4), gradient_checkpointing=True, save_every=1,
                         log_every=1, progress=False, cpu=True, resume=resume)  # fmt: skip

    start = from_preset("nano-block").state_dict()
    trainer = SFTTrainer(config(2), pairs=pairs)
    assert trainer.core.model.is_activation_checkpointing
    final = trainer.train()
    model = DiffusionLM.from_pretrained(final, device="cpu")
    assert not has_lora(model) and (run / "final_lora" / "adapter").is_dir()
    moved = [n for n, v in model.state_dict().items() if not torch.equal(v, start[n])]
    assert moved and all("proj" in n for n in moved)  # only adapted matrices changed
    SFTTrainer(config(3, resume="latest"), pairs=pairs).train()  # from the LoRA checkpoint
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_rl_with_lora_uses_the_adapter_disabled_reference(tmp_path):
    cfg = RLConfig(model="nano-block", output_dir=str(tmp_path / "rl"), max_steps=1,
                   data=RLData(options={"num_train": 8}), num_prompts=2, num_generations=2,
                   beta=0.1, lora=LoRAConfig(r=4), gradient_checkpointing=True,
                   sampler=SamplerConfig(gen_length=8, temperature=1.0), progress=False,
                   cpu=True)  # fmt: skip
    trainer = RLTrainer(cfg)
    assert not isinstance(trainer.reference, nn.Module)
    assert trainer.reference._model is trainer.core
    trainer.train()
    metrics = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["kl"] >= 0 and (tmp_path / "rl" / "final_lora").is_dir()
