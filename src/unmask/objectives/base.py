"""What every RL objective shares: the view batch, the objective interface, token log-probs.

An objective turns a :class:`~unmask.sampling.Rollout` into views: partially-masked states of
each rollout, the tokens scored in them and their weights. The weights are chosen so that, for
any per-token quantity ``x``, ``sum over scored tokens of weight * x`` is an unbiased estimate of
the objective's per-rollout sum (over the completion's tokens, each at the state it is scored
in). The shared loss (:mod:`unmask.objectives.loss`) then only needs one normalisation rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from math import inf
from typing import Any, ClassVar, Literal, TypeVar

import torch

from unmask.models.diffusion_lm import DiffusionLM
from unmask.objectives.selection import StepChoices
from unmask.objectives.views import SequenceBatch, View, masked_view, packed_two_stream_view
from unmask.sampling.remasking import sampling_logits
from unmask.sampling.rollout import Rollout

OldLogprobs = Literal["recompute", "sampler"]
ImportanceSamplingLevel = Literal["token", "sequence"]


@dataclass
class ViewBatch:
    """``N`` views of ``B`` rollouts, in the sampler's canvas columns (``W`` wide).

    ``canvas`` holds the rollouts' final canvases (``[B, W]``: positions, blocks, attended
    columns, and the target ids). Per view (``[N, W]`` unless noted):

    * ``input_ids``: the canvas with the view's hidden columns set to the mask token;
    * ``scored``: columns whose token is scored; ``weights``: their weights (0 elsewhere);
    * ``rollout_index`` ``[N]``: the rollout each view comes from;
    * ``completion_index``: completion position ``j`` of each scored column, else -1, to
      gather per-token ``[B, G]`` tensors (advantages, sampler log-probs) with
      :meth:`per_token`;
    * ``two_stream``: forward ``[clean canvas | noisy copy]`` (block-causal models only), so
      each block of the view is predicted with the clean blocks before it; the views of one
      rollout share one forward row (:func:`~unmask.objectives.views.packed_two_stream_view`);
    * ``choices``: the denoising steps the views score, when their log-probs include the
      probability that the sampler's rule chose the step's positions (exact selection,
      :mod:`unmask.objectives.selection`); :func:`token_logprobs` adds it.

    Attention masks are built per micro-batch by :meth:`forward_view` (a dense mask for every
    view would cost ``N * W * W``).
    """

    canvas: SequenceBatch
    input_ids: torch.Tensor
    scored: torch.Tensor
    weights: torch.Tensor
    rollout_index: torch.Tensor
    completion_index: torch.Tensor
    two_stream: bool = False
    choices: StepChoices | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        """``[N, W]``: each view's target ids (its rollout's final canvas)."""
        return self.canvas.ids[self.rollout_index]

    @property
    def position_ids(self) -> torch.Tensor:
        """``[N, W]``: each view's position ids (its rollout's canvas positions)."""
        return self.canvas.positions[self.rollout_index]

    def select(self, rows: torch.Tensor | slice) -> ViewBatch:
        """A subset of distinct views (a micro-batch); the canvas is shared."""
        return replace(
            self,
            input_ids=self.input_ids[rows],
            scored=self.scored[rows],
            weights=self.weights[rows],
            rollout_index=self.rollout_index[rows],
            completion_index=self.completion_index[rows],
            choices=None if self.choices is None else self.choices.select(rows, len(self)),
        )

    def to(self, device: torch.device | str) -> ViewBatch:
        """The same views on ``device``."""
        return replace(
            self,
            canvas=self.canvas.to(device),
            input_ids=self.input_ids.to(device),
            scored=self.scored.to(device),
            weights=self.weights.to(device),
            rollout_index=self.rollout_index.to(device),
            completion_index=self.completion_index.to(device),
            choices=None if self.choices is None else self.choices.to(device),
        )

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """``[N, W]`` values of each scored column from ``[B]`` (per rollout) or ``[B, G]``
        (per completion token) values; 0 where nothing is scored."""
        values = values.to(self.input_ids.device)
        if values.dim() == 1:
            out = values[self.rollout_index][:, None].expand(self.scored.shape)
        else:
            rows = self.rollout_index[:, None].expand(self.scored.shape)
            out = values[rows, self.completion_index.clamp(min=0)]
        return torch.where(self.scored, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def forward_view(self, model: DiffusionLM) -> View:
        """The model inputs of these views: ids, positions, additive mask, logit columns.
        Two-stream views of one rollout share one forward row (one clean stream)."""
        c, i = self.canvas, self.rollout_index
        if self.two_stream:
            if model.layout != "block":
                raise ValueError("two-stream views need a block-causal model (layout 'block')")
            return packed_two_stream_view(
                c, i, self.input_ids, self.scored, model.shift_logits, model.dtype
            )
        rows = replace(
            c, ids=c.ids[i], positions=c.positions[i], blocks=c.blocks[i], real=c.real[i],
            completion=c.completion[i],
        )  # fmt: skip
        return masked_view(rows, self.input_ids, model.layout, model.dtype)


class Capabilities:
    """What an objective declares about itself, so the trainer and the generic tests read
    capabilities, never names (shared by :class:`Objective` and the per-step objectives).

    * ``name``: the key the objective is registered and configured under.
    * ``loss_type`` and ``importance_sampling_level``: the method's own normalisation and ratio
      level (see :mod:`unmask.objectives.loss`), used when the config leaves them null.
    * ``num_iterations`` and ``scale_rewards``: the method's recommended optimizer passes per
      rollout batch and advantage scaling (:mod:`unmask.objectives.advantages`), likewise used
      when the config leaves them null.
    * ``scores_trace_states``: each token is scored in the state the sampler unmasked it from
      (TraceRL, AGRPO), so per-token quantities of those states (a value model's) line up.
    * ``supports_two_stream``: the objective has a ``two_stream`` option (block-causal models
      score each block with the clean blocks before it); the trainer defaults it to the
      model's layout.
    """

    name: ClassVar[str]
    loss_type: ClassVar[str] = "dapo"
    importance_sampling_level: ClassVar[ImportanceSamplingLevel] = "token"
    num_iterations: ClassVar[int] = 1
    scale_rewards: ClassVar[str] = "group"
    scores_trace_states: ClassVar[bool] = False
    supports_two_stream: ClassVar[bool] = False


class Objective(Capabilities, ABC):
    """A view builder plus its weighting; everything else is shared. Besides the
    :class:`Capabilities` every objective declares:

    * ``old_logprobs``: ``"recompute"``: the trainer scores the views with the pre-update
      model before the first optimizer step of a rollout batch (and must use, for each inner
      iteration, the same :class:`ViewBatch` for old, current and reference log-probs);
      ``"sampler"``: the rollout's stored log-probs are the old ones (AGRPO).
    * ``scores_sampling_distribution``: score tokens under the distribution they were drawn
      from (pass the sampler's ``temperature``, ``top_k``, ``top_p`` to
      :func:`token_logprobs`); otherwise temperature 1, the denoiser itself.
    * ``masks_prompt``: views may hide prompt tokens (d1's prompt masking), so generic checks
      that the prompt stays visible do not apply.
    * ``ratio_free``: no importance ratio (SPG, wd1): the trainer skips old log-probs and asks
      :meth:`reweight` for the advantages and weights that give the shared loss, at ratio 1,
      the method's gradient.

    Options are the fields of a dataclass subclass, each with a default.
    """

    old_logprobs: ClassVar[OldLogprobs] = "recompute"
    scores_sampling_distribution: ClassVar[bool] = False
    masks_prompt: ClassVar[bool] = False
    ratio_free: ClassVar[bool] = False

    def reweight(
        self,
        views: ViewBatch,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        lengths: torch.Tensor,
        num_generations: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ratio-free objectives: the per-rollout advantages and per-token weights for the
        shared loss (``views`` holds whole rollouts; ``logprobs`` detached). Others: as is."""
        return advantages, views.weights

    def sampler_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``[B, G]``: the old log-probs of ``old_logprobs = "sampler"``, from the rollout."""
        if rollout.logprobs is None:
            raise ValueError(
                f"{self.name} uses the sampler's log-probs as old log-probs: sample with "
                "return_logprobs=True"
            )
        return rollout.logprobs

    @abstractmethod
    def views(self, rollout: Rollout, generator: torch.Generator | None = None) -> ViewBatch:
        """Views of every rollout; deterministic given a (CPU) ``generator``'s state."""


T = TypeVar("T")


def option_names(cls: type) -> list[str]:
    """An objective's options: the fields of its dataclass (read without building it)."""
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def build(registry: Mapping[str, type[T]], name: str, options: Mapping[str, Any], what: str) -> T:
    """``registry[name](**options)``, with errors that name the unknown objective or option
    (shared by the masked and the per-step objectives)."""
    if name not in registry:
        raise ValueError(f"{what} {name!r} is unknown; choose one of {sorted(registry)}")
    cls = registry[name]
    known = option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown options {unknown} for objective {name!r}; known: {known}")
    return cls(**options)


def check_options_in(
    registries: Sequence[Mapping[str, type]], name: str, options: Mapping[str, Any]
) -> None:
    """Refuse an objective ``name`` no registry has, or an option that none of the classes
    registered under ``name`` accepts (``ValueError``, naming the known ones). Nothing is
    built, so a config can be checked before any model loads."""
    classes = [registry[name] for registry in registries if name in registry]
    if not classes:
        names = sorted({n for registry in registries for n in registry})
        raise ValueError(f"unknown objective {name!r}; choose one of {names}")
    known = sorted({option for cls in classes for option in option_names(cls)})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"objective {name!r} has no option(s) {unknown}; its options: {known}")


def uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """``U(0, 1)`` drawn on the CPU, so a seed gives the same views on any device."""
    return torch.rand(shape, generator=generator)


def token_logprobs(
    model: DiffusionLM,
    views: ViewBatch,
    micro_batch_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-prob of each scored target, ``[N, W]`` (0 elsewhere); optionally entropies.

    The distribution is the sampler's: the mask token is never a candidate, logits are divided
    by ``temperature``, then truncated by ``top_k``/``top_p`` exactly as the sampler does
    (:func:`unmask.sampling.remasking.sampling_logits`). The rollout does not record the
    truncated support, so it is recomputed from the current logits: at the sampling
    parameters it equals the sampler's log-prob; after updates a target that left the support
    gets ``-inf`` (ratio 0, no gradient; the loss guards it). Views carrying ``choices`` add
    each token's share of its step's selection log-probability (reading the logits of the
    step's uncommitted candidates too). Gradients flow when enabled; run under
    ``torch.no_grad()`` for old/reference log-probs.
    """
    if temperature <= 0:
        raise ValueError("token log-probs need temperature > 0 (greedy decoding has none)")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    device = model.device
    logps, entropies = [], []
    for start in range(0, len(views), micro_batch_size):
        chunk = views.select(slice(start, start + micro_batch_size)).to(device)
        view = chunk.forward_view(model)
        choices = chunk.choices
        read = chunk.scored if choices is None else chunk.scored | choices.cells(chunk.scored.shape)
        rows, cols = read.nonzero(as_tuple=True)
        # The LM head runs on the cells read only (a view scores a few of a long row).
        logits = model(view.input_ids, view.position_ids, view.bias, None, view.cells(rows, cols))
        logits = logits.float().index_fill(
            -1, torch.tensor([model.mask_token_id], device=device), -inf
        )
        on = chunk.scored[rows, cols]
        logp = sampling_logits(logits[on], temperature, top_k, top_p).log_softmax(dim=-1)
        target = logp.gather(-1, chunk.targets[rows[on], cols[on]][:, None])[:, 0]
        empty = torch.zeros(chunk.scored.shape, device=device)
        out = empty.index_put((rows[on], cols[on]), target)
        if choices is not None:
            cell = torch.full(read.shape, -1, dtype=torch.long, device=device)
            cell[rows, cols] = torch.arange(len(rows), device=device)
            out = out + choices.shares(
                logits, cell, chunk.targets, chunk.scored, model.mask_token_id, temperature,
                top_k, top_p,
            )  # fmt: skip
        logps.append(out)
        if with_entropy:  # a metric: no graph
            plogp = torch.special.xlogy(logp.detach().exp(), logp.detach().exp())
            entropies.append(empty.index_put((rows[on], cols[on]), -plogp.sum(dim=-1)))
    logp_all = torch.cat(logps) if logps else torch.zeros(views.scored.shape, device=device)
    if not with_entropy:
        return logp_all
    return logp_all, torch.cat(entropies) if entropies else torch.zeros_like(logp_all)
