"""Block boundaries and 4-D attention masks: the one place that says who sees whom.

A diffusion LM is a causal-LM class run with a 4-D additive mask instead of its causal one.
Two layouts exist:

* ``full``: every real token sees every real token (LLaDA, Dream).
* ``block``: block-causal; a token sees every token of its own block and of earlier blocks
  (SDAR, TraDo, BD3-LM).

Masks are built as bools (:func:`allowed_keys`) and handed to the attention backend by
:func:`backend_mask`: omitted when every query sees every key, bool where the backend reads
bools, additive float elsewhere.

Blocks are defined in position-id space, once, by :func:`block_index`. The sampler and the
trainers call the same function, so a trace replayed in training sees the block boundaries it
was sampled with.
"""

from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["full", "block"]
BlockAlign = Literal["prompt", "zero"]

LAYOUTS: tuple[str, ...] = ("full", "block")
BLOCK_ALIGNS: tuple[str, ...] = ("prompt", "zero")
# Attention backends (``config._attn_implementation``) that read a bool mask exactly; any
# other gets the additive float form.
BOOL_MASK_BACKENDS: frozenset[str] = frozenset({"sdpa"})


def block_origin(prompt_lengths: torch.Tensor, block_size: int, align: BlockAlign) -> torch.Tensor:
    """Position id where block 0 starts, per row.

    ``prompt``: block 0 starts right after the prompt (LLaDA's semi-autoregressive blocks).
    ``zero``: blocks are aligned to position 0, so the prompt's tail shares block 0 with the
    first completion tokens (SDAR/TraDo were trained this way).
    """
    if align == "prompt":
        return prompt_lengths.clone()
    if align == "zero":
        return torch.div(prompt_lengths, block_size, rounding_mode="floor") * block_size
    raise ValueError(f"block_align must be one of {BLOCK_ALIGNS}, got {align!r}")


def block_index(position_ids: torch.Tensor, origin: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block id of each position: ``floor((pos - origin) / block_size)``.

    Block 0 is the first block holding completion tokens; prompt-only blocks are negative.
    ``position_ids`` is ``[B, T]``, ``origin`` is ``[B]``.
    """
    return torch.div(position_ids - origin[:, None], block_size, rounding_mode="floor")


def allowed_keys(
    query_blocks: torch.Tensor,
    key_blocks: torch.Tensor,
    key_valid: torch.Tensor,
    layout: Layout,
    self_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask ``[B, 1, Q, K]``: True where a query attends to a key.

    ``key_valid`` ``[B, K]`` hides padding and stale cache entries. ``self_keys`` ``[Q]`` gives,
    for each query, the index of its own key: a query always sees itself, so a padding query
    never has an empty row (which would turn into NaNs).
    """
    allowed = key_valid[:, None, :].expand(-1, query_blocks.shape[1], -1)
    if layout == "block":
        allowed = allowed & (key_blocks[:, None, :] <= query_blocks[:, :, None])
    elif layout != "full":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if self_keys is not None:
        diagonal = torch.zeros_like(allowed)
        diagonal[:, torch.arange(len(self_keys)), self_keys] = True
        allowed = allowed | diagonal
    return allowed[:, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive float form of a bool mask: 0 where attended, the dtype's minimum elsewhere.

    Eager attention adds the mask to the scores, so it needs this form: a bool mask is
    silently misread there (added as 0/1; see the platform notes).
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def attention_bias(
    query_blocks: torch.Tensor,
    key_blocks: torch.Tensor,
    key_valid: torch.Tensor,
    layout: Layout,
    dtype: torch.dtype,
    self_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive mask ``[B, 1, Q, K]`` of :func:`allowed_keys` (every backend reads it)."""
    return additive(allowed_keys(query_blocks, key_blocks, key_valid, layout, self_keys), dtype)


def backend_mask(
    allowed: torch.Tensor | None, reads_bool: bool, dtype: torch.dtype, omit: bool = True
) -> torch.Tensor | None:
    """The mask an attention backend is given for ``allowed`` (bool, True = attended).

    With ``omit``, None when every query sees every key: SDPA may then pick its fused
    kernels (any mask keeps flash attention off); this check syncs, so callers that reuse a
    mask do it once. Otherwise the bool mask itself where the backend reads bools exactly
    (``reads_bool``), else its additive float form. An additive float mask given in is only
    cast to ``dtype``.
    """
    if allowed is None:
        return None
    if allowed.dtype != torch.bool:
        return allowed.to(dtype)
    if omit and bool(allowed.all()):
        return None
    return allowed if reads_bool else additive(allowed, dtype)
