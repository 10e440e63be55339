"""``DiffusionLM``: a native transformers causal-LM class used as a mask predictor.

The wrapped model is an ordinary ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` (no ``trust_remote_code``). What makes it a diffusion model is the 4-D
attention mask it is run with (see :mod:`unmask.models.attention`) and three settings that
are saved in its ``config.json`` under ``diffusion``: the mask token, the attention layout
with its block size, and whether logits are shifted by one (Dream/DiffuCoder predict
position i from the hidden state at i-1).

:meth:`DiffusionLM.from_pretrained` dispatches on what it is given to modules below this one,
none of which imports the wrapper (imports point one way): presets
(:mod:`unmask.models.presets`) and published family checkpoints (:mod:`unmask.models.convert`)
come back as parts (network, tokenizer, settings), and the LoRA loader
(:mod:`unmask.models.lora`) is handed the wrapper's constructor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from unmask.errors import UserError
from unmask.integrity import verify_model_folder
from unmask.models.attention import (
    BLOCK_ALIGNS,
    BOOL_MASK_BACKENDS,
    LAYOUTS,
    BlockAlign,
    Layout,
    backend_mask,
)
from unmask.models.convert import find_family_checkpoint, load_family
from unmask.models.lora import load_lora
from unmask.models.placement import Placed, resolve_device, resolve_dtype
from unmask.models.presets import PRESETS, build_preset
from unmask.models.saving import save_folder
from unmask.models.tokenizer import load_tokenizer, resolve_mask_token_id

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Which logits a forward computes: columns of every row, or (rows, cols) cells.
Columns = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class WeightsError(UserError):
    """A weights file that cannot be read (a truncated download or copy, a damaged disk):
    safetensors' own message does not say which file."""


