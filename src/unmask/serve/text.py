"""Completion text from token ids: EOS, ``max_tokens`` and stop strings, final or streamed.

A diffusion sampler commits tokens out of order but never changes a committed token, so the
run of committed tokens at the left of the canvas is final text. Streaming sends that run as
it grows, holding back what could still turn into a stop string (its last
``len(longest stop) - 1`` characters) and a trailing partial character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass
class Settled:
    """The final part of a completion so far; ``finish`` is set once nothing can follow."""

    text: str
    tokens: int
    finish: str | None  # "stop" (EOS or a stop string), "length" (max_tokens), or None


class Detokenizer:
    """Turns completion token ids into text the way every response and stream does.

    ``mask_token_id`` marks a token not decided yet; ``eos_ids`` end a completion (default:
    the tokenizer's EOS; a model's generation config can name several).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mask_token_id: int,
        max_tokens: int,
        stop: list[str],
        placeholder: str = "_",
        eos_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        if eos_ids is None:
            eos_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_ids = frozenset(eos_ids)
        self.max_tokens = max_tokens
        self.stop = stop
        self.placeholder = placeholder
        self.hold = max((len(s) for s in stop), default=1) - 1

    def settle(self, ids: list[int], complete: bool) -> Settled:
        """Text of the committed tokens at the left of ``ids`` (all of them if ``complete``)."""
        ids = ids[: self.max_tokens]
        cut = (
            len(ids)
            if complete
            else next((i for i, t in enumerate(ids) if t == self.mask_token_id), len(ids))
        )
        ids = ids[:cut]
        finish = "length" if complete or len(ids) == self.max_tokens else None
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if end is not None:
            ids = ids[:end]
            finish = "stop"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return Settled(text[: min(hits)], len(ids), "stop")
        return Settled(text, len(ids), finish)

    def streamable(self, settled: Settled) -> str:
        """The part of settled text that is safe to send before the completion ends."""
        if settled.finish is not None:
            return settled.text
        text = settled.text[: len(settled.text) - self.hold] if self.hold else settled.text
        return text.rstrip("\ufffd")  # a multi-byte character still split across tokens

    def canvas(self, ids: list[int]) -> tuple[str, list[int | None]]:
        """The whole canvas as text, each masked token shown as the placeholder, and its ids."""
        ids = ids[: self.max_tokens]
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            if token != self.mask_token_id:
                run.append(token)
                continue
            if run:
                parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
                run = []
            parts.append(self.placeholder)
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts), [None if t == self.mask_token_id else t for t in ids]
