"""LoRA adapters through ``peft``: default targets per family, the adapter-disabled reference,
saving, loading and merging.

Published checkpoints are converted into Llama/Qwen2/Qwen3 classes, so the targets are those
classes' projection names; LLaDA's own names (``attn_out``, ``ff_proj``, ``ff_out``, as the d1
and AGRPO recipes write them) are accepted and translated. A target that matches no linear
module is an error naming it (``peft`` would otherwise train a subset silently, which is what
happened to d1's LLaDA runs).

A LoRA model saves as a self-contained folder: ``config.json`` (the base config with the
``diffusion`` and ``lora`` settings), ``model.safetensors`` (base and adapter weights under
``peft``'s module names, so a trainer checkpoint resumes exactly), the tokenizer, and
``adapter/`` in ``peft``'s own format for other tools. :func:`merge_lora` (or ``unmask
convert FOLDER DST``) folds the adapters into a plain native model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from unmask.models.diffusion_lm import DiffusionLM

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Attention and MLP projections of every native class a family converts into, and of
# DiffusionGemma's text layers (plus its self-conditioning block's gate/up/down projections).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    t: PROJECTIONS for t in ("llama", "qwen2", "qwen3", "diffusion_gemma")
}
# Modules never adapted: DiffusionGemma's vision tower (unused by text RL; its projections
# are wrappers peft cannot adapt).
EXCLUDED: dict[str, str] = {"diffusion_gemma": r".*\.vision_tower\..*"}
# (owner, sharer): modules under ``sharer`` hold the same weights as those under ``owner``
# (DiffusionGemma's decoder layers are its encoder's), so they share one adapter too.
SHARED: dict[str, tuple[str, str]] = {
    "diffusion_gemma": (".encoder.language_model.layers.", ".decoder.layers.")
}
# LLaDA's weight names of the same modules (q_proj, k_proj, v_proj and up_proj are shared).
LLADA_NAMES = {"attn_out": "o_proj", "ff_proj": "gate_proj", "ff_out": "down_proj"}
ADAPTER_DIR = "adapter"
WEIGHTS = "model.safetensors"


@dataclass
class LoRAConfig:
    """``lora:`` in a trainer config (``null``: train every weight).

    ``target_modules`` null takes the family's attention and MLP projections.
    ``load_in_4bit`` loads the frozen base in 4-bit NF4 (QLoRA; needs ``bitsandbytes`` and a
    GPU, and a native checkpoint: convert a family checkpoint first).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    load_in_4bit: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("lora.target_modules is empty: list module names, or null")


