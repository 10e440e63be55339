"""The sampler: exact caches, trace invariants, schedules, controlled greedy order, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unmask.models import DiffusionSettings, build_char_tokenizer, from_preset
from unmask.sampling import Sampler, SamplerConfig

PROMPTS = ["12", "hello there", "7", "abcd"]


def _generate(model, **kw):
    return Sampler(SamplerConfig(**{"gen_length": 16, "stop_at_eos": False, **kw})).generate(
        model, PROMPTS
    )


def _same(a, b):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.steps, b.steps)
    assert torch.equal(a.completion_mask, b.completion_mask)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("remasking", ["low_confidence", "threshold", "random"])
def test_block_kv_cache_is_exact(block_model, temperature, remasking):
    kw = {"temperature": temperature, "remasking": remasking, "threshold": 0.05}
    cached = _generate(block_model, cache="kv", **kw)
    plain = _generate(block_model, cache="none", **kw)
    _same(cached, plain)
    assert cached.nfe == plain.nfe


def test_block_kv_cache_is_exact_for_shifted_model():
    model = from_preset("nano-block", seed=4, shift_logits=True).eval()
    _same(
        _generate(model, cache="kv", temperature=1.0),
        _generate(model, cache="none", temperature=1.0),
    )


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("shift", [False, True])
def test_full_caches_are_exact_with_one_step_per_block(cache, shift):
    # With one step per block every step is the block's refreshing full forward.
    model = from_preset("nano-full", seed=5, shift_logits=shift).eval()
    kw = {"block_length": 4, "steps_per_block": 1, "temperature": 1.0}
    _same(_generate(model, cache=cache, **kw), _generate(model, cache="none", **kw))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_full_caches_run_many_steps(full_model, cache):
    out = _generate(full_model, cache=cache, block_length=8)
    assert (out.steps >= 0).all()


@pytest.mark.parametrize("model_name", ["block_model", "full_model"])
def test_trace_invariants(model_name, request):
    model = request.getfixturevalue(model_name)
    out = _generate(model, block_length=4, steps_per_block=2, temperature=1.0)
    assert (out.steps >= 0).all()  # every completion position has a step
    eos = model.tokenizer.eos_token_id
    for ids, keep in zip(out.completion_ids, out.completion_mask, strict=True):
        n = int(keep.sum())  # the completion is a prefix that ends at the first EOS, if any
        assert keep[:n].all() and eos not in ids[: n - 1].tolist()
        assert n == len(ids) or ids[n - 1] == eos
    prompt_len = out.prompt_lengths
    origin = out.block_origins()
    for row in range(out.batch_size):
        pos = prompt_len[row] + torch.arange(16)
        block = torch.div(pos - origin[row], 4, rounding_mode="floor")
        steps = out.steps[row]
        for k in block.unique():
            in_k = block == k
            if k > block.min():  # every step of block k comes after every step of block k-1
                assert steps[in_k].min() > steps[block == k - 1].max()
            # tokens per step follow the schedule: n masks over 2 steps, front-loaded
            n = int(in_k.sum())
            counts = torch.bincount(steps[in_k] - steps[in_k].min()).tolist()
            assert counts == [n - n // 2, n // 2] if n > 1 else counts == [1]
    assert out.nfe == int(out.num_steps.max())


def test_one_token_per_step_by_default(block_model):
    out = _generate(block_model)
    for row in range(out.batch_size):
        assert sorted(out.steps[row].tolist()) == list(range(16))


def test_dynamic_threshold_commits_at_least_one(block_model):
    out = _generate(block_model, remasking="threshold", threshold=1.0)  # nothing reaches 1.0
    for row in range(out.batch_size):
        assert torch.bincount(out.steps[row]).min() >= 1
        assert sorted(out.steps[row].tolist()) == list(range(16))
    eager = _generate(block_model, remasking="threshold", threshold=0.0)  # everything qualifies
    assert int(eager.num_steps.max()) < 16


def test_never_resampled_when_quota_exceeds_masks(block_model):
    # 3 steps for 4-token blocks: quotas 2,1,1; and 8 steps for 4 tokens: extra steps idle.
    for spb in (3, 8):
        out = _generate(block_model, block_length=4, steps_per_block=spb)
        for row in range(out.batch_size):
            assert (out.steps[row] >= 0).all()
            assert len(out.steps[row]) == 16


def test_seeded_and_deterministic(block_model):
    a = _generate(block_model, temperature=1.0, seed=7)
    b = _generate(block_model, temperature=1.0, seed=7)
    c = _generate(block_model, temperature=1.0, seed=8)
    _same(a, b)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_logprobs_under_exact_sampling_distribution(full_model):
    out = _generate(
        full_model,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        return_logprobs=True,
        block_length=16,
        steps_per_block=1,
    )
    assert out.logprobs is not None and (out.logprobs <= 0).all()
    # with one step the whole completion is drawn from one forward: recompute it
    from unmask.sampling.canvas import Canvas
    from unmask.sampling.forwarder import Forwarder
    from unmask.sampling.remasking import sampling_logits
    from unmask.sampling.sampler import encode_prompts

    canvas = Canvas.build(
        encode_prompts(full_model, PROMPTS),
        16,
        16,
        "prompt",
        full_model.mask_token_id,
        0,
        torch.device("cpu"),
    )
    with torch.no_grad():
        logits = (
            Forwarder(full_model, canvas, "none", 16, compile=False)
            .block_logits(canvas.start, canvas.start + 16, 0)
            .float()
        )
    logits[..., full_model.mask_token_id] = float("-inf")
    logp = sampling_logits(logits, 0.7, 5, 0.9).log_softmax(-1)
    expected = logp.gather(-1, out.completion_ids[..., None])[..., 0]
    assert torch.allclose(out.logprobs, expected, atol=1e-5)
    assert ((logp > float("-inf")).sum(-1) <= 5).all()


def test_stop_at_eos_truncates_completion(block_model):
    tok = block_model.tokenizer
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 50.0  # the model always wants to stop

    class Eager(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        def forward(self, *args):
            return self.inner(*args) + bias

    out = Sampler(SamplerConfig(gen_length=16)).generate(Eager(block_model), PROMPTS)
    assert out.nfe <= 8  # stopped after the first one or two blocks, not 4 blocks
    assert (out.completion_lengths == 1).all()  # only the EOS is the completion
    assert (out.steps == -1).any()  # later blocks never decoded
    assert out.completion_texts(tok) == [""] * 4


class ControlledModel(torch.nn.Module):
    """Token at position p is ``p % 5 + 10`` with confidence rising with p."""

    def __init__(self, layout="full", block_size=4, vocab=20):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.settings = DiffusionSettings(
            mask_token_id=vocab - 1, layout=layout, block_size=block_size, block_align="prompt"
        )
        self.mask_token_id = vocab - 1
        self.layout = layout
        self.block_size = block_size
        self.shift_logits = False
        self.tokenizer = None
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.vocab = vocab

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def backend_mask(self, allowed):
        return allowed

    def forward(self, ids, positions, mask, cache=None, columns=None):
        positions = positions if columns is None else positions[:, columns]
        logits = torch.zeros(*positions.shape, self.vocab)
        logits.scatter_(-1, (positions % 5 + 10)[..., None], (positions.float() * 0.3)[..., None])
        return logits


def test_greedy_order_follows_controlled_confidence():
    model = ControlledModel()
    out = Sampler(SamplerConfig(gen_length=8, block_length=4)).generate(model, [[1, 2], [3]])
    # confidence grows with position: each block is decoded right to left
    assert out.steps.tolist() == [[3, 2, 1, 0, 7, 6, 5, 4]] * 2
    expected = [[(p % 5) + 10 for p in range(start, start + 8)] for start in (2, 1)]
    assert out.completion_ids.tolist() == expected
    # margin and entropy agree here; random does not depend on confidence but still covers all
    for rule in ("margin", "entropy"):
        again = Sampler(SamplerConfig(gen_length=8, block_length=4, remasking=rule)).generate(
            model, [[1, 2], [3]]
        )
        assert again.steps.tolist() == out.steps.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gen_length": 10, "block_length": 4}, "must divide"),
        ({"remasking": "sideways"}, "remasking must be one of"),
        ({"cache": "magic"}, "cache must be one of"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


def test_bad_input_is_a_clear_error(block_model, full_model):
    sampler = Sampler(SamplerConfig(gen_length=8))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate(block_model, ["ok", ""])
    with pytest.raises(ValueError, match="non-empty list"):
        sampler.generate(block_model, [])
    with pytest.raises(ValueError, match="does not fit"):
        Sampler(SamplerConfig(gen_length=8, cache="dual")).generate(block_model, ["x"])
    with pytest.raises(ValueError, match="must divide"):
        Sampler(SamplerConfig(gen_length=6)).generate(block_model, ["x"])  # block_size 4
    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="positions"):
        Sampler(SamplerConfig(gen_length=4096, block_length=32)).generate(full_model, ["x"])
    assert tok.mask_token_id is not None
