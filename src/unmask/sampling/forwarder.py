"""One denoising step's forward under a cache policy: which columns go in, which logits come out.

Every forward is "cached keys, then the query's own keys", under a 4-D mask that can hide
stale cached columns, so all caches are the same mechanism (see :mod:`unmask.sampling.sampler`
for what each policy does). Three things keep a step's cost to what it reads:

* logits only for the current block's columns: the LM head never runs on the rest (at a
  126k vocabulary that was most of a step's time and memory);
* masks built once per block and handed over in the form the attention backend reads best
  (omitted when every query sees every key; :meth:`DiffusionLM.backend_mask`);
* for the exact ``kv`` cache, a static cache preallocated for the whole canvas, so every step
  has the same shapes and the step can be compiled (``torch.compile``; CUDA graphs on GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from unmask.models.attention import allowed_keys
from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.canvas import Canvas

ForwardFn = Callable[..., torch.Tensor]
_COMPILED: WeakKeyDictionary[DiffusionLM, ForwardFn] = WeakKeyDictionary()


def compiled_step(model: DiffusionLM) -> ForwardFn:
    """``torch.compile`` of the model's forward, once per model (recompiles only on new
    shapes). ``reduce-overhead`` captures CUDA graphs on GPU; the CPU gets the default mode."""
    if model not in _COMPILED:
        mode = "reduce-overhead" if model.device.type == "cuda" else "default"
        _COMPILED[model] = torch.compile(model, mode=mode, dynamic=False)
    return _COMPILED[model]


class Forwarder:
    """Runs the forward of one denoising step under the chosen cache policy."""

    def __init__(
        self, model: DiffusionLM, canvas: Canvas, cache: str, block_length: int, compile: bool
    ) -> None:
        self.model = model
        self.canvas = canvas
        self.cache = cache
        self.forward_fn: ForwardFn = compiled_step(model) if compile else model
        self.shift = int(model.shift_logits)
        # A block-causal cache must end on a block boundary (a token sees its whole block), so
        # a shifted block model recomputes the previous block to get the column before a0.
        self.kv_lag = block_length * self.shift
        self.kv: Cache | None = None
        self.capacity = 0  # key slots of a static cache; 0 for a cache that grows
        self.cached = 0  # number of canvas columns [0, cached) held in self.kv
        self.masks: dict[tuple[int, ...], torch.Tensor | None] = {}
        if cache == "kv":
            self.kv = _static_cache(model, canvas)
            self.capacity = canvas.ids.shape[1]
            prefill = canvas.start - self.kv_lag
            if prefill > 0:  # eager: its shape differs per batch, and no logits are read
                self._forward(0, prefill, (0, 0), forward_fn=model)
                self.cached = prefill

    def block_logits(self, a0: int, a1: int, step: int) -> torch.Tensor:
        """Logits ``[B, a1 - a0, V]`` for the current block's columns, and no others."""
        if step == 0:
            self.masks.clear()  # a new block: its masks are built on first use
        width = self.canvas.ids.shape[1]
        keep_prefix = a0 - self.shift
        if self.cache == "none":
            return self._forward(0, width, (a0, a1))
        if self.cache == "kv":
            logits = self._forward(self.cached, a1, (a0, a1))
            self._crop(max(a0 - self.kv_lag, 0))
            return logits
        if step == 0:  # prefix and dual: refresh the whole cache at the start of a block
            self.kv, self.cached = DynamicCache(config=self.model.config), 0
            logits = self._forward(0, width, (a0, a1))
            self._crop(keep_prefix if self.cache == "prefix" else width)
            return logits
        if self.cache == "prefix":
            logits = self._forward(keep_prefix, width, (a0, a1))
            self._crop(keep_prefix)
        else:  # dual: recompute the block only; its stale cached copy is hidden
            logits = self._forward(keep_prefix, a1, (a0, a1), stale=(keep_prefix, a1))
            self._crop(width)
        return logits

    def _crop(self, length: int) -> None:
        assert self.kv is not None
        if self.cached > length:
            self.kv.crop(length - self.cached)  # a negative count: drop that many
        self.cached = length

    def _forward(
        self,
        q0: int,
        q1: int,
        read: tuple[int, int],
        stale: tuple[int, int] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> torch.Tensor:
        """Forward canvas columns ``[q0, q1)``; logits of canvas columns ``read`` only."""
        c = self.canvas
        cached = self.cached if self.kv is not None else 0
        key = (cached, q0, q1, *(stale or ()))
        if key not in self.masks:
            self.masks[key] = self.model.backend_mask(self._allowed(cached, q0, q1, stale))
        columns = torch.arange(read[0] - q0, read[1] - q0, device=c.ids.device)
        forward = forward_fn or self.forward_fn
        logits = forward(
            c.ids[:, q0:q1], c.positions[:, q0:q1], self.masks[key], self.kv, columns
        )  # fmt: skip
        if self.kv is not None:
            self.cached = cached + q1 - q0
        return logits

    def _allowed(
        self, cached: int, q0: int, q1: int, stale: tuple[int, int] | None
    ) -> torch.Tensor:
        """Bool mask over the cached columns, the query's columns and, in a static cache, the
        unused slots after them (never attended)."""
        c = self.canvas
        device = c.ids.device
        keys = torch.cat([torch.arange(cached, device=device), torch.arange(q0, q1, device=device)])
        valid = c.real[:, keys].clone()
        if stale is not None:
            valid[:, stale[0] : stale[1]] = False
        blocks = c.blocks[:, keys]
        unused = self.capacity - len(keys)
        if unused > 0:
            valid = torch.cat([valid, valid.new_zeros(len(valid), unused)], dim=1)
            blocks = torch.cat([blocks, blocks.new_zeros(len(blocks), unused)], dim=1)
        return allowed_keys(
            c.blocks[:, q0:q1],
            blocks,
            valid,
            self.model.layout,
            self_keys=cached + torch.arange(q1 - q0, device=device),
        )


class _StaticCache(StaticCache):
    """A static cache that stores keys and values in its own dtype.

    Under autocast the projections of fp32 weights come out in bf16 while a key normalised
    with an fp32 weight (Qwen3's ``k_norm``) comes out in fp32, and the static cache's
    in-place write refused the mismatch: every rollout of a block model in fp32 weights with
    bf16 autocast (full training on a GPU) failed at its first step.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.layers[layer_idx].keys.dtype
        return super().update(
            key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs
        )


def _static_cache(model: DiffusionLM, canvas: Canvas) -> StaticCache:
    """A KV cache preallocated for the whole canvas: the steps never change its shapes. Under
    autocast it holds the autocast dtype, the one attention computes in."""
    config = model.config
    cache = _StaticCache(config=config, max_cache_len=canvas.ids.shape[1])
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = model.device
    dtype = model.dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    cache.early_initialization(len(canvas.ids), heads, head_dim, dtype, device)
    return cache