def target_modules(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The module names to adapt, checked: each must end the name of a linear layer."""
    model_type = _model_type(model)
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default LoRA targets for model_type {model_type!r}: set lora.target_modules"
            )
        targets = DEFAULT_TARGETS[model_type]
    names = [LLADA_NAMES.get(t, t) for t in targets]
    excluded = re.compile(EXCLUDED.get(str(model_type), r"(?!)"))
    linear = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not excluded.fullmatch(n)
    }
    unmatched = [t for t, n in zip(targets, names, strict=True) if n not in linear]
    if unmatched:
        raise ValueError(
            f"lora.target_modules {unmatched} match no linear layer of this {model_type} model; "
            f"its linear layers are {sorted(linear)}"
        )
    return list(dict.fromkeys(names))


def add_lora(model: DiffusionLM, config: LoRAConfig) -> DiffusionLM:
    """Freeze ``model`` and wrap its network with trainable LoRA adapters (in place)."""
    from peft import LoraConfig, get_peft_model

    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    targets = target_modules(model.model, config.target_modules)
    model_type = _model_type(model.model)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        exclude_modules=EXCLUDED.get(str(model_type)),
        bias="none",
    )
    model.model = get_peft_model(model.model, lora).train(model.training)  # new dropouts too
    for owner, sharer in _shared_adapters(model.model):
        sharer.lora_A, sharer.lora_B = owner.lora_A, owner.lora_B
    model.model.config.lora = dataclasses.asdict(config) | {"target_modules": targets}
    return model


def has_lora(model: DiffusionLM) -> bool:
    """Whether ``model`` carries adapters (then it saves, references and merges as LoRA)."""
    return getattr(model.model, "peft_config", None) is not None


def reference_model(model: DiffusionLM) -> Any:
    """The frozen reference of a KL penalty: the adapter-disabled base under LoRA (no second
    copy of the weights), else a frozen copy of the starting weights."""
    if has_lora(model):
        return AdapterDisabled(model)
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


class AdapterDisabled:
    """``model`` called with its adapters off: the base it started from (a DiffusionGemma's
    ``encode`` and ``decode``, the forwards its replay calls, too)."""

    FORWARDS = ("encode", "decode")

    def __init__(self, model: DiffusionLM) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with adapters_disabled(self._model):
            return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name not in self.FORWARDS:
            return value

        def disabled(*args: Any, **kwargs: Any) -> Any:
            with adapters_disabled(self._model):
                return value(*args, **kwargs)

        return disabled


@contextmanager
def adapters_disabled(model: DiffusionLM) -> Iterator[None]:
    """Run ``model`` as its base inside the block (the KL reference without a weight copy)."""
    with model.model.disable_adapter():
        yield


def merge_lora(model: DiffusionLM) -> DiffusionLM:
    """Fold the adapters into the base weights (in place): a plain native model again."""
    if has_lora(model):
        for _, sharer in _shared_adapters(model.model):  # its weights are merged via the owner
            _replace_module(model.model, sharer, sharer.get_base_layer())
        model.model = model.model.merge_and_unload()
        if hasattr(model.model.config, "lora"):
            del model.model.config.lora
    return model


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _shared_adapters(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(owner, sharer) pairs of adapted modules over the same weight (:data:`SHARED`)."""
    prefixes = SHARED.get(str(_model_type(model)))
    if prefixes is None:
        return []
    owner, sharer = prefixes
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    return [
        (adapted[name.replace(sharer, owner)], module)
        for name, module in adapted.items()
        if sharer in name and name.replace(sharer, owner) in adapted
    ]


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


def save_lora(model: DiffusionLM, path: Path) -> None:
    """The LoRA folder layout of the module docstring (``DiffusionLM.save_pretrained``)."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    peft_model = model.model
    peft_model.get_base_model().config.save_pretrained(str(path))
    save_model(peft_model, str(path / WEIGHTS), metadata={"format": "pt"})
    peft_model.save_pretrained(str(path / ADAPTER_DIR))


def load_lora(
    path: Path,
    config: PretrainedConfig,
    wrap: Callable[[PreTrainedModel], DiffusionLM],
    dtype: torch.dtype,
    build: Callable[[PretrainedConfig], PreTrainedModel] | None = None,
) -> DiffusionLM:
    """A LoRA folder written by :func:`save_lora`, adapters trainable, in ``dtype`` (adapters
    stay fp32 when ``dtype`` is a half type, as ``peft`` keeps them).

    ``wrap`` makes the model wrapper around the (still empty) base network and ``build`` that
    network from its config (default: the causal-LM class the config names): the wrapper's own
    loader passes them, so this module, which the wrapper imports, does not import the wrapper.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = LoRAConfig(**config.lora)
    del config.lora
    with init_empty_weights():
        if build is None:
            base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        else:
            base = build(config)
    base.tie_weights()  # tied names share one parameter, as in the model that was saved
    model = add_lora(wrap(base), lora)
    state = load_file(str(path / WEIGHTS))
    own = model.model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{path / WEIGHTS} has tensors this LoRA model lacks: {unknown[:5]}")
    model.model.load_state_dict(_with_tied_names(state, model.model), assign=True, strict=False)
    model.model.get_base_model().tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"{path / WEIGHTS} lacks weights for {meta[:5]}")
    model.to(dtype)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name and dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model.eval()


def _with_tied_names(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus, for each tensor it holds, the model's other names of that parameter.

    safetensors stores a shared tensor under one of its names, not necessarily the one the
    model's ``tie_weights`` copies from (a DiffusionGemma ties its encoder to its decoder and
    its decoder's embeddings to the LM head), so every name is given the saved tensor.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    full = dict(state)
    for group in names.values():
        saved = next((state[n] for n in group if n in state), None)
        if saved is not None:
            full.update({n: saved for n in group if n not in full})
    return full


def quantization_config() -> Any:
    """4-bit NF4 with double quantization and bf16 compute (QLoRA, d1's recipe)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from err
    if not torch.cuda.is_available():
        raise ValueError("lora.load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit layers)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
