"""Issue 21: logits only for the columns a step reads, backend masks built once per block, the
static KV cache and the compiled step, each exact against the eager uncached sampler."""

from __future__ import annotations

import pytest
import torch

import unmask.sampling.forwarder as forwarder
from unmask.models import from_preset
from unmask.objectives.base import token_logprobs
from unmask.objectives.tracerl import TraceRL
from unmask.sampling import Sampler, SamplerConfig

PROMPTS = ["12", "hello there", "7", "abcd"]
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _generate(model, **kw):
    config = {"gen_length": 16, "stop_at_eos": False, "return_logprobs": True, **SAMPLING, **kw}
    return Sampler(SamplerConfig(**config)).generate(model, PROMPTS)


def _exact(a, b):
    """Same tokens, same trace, same sampling log-probs (up to float rounding)."""
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.steps, b.steps)
    assert a.nfe == b.nfe
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


class HeadRows:
    """Counts the rows (batch x column cells) each LM-head call computes logits for."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        head = model.model.get_output_embeddings()
        self.handle = head.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self.rows.append(output.shape[:-1].numel())

    def __enter__(self) -> HeadRows:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize(
    ("preset", "cache", "shift"),
    [
        ("nano-block", "none", False),
        ("nano-block", "kv", False),
        ("nano-block", "kv", True),
        ("nano-full", "none", True),
        ("nano-full", "prefix", False),
        ("nano-full", "dual", True),
    ],
)
def test_a_step_computes_logits_for_its_block_only(preset, cache, shift):
    model = from_preset(preset, seed=3, shift_logits=shift).eval()
    block = 4
    with HeadRows(model) as head:
        out = _generate(model, cache=cache, block_length=block, steps_per_block=2)
    read = len(PROMPTS) * block
    assert max(head.rows) == read  # never more than the block's cells of every row
    assert head.rows.count(read) == out.nfe  # one read per denoising step
    assert set(head.rows) <= {0, read}  # a prefill computes none


def test_training_views_compute_logits_for_scored_tokens_only(full_model):
    rollout = _generate(full_model, block_length=8)
    views = TraceRL(selection="ignore").views(rollout)
    with HeadRows(full_model) as head, torch.no_grad():
        logp = token_logprobs(full_model, views, micro_batch_size=8, **SAMPLING)
    assert sum(head.rows) == int(views.scored.sum())
    # The same numbers as reading full-width logits, and the sampler's own log-probs.
    with torch.no_grad():
        view = views.forward_view(full_model)
        logits = full_model(view.input_ids, view.position_ids, view.bias).float()
    rows, cols = views.scored.nonzero(as_tuple=True)
    picked = logits[rows, view.logit_index[rows, cols]]
    picked[:, full_model.mask_token_id] = float("-inf")
    expected = picked.log_softmax(-1).gather(-1, views.targets[rows, cols][:, None])[:, 0]
    assert torch.allclose(logp[rows, cols], expected, atol=1e-5)
    sampled = views.per_token(rollout.logprobs)
    assert torch.allclose(logp[rows, cols], sampled[rows, cols], atol=1e-5)


def test_exact_selection_also_reads_each_step_s_candidates(full_model):
    """The selection factor needs the logits of the step's uncommitted candidates: a step reads
    its block's masked cells (|M|), still not the whole row."""
    rollout = _generate(full_model, block_length=8)
    views = TraceRL().views(rollout)
    assert views.choices is not None
    with HeadRows(full_model) as head, torch.no_grad():
        token_logprobs(full_model, views, micro_batch_size=8, **SAMPLING)
    assert sum(head.rows) == int(views.choices.candidates.sum()) > int(views.scored.sum())


@pytest.mark.parametrize("shift", [False, True])
def test_static_kv_cache_with_bool_masks_equals_eager_uncached_float_masks(shift):
    fast = from_preset("nano-block", seed=6, shift_logits=shift).eval()  # SDPA: bool masks
    plain = from_preset("nano-block", seed=6, shift_logits=shift).eval()
    plain.model.set_attn_implementation("eager")  # additive float masks, never omitted
    _exact(_generate(fast, cache="kv"), _generate(plain, cache="none"))


def test_omitted_masks_equal_eager_uncached():
    # Equal-length prompts and full attention: every query sees every key, so the uncached and
    # the prefix cache's forwards run without a mask (the prefix one with a cache).
    prompts = ["abcd", "1234", "wxyz"]
    fast = from_preset("nano-full", seed=7).eval()
    plain = from_preset("nano-full", seed=7).eval()
    plain.model.set_attn_implementation("eager")
    kw = {"gen_length": 8, "block_length": 4, "steps_per_block": 1, "stop_at_eos": False,
          "return_logprobs": True, **SAMPLING}  # fmt: skip
    reference = Sampler(SamplerConfig(cache="none", **kw)).generate(plain, prompts)
    for cache in ("none", "prefix"):
        _exact(Sampler(SamplerConfig(cache=cache, **kw)).generate(fast, prompts), reference)


@pytest.mark.parametrize(("preset", "cache", "per_block"), [
    ("nano-full", "none", 1), ("nano-block", "kv", 2),
])  # fmt: skip
def test_masks_are_built_once_per_block(monkeypatch, preset, cache, per_block):
    built = []

    def counting(*args, **kwargs):
        built.append(1)
        return allowed_keys(*args, **kwargs)

    allowed_keys = forwarder.allowed_keys
    monkeypatch.setattr(forwarder, "allowed_keys", counting)
    model = from_preset(preset, seed=8, block_align="prompt").eval()
    out = _generate(model, cache=cache, block_length=4, steps_per_block=4)
    blocks = 16 // 4
    assert out.nfe == blocks * 4
    assert len(built) <= per_block * blocks + 1  # + the kv prefill's


def test_compile_is_refused_where_shapes_change():
    with pytest.raises(ValueError, match="compile needs fixed shapes"):
        SamplerConfig(cache="dual", compile=True)


def test_compiled_step_equals_eager_uncached():
    # One real compilation (CPU inductor, about a minute here): static cache, two step shapes.
    model = from_preset("nano-block", seed=9).eval()
    _exact(_generate(model, cache="kv", compile=True), _generate(model, cache="none"))


def test_static_kv_cache_runs_under_bf16_autocast_with_fp32_weights():
    """Full training on a GPU keeps fp32 weights under bf16 autocast; the static cache then
    received bf16 values (and fp32 keys, from Qwen3's k_norm) and refused them at step one."""
    torch.manual_seed(0)
    model = from_preset("nano-block")
    assert model.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _generate(model, cache="kv")
    assert out.completion_ids.shape == (len(PROMPTS), 16)
    assert bool((out.completion_ids != model.mask_token_id).all())
    assert bool(torch.isfinite(out.logprobs).all())
