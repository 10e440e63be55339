"""``DiffusionGemma``: Google's uniform-noise block-diffusion LM through its native class.

It is not a mask predictor. An encoder reads the prompt (and then every finished canvas) into
a KV cache; a decoder refines a canvas of ``canvas_length`` tokens with bidirectional attention
over that cache and the canvas, its input embeddings combined with a *self-conditioning*
signal: the previous step's softmax over the vocabulary as a soft embedding. The wrapped model
is ``transformers.DiffusionGemmaForBlockDiffusion`` (no remote code); this class exposes the
two halves separately (:meth:`encode`, :meth:`decode`) so that the traced sampler and the
training-time replay run the very same forwards, and lets the decoder take a *stored*
self-conditioning embedding (:meth:`soft_embedding`) instead of logits: the replay holds it
fixed (docs/objectives.md, "DiffusionGemma").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicCache

from unmask.integrity import verify_model_folder
from unmask.models.diffusion_gemma_presets import GEMMA_PRESETS, build_gemma_preset
from unmask.models.lora import load_lora
from unmask.models.placement import Placed, resolve_device, resolve_dtype
from unmask.models.saving import save_folder
from unmask.models.tokenizer import load_tokenizer


class DiffusionGemma(Placed):
    """A ``DiffusionGemmaForBlockDiffusion`` plus its tokenizer.

    ``noise = "uniform"`` is the capability the sampler, objectives and commands dispatch on:
    canvases start as uniformly random tokens and non-accepted positions are renoised, so a
    trace is per denoising step (a position can be accepted at several steps), not per token.
    """

    noise: ClassVar[str] = "uniform"

    def __init__(
        self, model: DiffusionGemmaForBlockDiffusion, tokenizer: PreTrainedTokenizerBase | None
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if not torch.cuda.is_available():
            torch.set_flush_denormal(True)  # fp32 on CPU slows down 20-50x on denormals

    # -- what the sampler and trainers read --------------------------------------------------
    @property
    def native(self) -> DiffusionGemmaForBlockDiffusion:
        """The transformers model; under LoRA, ``peft``'s base model (its layers hold the
        adapters, so calling it runs them)."""
        base = getattr(self.model, "get_base_model", None)
        return self.model if base is None else base()

    @property
    def config(self) -> Any:
        """The transformers config (text and vision parts, ``canvas_length``)."""
        return self.model.config

    @property
    def canvas_length(self) -> int:
        """Tokens the decoder refines at once: the sampler's block size."""
        return int(self.model.config.canvas_length)

    @property
    def vocab_size(self) -> int:
        """Size of the text vocabulary, from which uniform noise is drawn."""
        return int(self.model.config.text_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        """Width of the text layers: the last dimension of a self-conditioning embedding."""
        return int(self.model.config.text_config.hidden_size)

    # -- the two forwards ------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        """An empty encoder KV cache for :meth:`encode` to fill and :meth:`decode` to read."""
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> DynamicCache:
        """Append ``input_ids`` ``[B, n]`` to the encoder KV ``cache``; ``attention_mask``
        ``[B, cached + n]`` marks real tokens (prompts are left-padded)."""
        out = self.native.model.encoder(
            input_ids=input_ids.contiguous(),
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        return out.cache

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """The self-conditioning input ``[B, L, H]`` the decoder makes of the previous step's
        (temperature-scaled) logits, computed exactly as the native decoder does."""
        embed = self.native.model.decoder.embed_tokens
        weights = embed.weight
        probs = logits.to(weights.dtype).softmax(dim=-1, dtype=torch.float32).to(weights.dtype)
        return torch.matmul(probs, weights) * embed.embed_scale.to(weights.dtype)

    def decode(
        self,
        canvas: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        self_conditioning: torch.Tensor | None,
    ) -> torch.Tensor:
        """fp32 logits ``[B, L, V]`` of the decoder on ``canvas`` ``[B, L]``, reading ``cache``.

        ``self_conditioning`` is a soft embedding ``[B, L, H]`` (None: the first step's zeros).
        ``attention_mask`` ``[B, cached + L]`` marks real cached tokens plus the canvas.
        """
        decoder = self.native.model.decoder
        masks = decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            cache=cache,
            decoder_attention_mask=attention_mask,
        )
        with _self_conditioning_input(decoder.self_conditioning, self_conditioning):
            out = self.native(
                decoder_input_ids=canvas,
                cache=cache,
                decoder_attention_mask=masks,
                decoder_position_ids=position_ids,
            )
        return out.logits

    # -- saving and loading ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Hugging Face layout: config, generation config, safetensors weights, tokenizer;
        with LoRA adapters, the LoRA layout of :mod:`unmask.models.lora` (trainer resumes)."""
        save_folder(self, path, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
    ) -> DiffusionGemma:
        """A preset name (:mod:`unmask.models.diffusion_gemma_presets`), a local folder or a
        hub name with a native DiffusionGemma checkpoint. A LoRA folder (what a LoRA run
        writes as ``final_lora/`` and its checkpoints: :mod:`unmask.models.lora`) loads with
        its adapters attached and trainable, as a ``DiffusionLM``'s does."""
        name = str(name_or_path)
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if name in GEMMA_PRESETS and not Path(name).exists():
            return gemma_preset(name).to(device=device, dtype=torch_dtype)
        verify_model_folder(Path(name))  # a folder with checkpoint.json: sizes and SHA-256
        tokenizer = load_tokenizer(name)
        config = DiffusionGemmaConfig.from_pretrained(name, trust_remote_code=False)
        if getattr(config, "lora", None):
            lora = load_lora(
                Path(name), config, lambda base: cls(base, tokenizer), torch_dtype,
                build=DiffusionGemmaForBlockDiffusion,
            )  # fmt: skip
            return lora.to(device)  # type: ignore[return-value]
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            name, config=config, dtype=torch_dtype, trust_remote_code=False
        )
        return cls(model.eval(), tokenizer).to(device)


def gemma_preset(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    canvas_length: int = 16,
    seed: int = 0,
) -> DiffusionGemma:
    """``diffusion-gemma-{nano,tiny}`` with the character tokenizer (seeded weights; see
    :mod:`unmask.models.diffusion_gemma_presets`)."""
    return DiffusionGemma(*build_gemma_preset(name, tokenizer, canvas_length, seed))


def select_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A cache holding rows ``index`` of ``cache`` (differentiable; ``cache`` is untouched),
    so several decoder forwards of one rollout share one encoder pass."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(index)
    return out


@contextmanager
def _self_conditioning_input(module: nn.Module, signal: torch.Tensor | None) -> Iterator[None]:
    """Feed ``signal`` to the decoder's self-conditioning block in place of the soft embedding
    the decoder would compute (called with no logits, it computes zeros: the first step)."""
    if signal is None:
        yield
        return
    handle = module.register_forward_pre_hook(lambda _mod, args: (args[0], signal))
    try:
        yield
    finally:
        handle.remove()
