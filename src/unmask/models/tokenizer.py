"""A small character-level tokenizer for tiny models trained from scratch.

Real checkpoints bring their own tokenizer. Tiny CPU models use this one: every printable
ASCII character is one token, so Sudoku grids and Countdown equations tokenise one symbol per
token and a model of a few million parameters can learn them. It is a ``tokenizers`` model
wrapped in ``PreTrainedTokenizerFast``, saved and loaded with ``save_pretrained`` /
``from_pretrained`` like any other.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, MASK, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK, UNK)
DEFAULT_ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "")


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over ``alphabet`` plus pad, bos, eos, mask and unk tokens."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        padding_side="left",
    )
    return tok


def resolve_mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token_id: int | None) -> int:
    """The mask id from an explicit setting or the tokenizer, with a clear error if neither."""
    if mask_token_id is None:
        mask_token_id = tokenizer.mask_token_id
    if mask_token_id is None:
        raise ValueError(
            "the tokenizer has no mask token and no mask_token_id was given: a diffusion LM needs "
            "one (set tokenizer.mask_token or pass mask_token_id)"
        )
    if not 0 <= mask_token_id < len(tokenizer):
        raise ValueError(
            f"mask_token_id {mask_token_id} is outside the vocabulary ({len(tokenizer)})"
        )
    return int(mask_token_id)


def load_tokenizer(name: str | Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with checkpoint ``name`` (a folder or hub name); None for a local
    folder without tokenizer files, so a bare weights folder still loads (its caller then needs
    an explicit ``mask_token_id``)."""
    path = Path(name)
    if path.is_dir() and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(str(name), trust_remote_code=False)
