"""``Rollout``: what the sampler produced, as token ids plus the trace.

Token ids flow from the sampler to the loss; text is only decoded for rewards and logs. The
trace (``steps``) gives, for every completion position, the denoising step at which it was
unmasked, counted per row from 0. Together with the prompt lengths and the block settings it
is enough to rebuild every partially-masked state the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from transformers import PreTrainedTokenizerBase

from unmask.models.attention import BlockAlign, block_origin


@dataclass
class Rollout:
    """A batch of sampled completions with their traces.

    Shapes: ``prompt_ids`` ``[B, P]`` left-padded (``prompt_mask`` marks real tokens);
    ``completion_ids``, ``steps``, ``completion_mask`` and ``logprobs`` are ``[B, G]``.

    * ``steps[b, j]``: step at which completion token j was unmasked, ``-1`` if never decoded
      (generation stopped early at EOS).
    * ``completion_mask``: the scored completion, up to and including the first EOS. Tokens
      decoded after the EOS in the same block are kept in ``completion_ids`` (the sampler saw
      them, so an exact replay needs them) but are not part of the completion.
    * ``logprobs``: log-prob of each token under the exact distribution it was drawn from
      (temperature, top-k/top-p support); only filled when the sampler was asked.
    * ``nfe``: denoising forward passes for the batch (a cached sampler also runs prefill
      passes, which choose no tokens and are not counted).
    * ``remasking`` and ``threshold``: the rule that chose each step's positions (and its
      threshold, ``threshold`` rule only), which the exact trajectory likelihood needs
      (docs/objectives.md, "Exact selection"). ``None``: not recorded (a hand-built trace),
      read as a choice independent of the drawn tokens.
    * ``selection_logprobs`` ``[B, G]``: entry ``t`` is step ``t``'s log-probability that the
      rule left its uncommitted candidates uncommitted (0 for rules that ignore the draws,
      and past a row's last step); filled with ``logprobs``.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    steps: torch.Tensor
    logprobs: torch.Tensor | None
    block_length: int
    block_align: BlockAlign
    mask_token_id: int
    nfe: int
    remasking: str | None = None
    threshold: float | None = None
    selection_logprobs: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of rollouts (rows)."""
        return self.completion_ids.shape[0]

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """Real (unpadded) prompt tokens per row, ``[B]``."""
        return self.prompt_mask.sum(dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """Scored completion tokens per row (EOS included), ``[B]``."""
        return self.completion_mask.sum(dim=1)

    @property
    def num_steps(self) -> torch.Tensor:
        """Denoising steps each row took (its NFE)."""
        return self.steps.max(dim=1).values + 1

    def block_origins(self) -> torch.Tensor:
        """Position id where block 0 starts, per row (the sampler's block boundaries)."""
        return block_origin(self.prompt_lengths, self.block_length, self.block_align)

    def tokens_per_step(self) -> torch.Tensor:
        """Mean number of tokens unmasked per denoising step, per row."""
        decoded = (self.steps >= 0).sum(dim=1)
        return decoded.float() / self.num_steps.clamp(min=1).float()

    def completion_texts(
        self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True
    ) -> list[str]:
        """The completions decoded (the scored tokens only)."""
        return [
            tokenizer.decode(ids[mask].tolist(), skip_special_tokens=skip_special_tokens)
            for ids, mask in zip(self.completion_ids, self.completion_mask, strict=True)
        ]

    def prompt_texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The prompts decoded, special tokens kept (they are what the model read)."""
        return [
            tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
            for ids, mask in zip(self.prompt_ids, self.prompt_mask, strict=True)
        ]

    def select(self, rows: slice) -> Rollout:
        """The rollouts ``rows`` (``nfe`` stays the batch's)."""
        picked = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **picked)

    def to(self, device: torch.device | str) -> Rollout:
        """Every tensor of the rollout on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)