@dataclass
class DiffusionSettings:
    """How a causal-LM class is used as a diffusion model; saved in ``config.diffusion``.

    ``block_size`` is the attention block of a ``block`` model (and its default decoding
    block); for a ``full`` model it is only the default decoding block of the sampler.
    ``block_align`` says where blocks start (see :func:`unmask.models.attention.block_origin`).
    """

    mask_token_id: int
    layout: Layout = "full"
    block_size: int = 32
    shift_logits: bool = False
    block_align: BlockAlign = "prompt"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"diffusion.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.block_align not in BLOCK_ALIGNS:
            raise ValueError(
                f"diffusion.block_align must be one of {BLOCK_ALIGNS}, got {self.block_align!r}"
            )
        if int(self.block_size) < 1:
            raise ValueError(f"diffusion.block_size must be >= 1, got {self.block_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionSettings:
        """Settings from ``config.diffusion`` (or overrides); an unknown key is an error rather
        than silently ignored, so a typo in a setting does not go unnoticed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown diffusion settings {unknown}; known: {sorted(known)}")
        return cls(**data)


class DiffusionLM(Placed):
    """A causal-LM backbone plus the settings that make it a mask predictor.

    ``noise = "mask"`` is the capability samplers, objectives and commands dispatch on: a
    position is masked until committed once, so a trace is one step id per token.
    """

    noise: ClassVar[str] = "mask"

    def __init__(
        self,
        model: PreTrainedModel,
        settings: DiffusionSettings,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES} "
                "(published dLLM checkpoints are converted into these classes)"
            )
        if not 0 <= settings.mask_token_id < model.config.vocab_size:
            raise ValueError(
                f"mask_token_id {settings.mask_token_id} is outside the model's vocabulary "
                f"({model.config.vocab_size})"
            )
        self.model = model
        self.settings = settings
        self.tokenizer = tokenizer
        model.config.diffusion = dataclasses.asdict(settings)
        if not torch.cuda.is_available():
            # fp32 training on CPU slows down 20-50x on denormal numbers.
            torch.set_flush_denormal(True)

    # -- properties the sampler and trainers read ------------------------------------------
    @property
    def config(self) -> Any:
        """The transformers config (its ``diffusion`` entry mirrors :attr:`settings`)."""
        return self.model.config

    @property
    def mask_token_id(self) -> int:
        """The token a masked position holds."""
        return self.settings.mask_token_id

    @property
    def layout(self) -> Layout:
        """``full`` or ``block`` attention (:mod:`unmask.models.attention`)."""
        return self.settings.layout

    @property
    def block_size(self) -> int:
        """The attention block of a ``block`` model; the default decoding block of any."""
        return self.settings.block_size

    @property
    def shift_logits(self) -> bool:
        """Whether position i is predicted from the hidden state at i-1 (Dream, DiffuCoder)."""
        return self.settings.shift_logits

    def set_block_size(self, block_size: int) -> None:
        """Use ``block_size`` from now on (block-size adaptation: TraceRL moved TraDo from
        block 4 to larger blocks for more parallel decoding). Training and default sampling
        then use it, and a saved model records it as its native block size."""
        self.settings = dataclasses.replace(self.settings, block_size=int(block_size))
        self.model.config.diffusion = dataclasses.asdict(self.settings)

    # -- the forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        columns: Columns | None = None,
    ) -> torch.Tensor:
        """Logits of the query columns the caller reads: the LM head runs on those only.

        ``columns``: None, every column (``[B, Q, V]``); a 1-D tensor, those columns of every
        row (``[B, C, V]``); a pair ``(rows, cols)`` of 1-D tensors, those cells (``[M, V]``).
        At a 126k vocabulary the head and softmax over unread columns were most of a step's
        time and memory. The logits at column i predict the token at query column i; shifted
        models (Dream) read them from column i-1 (column 0 from itself, so callers include
        one column of context).

        ``attention_mask`` ``[B, 1, Q, K]`` covers the cached keys, then the query's own keys:
        bool (True = attended), additive float, or None when every query sees every key
        (:func:`unmask.models.attention.backend_mask`). A given cache is appended to; callers
        crop it (see the sampler).
        """
        hidden = self.model.get_decoder()(
            input_ids,
            self.backend_mask(attention_mask, omit=False),
            position_ids,
            past_key_values,  # by position: transformers 5 renames it 'cache'
            use_cache=past_key_values is not None,
            is_causal=False,  # a mask predictor: an omitted mask means "all keys", not causal
        ).last_hidden_state
        if columns is None:
            columns = torch.arange(hidden.shape[1], device=hidden.device)
        head = self.model.get_output_embeddings()
        if isinstance(columns, tuple):
            rows, cols = columns
            return head(hidden[rows, (cols - int(self.shift_logits)).clamp(min=0)])
        return head(hidden[:, (columns - int(self.shift_logits)).clamp(min=0)])

    def backend_mask(self, allowed: torch.Tensor | None, omit: bool = True) -> torch.Tensor | None:
        """``allowed`` in the form this model's attention backend reads exactly (None when
        every query sees every key, with ``omit``): build it once, reuse it for every step."""
        reads_bool = self.config._attn_implementation in BOOL_MASK_BACKENDS
        return backend_mask(allowed, reads_bool, self.dtype, omit)

    # -- saving and loading ------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Hugging Face layout: config (with ``diffusion``), safetensors weights, tokenizer."""
        self.model.config.diffusion = dataclasses.asdict(self.settings)
        save_folder(self, path, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        quantization_config: Any = None,
        **settings: Any,
    ) -> DiffusionLM:
        """Load a preset name, a local folder or a hub name saved in this layout, or a
        checkpoint of a published family (LLaDA, Dream, SDAR...: see ``unmask.models.convert``).

        ``device="auto"`` takes CUDA when present; ``dtype="auto"`` is bf16 there, fp32 on CPU.
        ``settings`` override the saved diffusion settings (for example a larger
        ``block_size``). A checkpoint without saved settings needs ``mask_token_id`` and
        ``layout`` here, or a conversion first. A LoRA folder (``unmask.models.lora``) loads
        with its adapters. ``quantization_config`` (4-bit bases) needs a native checkpoint.
        A folder with a ``checkpoint.json`` manifest (trainer checkpoints, ``final/``,
        ``unmask convert`` output) is verified first: a changed file is a ``CheckpointError``.
        """
        name = str(name_or_path)
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if name in PRESETS and not Path(name).exists():
            return from_preset(name, **settings).to(device=device, dtype=torch_dtype)
        path = Path(name)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        verify_model_folder(path)  # a folder with checkpoint.json: sizes and SHA-256 checked
        family = find_family_checkpoint(name)  # LLaDA, Dream, SDAR...: converted on the fly
        if family is not None:
            if quantization_config is not None:
                raise ValueError(f"{name}: convert it (unmask convert) before loading it in 4-bit")
            with _naming_bad_weights(name):
                model, tokenizer, saved = load_family(*family, dtype=torch_dtype, **settings)
            return cls(model, DiffusionSettings.from_dict(saved), tokenizer).to(device)
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load model {name!r}: it is not a preset ({', '.join(PRESETS)}), not a "
                f"local folder, and loading it from the hub failed ({err})"
            ) from err
        saved = dict(getattr(config, "diffusion", None) or {})
        tokenizer = load_tokenizer(name)
        saved.update(settings)
        if "mask_token_id" not in saved and tokenizer is not None:
            saved["mask_token_id"] = resolve_mask_token_id(tokenizer, None)
        if "mask_token_id" not in saved:
            raise ValueError(
                f"{name}: config.json has no 'diffusion' settings and no mask token is known; "
                "pass mask_token_id= and layout=, or convert the checkpoint first"
            )
        if getattr(config, "lora", None):
            diffusion = DiffusionSettings.from_dict(saved)
            with _naming_bad_weights(name):
                lora = load_lora(
                    path, config, lambda base: cls(base, diffusion, tokenizer), torch_dtype
                )
            return lora.to(device)
        quantized = {}
        if quantization_config is not None:  # bitsandbytes places the layers itself
            quantized = {"quantization_config": quantization_config, "device_map": {"": device}}
        with _naming_bad_weights(name):
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=False,
                **quantized,
            )  # fmt: skip
        lm = cls(model, DiffusionSettings.from_dict(saved), tokenizer)
        return lm if quantized else lm.to(device)


def from_preset(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    max_positions: int = 2048,
    **settings: Any,
) -> DiffusionLM:
    """Build a randomly initialised model from a preset name (seeded, same weights each time;
    see :mod:`unmask.models.presets`); ``settings`` override the layout's defaults."""
    model, tokenizer, merged = build_preset(name, tokenizer, seed, max_positions, **settings)
    return DiffusionLM(model, DiffusionSettings.from_dict(merged), tokenizer)


@contextmanager
def _naming_bad_weights(name: str) -> Iterator[None]:
    """Turn safetensors' refusal of a file into a :class:`WeightsError` naming that file."""
    try:
        yield
    except SafetensorError as err:
        where = _unreadable_weights(Path(name)) or name
        raise WeightsError(
            f"{where}: cannot read the weights, the file is truncated or corrupted ({err}); "
            "copy or download it again"
        ) from err


def _unreadable_weights(folder: Path) -> Path | None:
    """The first ``*.safetensors`` file of a local folder whose header does not read."""
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError:
            return file
    return None
