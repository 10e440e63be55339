"""``ValueModel``: TraceRL's diffusion value model, the policy's backbone with a scalar head.

It is a :class:`~unmask.models.diffusion_lm.DiffusionLM` (same diffusion settings and
properties) whose module is the transformers base model of the policy's class (``Qwen3Model``
for a ``Qwen3ForCausalLM`` policy: the language-model head is dropped), run on the same views
with the same 4-D attention masks as the policy. It therefore works for every layout the policy
does: block-causal packed ``[clean | noisy]`` rows, full attention, shifted logits. The head is
``Linear(hidden, 1, bias=False)`` initialised to zero, so the first values are 0 and the first
advantages are the rewards themselves.

A saved value model is the backbone's Hugging Face folder (``AutoModel`` loads it; the config
keeps the diffusion settings) plus ``value_head.safetensors``.
:meth:`ValueModel.from_pretrained` also starts one from a policy folder, preset or hub name.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from unmask.integrity import verify_model_folder
from unmask.models.diffusion_lm import DiffusionLM, DiffusionSettings
from unmask.models.placement import resolve_device, resolve_dtype

VALUE_HEAD = "value_head.safetensors"


class ValueModel(DiffusionLM):
    """``forward`` gives one value per column, read where the policy reads its logits."""

    def __init__(self, backbone: PreTrainedModel, settings: DiffusionSettings) -> None:
        super().__init__(backbone, settings)
        param = next(backbone.parameters())
        self.value_head = nn.Linear(
            backbone.config.hidden_size, 1, bias=False, device=param.device, dtype=param.dtype
        )
        nn.init.zeros_(self.value_head.weight)

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_bias: torch.Tensor
    ) -> torch.Tensor:
        """fp32 values ``[B, Q]``; ``values[:, i]`` is read for the token at query column i.

        Shifted models (Dream) predict column i from the hidden state at i-1; the value is read
        from that same hidden state, so it sees exactly what the prediction of the token sees.
        """
        hidden = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_bias.to(self.dtype),
            use_cache=False,
        ).last_hidden_state
        values = self.value_head(hidden)[..., 0].float()
        if self.shift_logits:
            values = torch.cat([values[:, :1], values[:, :-1]], dim=1)
        return values

    @classmethod
    def from_policy(cls, policy: DiffusionLM) -> ValueModel:
        """A value model on a copy of ``policy``'s backbone (its current weights)."""
        backbone = copy.deepcopy(policy.model.base_model)
        return cls(backbone, dataclasses.replace(policy.settings))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        **settings: Any,
    ) -> ValueModel:
        """A saved value model, or a new one (zero head) on a policy's backbone: a folder,
        preset or hub name that :meth:`DiffusionLM.from_pretrained` loads."""
        path = Path(name_or_path)
        if not (path / VALUE_HEAD).is_file():
            policy = DiffusionLM.from_pretrained(name_or_path, dtype, device, **settings)
            return cls(policy.model.base_model, policy.settings)
        verify_model_folder(path)  # a saved run folder: sizes and SHA-256 checked
        device = resolve_device(device)
        backbone = AutoModel.from_pretrained(
            path,
            dtype=resolve_dtype(dtype, device),
            attn_implementation="sdpa",
            trust_remote_code=False,
        )
        saved = dict(getattr(backbone.config, "diffusion", None) or {})
        if not saved:
            raise ValueError(f"{path / 'config.json'} has no 'diffusion' settings")
        model = cls(backbone, DiffusionSettings.from_dict({**saved, **settings}))
        head = load_file(str(path / VALUE_HEAD))
        if set(head) != {"weight"} or head["weight"].shape != model.value_head.weight.shape:
            raise ValueError(f"{path / VALUE_HEAD} is not a value head for this backbone")
        with torch.no_grad():
            model.value_head.weight.copy_(head["weight"])
        return model.to(device)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The backbone's folder (config with the diffusion settings) and the head."""
        super().save_pretrained(path, **kwargs)
        save_file(
            {"weight": self.value_head.weight.detach().contiguous()}, str(Path(path) / VALUE_HEAD)
        )
