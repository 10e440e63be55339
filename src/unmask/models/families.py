"""The published dLLM families and how each maps onto a native transformers class.

A :class:`Family` says which ``config.json`` ``model_type`` values belong to it, the native
class that computes the same function, how its config fields and weight names map onto that
class, its mask token, and the diffusion settings its checkpoints were trained with. The facts
come from the published configs, safetensors index files and model cards (see
``docs/scale.md``); no modeling code of the families is used or needed.

- LLaDA (and MMaDA, whose text model is LLaDA): ``LlamaForCausalLM``, own weight names,
  full attention, logits not shifted.
- Dream and DiffuCoder: ``Qwen2ForCausalLM``, same weight names, full attention, **shifted**
  logits (position i is predicted from hidden state i-1).
- SDAR and TraDo: ``Qwen3ForCausalLM``, same weight names, block-causal attention with blocks
  aligned to absolute position 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Keys of a family config that say nothing about the function the weights compute.
_BOOKKEEPING = ("auto_map", "architectures", "model_type", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class Family:
    """One published family: detection, config and weight-name mapping, diffusion settings."""

    name: str
    model_types: tuple[str, ...]
    native_model_type: str  # llama | qwen2 | qwen3
    native_architecture: str
    tokenizer_class: str  # the native transformers tokenizer class that reads its files
    mask_token: str
    settings: Mapping[str, Any]
    native_config: Callable[[dict[str, Any]], dict[str, Any]]
    # (family name, native name) templates; "{i}" is a layer index. Empty: names are native.
    renames: tuple[tuple[str, str], ...] = ()
    block_size_keys: tuple[str, ...] = ()  # config fields that give the trained block size
    _rules: list[tuple[re.Pattern[str], str, re.Pattern[str], str]] = field(
        default_factory=list, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for family, native in self.renames:
            forward = (_template_regex(family), _template_sub(native))
            self._rules.append((*forward, _template_regex(native), _template_sub(family)))

    def to_native(self, name: str) -> str | None:
        """The native weight name of a family weight name; None when it maps to nothing."""
        if not self.renames:
            return name
        for pattern, repl, _, _ in self._rules:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name)
        return None

    def to_family(self, name: str) -> str:
        """The family weight name of a native weight name (inverse of :meth:`to_native`)."""
        for _, _, pattern, repl in self._rules:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name)
        return name

    def diffusion_settings(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The family's diffusion settings, with the block size its config states (if any)."""
        settings = dict(self.settings)
        for key in self.block_size_keys:
            if config.get(key) is not None:
                settings["block_size"] = int(config[key])
                break
        return settings


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _template_sub(template: str) -> str:
    return template.replace("{i}", r"\1")


# -- config mappings -----------------------------------------------------------------------------

# LLaDA fields whose value must be the one the Llama computation has, or the weights would
# compute something else in LlamaForCausalLM. Absent fields take the LLaDA defaults.
_LLADA_REQUIRED: dict[str, Any] = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "attention_layer_norm": False,
    "scale_logits": False,
    "clip_qkv": None,
    "input_emb_norm": False,
    "block_group_size": 1,
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": None,
    "norm_after": False,
}


def _llada_config(src: dict[str, Any]) -> dict[str, Any]:
    wrong = {
        k: src[k]
        for k, v in _LLADA_REQUIRED.items()
        if k in src and src[k] != v and not (v is None and src[k] is False)
    }
    if wrong:
        raise ValueError(
            f"this LLaDA-style checkpoint uses features a Llama model does not compute: "
            f"{wrong} (supported: {', '.join(f'{k}={_LLADA_REQUIRED[k]}' for k in wrong)})"
        )
    missing = [k for k in ("d_model", "n_heads", "n_layers") if src.get(k) is None]
    if missing:
        raise ValueError(f"the LLaDA config lacks {missing}")
    heads = int(src["n_heads"])
    kv_heads = src.get("n_kv_heads") or (1 if src.get("multi_query_attention") else heads)
    hidden = int(src["d_model"])
    intermediate = src.get("mlp_hidden_size") or int(src.get("mlp_ratio", 4)) * hidden
    return {
        "vocab_size": int(src.get("embedding_size") or src["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(src["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(src.get("max_sequence_length", 4096)),
        "rms_norm_eps": float(src.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(src.get("rope_theta", 10000.0)),
        "tie_word_embeddings": bool(src.get("weight_tying", False)),
        "attention_bias": False,
        "mlp_bias": False,
        **_token_ids(src),
        **_dtype(src),
    }


def _same_fields(*family_only: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Dream and SDAR configs are Qwen2/Qwen3 configs plus a few fields of their own."""

    def convert(src: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in src.items() if k not in (*_BOOKKEEPING, *family_only)}

    return convert


def _token_ids(src: dict[str, Any]) -> dict[str, Any]:
    return {k: src[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if k in src}


def _dtype(src: dict[str, Any]) -> dict[str, Any]:
    value = src.get("dtype", src.get("torch_dtype"))
    return {} if value is None else {"dtype": value}


_FULL = {"layout": "full", "block_size": 32, "block_align": "prompt"}

LLADA_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
    ("model.transformer.blocks.{i}.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("model.transformer.blocks.{i}.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("model.transformer.blocks.{i}.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("model.transformer.blocks.{i}.attn_out.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.transformer.blocks.{i}.ff_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.transformer.blocks.{i}.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{i}.ff_out.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    (
        "model.transformer.blocks.{i}.ff_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
    ),
)

_LLADA = {
    "native_model_type": "llama",
    "native_architecture": "LlamaForCausalLM",
    "tokenizer_class": "PreTrainedTokenizerFast",
    "mask_token": "<|mdm_mask|>",
    "settings": {**_FULL, "shift_logits": False},
    "native_config": _llada_config,
    "renames": LLADA_RENAMES,
}

FAMILIES: dict[str, Family] = {
    "llada": Family(name="llada", model_types=("llada",), **_LLADA),
    "mmada": Family(name="mmada", model_types=("mmada",), **_LLADA),
    "dream": Family(
        name="dream",
        model_types=("Dream", "dream"),
        native_model_type="qwen2",
        native_architecture="Qwen2ForCausalLM",
        tokenizer_class="Qwen2Tokenizer",
        mask_token="<|mask|>",
        settings={**_FULL, "shift_logits": True},
        native_config=_same_fields("mask_token_id"),
    ),
    "sdar": Family(
        name="sdar",
        model_types=("sdar",),
        native_model_type="qwen3",
        native_architecture="Qwen3ForCausalLM",
        tokenizer_class="Qwen2Tokenizer",
        mask_token="<|MASK|>",
        # TraDo's RL and SDAR's chat models use blocks of 4 aligned to absolute position 0.
        settings={"layout": "block", "block_size": 4, "block_align": "zero", "shift_logits": False},
        native_config=_same_fields(
            "mask_token_id", "fuse_cross_entropy", "block_size", "block_length"
        ),
        block_size_keys=("block_size", "block_length"),
    ),
}


def family_of(config: Mapping[str, Any]) -> Family | None:
    """The family of a ``config.json`` (None for a native Llama/Qwen2/Qwen3 config)."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None
