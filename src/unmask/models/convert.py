"""Published dLLM checkpoints read into native transformers classes.

A checkpoint of a published family (:mod:`unmask.models.families`: LLaDA, MMaDA, Dream,
DiffuCoder, SDAR, TraDo) is read tensor by tensor from its safetensors files, each tensor renamed
to the native class's name and checked against that class's parameters, and assigned to a model
built without initialisation, so a checkpoint is held in memory once. Tensors keep their stored
dtype unless one is asked for. Nothing of the family's own code runs (no ``trust_remote_code``):
its tokenizer is read by the native tokenizer class, which keeps the vocabulary, special tokens
and chat template.

``DiffusionLM.from_pretrained`` loads such a checkpoint straight away from the parts
:func:`load_family` returns; ``unmask convert SRC DST`` (:mod:`unmask.models.export`) writes it
once in the native layout with the diffusion settings in ``config.json``, so later loads are
plain ``from_pretrained`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from unmask.models.families import Family, family_of

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# What a hub download of a family checkpoint fetches: config, weights, tokenizer, model card.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.md",
                     "LICENSE*"]  # fmt: skip
_SHOWN = 8  # names listed per kind of mismatch


def find_family_checkpoint(name: str | Path) -> tuple[Family, dict[str, Any], Path] | None:
    """``(family, raw config, local folder)`` when ``name`` is a published family's checkpoint.

    ``name`` is a local folder or a hub name; a hub checkpoint is downloaded (config, weights,
    tokenizer) only once its config shows it is one. None for anything else (native
    checkpoints, presets, names that do not resolve: the ordinary loader reports those).
    """
    path = Path(name)
    if path.is_dir():
        config = read_config(path / CONFIG) if (path / CONFIG).is_file() else {}
        family = family_of(config)
        return None if family is None else (family, config, path)
    if path.exists():
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        config = read_config(Path(hf_hub_download(str(name), CONFIG)))
        family = family_of(config)
        if family is None:
            return None
        folder = Path(snapshot_download(str(name), allow_patterns=DOWNLOAD_PATTERNS))
    except Exception:  # offline, unknown repo, invalid name: the ordinary loader says which
        return None
    return family, config, folder


def load_family(
    family: Family,
    config: dict[str, Any],
    folder: Path,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, dict[str, Any]]:
    """The native model, the tokenizer and the diffusion settings of a family checkpoint.

    ``dtype`` None keeps every tensor's stored dtype. ``overrides`` replace diffusion settings
    (``block_size``, ``mask_token_id``, ...). A checkpoint whose tensors do not fit the native
    class exactly is refused, with the missing, unexpected and mis-shaped tensors named.
    """
    native = family.native_config(config)
    native_config = AutoConfig.for_model(
        family.native_model_type, **native, attn_implementation="sdpa"
    )
    native_config.architectures = [family.native_architecture]
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(native_config)
    state = _read_weights(family, folder, model, dtype)
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.config.dtype = model.get_input_embeddings().weight.dtype
    model.eval()
    tokenizer = _load_tokenizer(family, folder)
    settings = {**family.diffusion_settings(config), **overrides}
    if "mask_token_id" not in settings:
        settings["mask_token_id"] = _mask_token_id(family, config, tokenizer, folder)
    if tokenizer is not None and tokenizer.mask_token is None:
        token = tokenizer.convert_ids_to_tokens(settings["mask_token_id"])
        if token is not None:
            tokenizer.mask_token = token
    return model, tokenizer, settings


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object file (``config.json``, a safetensors index) or a ValueError naming it."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


# -- helpers ---------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = read_config(folder / INDEX)
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: {INDEX} lists missing files {missing}")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(
        f"{folder} has no model.safetensors or {INDEX}: only safetensors checkpoints are read"
    )


def _read_weights(
    family: Family, folder: Path, model: PreTrainedModel, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its native name, checked against ``model``."""
    expected = dict(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                name = family.to_native(key)
                if name is None or name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    mis_shaped.append(
                        f"{key} {list(shape)} (expected {list(expected[name].shape)})"
                    )
                    continue
                tensor = handle.get_tensor(key)
                state[name] = tensor if dtype is None else tensor.to(dtype)
    found = set(state) | {family.to_native(n.split(" ")[0]) for n in mis_shaped}
    missing = [family.to_family(n) for n in expected if n not in found and n not in tied]
    if missing or unexpected or mis_shaped:
        parts = [
            f"{label} {_listing(names)}"
            for label, names in (
                ("missing tensors", missing),
                ("unexpected tensors", unexpected),
                ("tensors of the wrong shape", mis_shaped),
            )
            if names
        ]
        raise ValueError(
            f"{folder}: the {family.name} checkpoint does not fit {family.native_architecture} "
            f"built from its config.json: {'; '.join(parts)}"
        )
    return state


def _listing(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_SHOWN])
    more = len(names) - _SHOWN
    return f"({len(names)}): {shown}" + (f" and {more} more" if more > 0 else "")


def _load_tokenizer(family: Family, folder: Path) -> PreTrainedTokenizerBase | None:
    """The family's tokenizer read by its native class (the family's own class is remote code)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        return None
    tokenizer = getattr(transformers, family.tokenizer_class).from_pretrained(str(folder))
    tokenizer.init_kwargs.pop("auto_map", None)  # saved copies must not point at remote code
    return tokenizer


def _mask_token_id(
    family: Family,
    config: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase | None,
    folder: Path,
) -> int:
    """The mask id from ``config.json``, else from the family's mask token in the tokenizer."""
    from_config = config.get("mask_token_id")
    from_tokenizer = None
    if tokenizer is not None and family.mask_token in tokenizer.get_vocab():
        from_tokenizer = int(tokenizer.convert_tokens_to_ids(family.mask_token))
    if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
        raise ValueError(
            f"{folder}: config.json says mask_token_id {from_config} but the tokenizer has "
            f"{family.mask_token!r} at {from_tokenizer}; pass mask_token_id= to choose"
        )
    value = from_config if from_config is not None else from_tokenizer
    if value is None:
        raise ValueError(
            f"{folder}: no mask token: config.json has no mask_token_id and the tokenizer has no "
            f"{family.mask_token!r}; pass mask_token_id="
        )
    return int(value)
