"""The SFT losses equal hand computations: masked CE with and without 1/t, and block SFT's single
two-stream forward equals one ordinary block-causal forward per block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unmask.models import attention_bias, block_index, block_origin, from_preset
from unmask.objectives.sft_loss import Noise, resolve_objective, sample_noise, sft_loss
from unmask.objectives.views import collate, two_stream_view

EOS = 2


def _pairs(model):
    tok = model.tokenizer
    texts = [("12+3=", "15"), ("hello", "world peace"), ("7", "seven!"), ("abcdefgh", "x")]
    return [(tok(p)["input_ids"], [*tok(c)["input_ids"], EOS]) for p, c in texts]


@pytest.mark.parametrize("elbo_weight", [True, False])
@pytest.mark.parametrize("shift", [False, True])
def test_random_mask_loss_matches_hand_computation(elbo_weight, shift):
    model = from_preset("nano-full", seed=3, shift_logits=shift).eval()
    pairs = _pairs(model)
    batch = collate(pairs, 0, model.block_size, "prompt", whole_blocks=False)
    ratios = [0.5, 0.25, 0.8, 0.1]
    chosen = [[0, 2], [1, 4, 11], [6], [0, 1]]  # masked completion indices (EOS included)
    t = torch.tensor(ratios)[:, None].expand_as(batch.ids).clone()
    mask = torch.zeros_like(batch.completion)
    for row, idx in enumerate(chosen):
        cols = batch.completion[row].nonzero().flatten()
        mask[row, cols[idx]] = True
    with torch.no_grad():
        out = sft_loss(
            model, model.settings, batch, Noise(t, mask), "random_mask", elbo_weight=elbo_weight
        )
        total = 0.0
        for (prompt, completion), ratio, idx in zip(pairs, ratios, chosen, strict=True):
            noisy = [model.mask_token_id if j in idx else x for j, x in enumerate(completion)]
            ids = torch.tensor([prompt + noisy])
            n = ids.shape[1]
            logits = model(ids, torch.arange(n)[None], torch.zeros(1, 1, n, n))[0]
            for j in idx:
                logp = F.log_softmax(logits[len(prompt) + j], dim=-1)[completion[j]]
                total += -float(logp) * (1.0 / ratio if elbo_weight else 1.0)
    expected = total / sum(len(c) for _, c in pairs)
    assert out.masked_tokens == sum(len(i) for i in chosen)
    assert abs(float(out.loss) - expected) < 1e-5


def _block_by_block(model, pairs, batch, noise, elbo_weight):
    """For every block k: forward [prompt | clean blocks < k | noisy block k] on its own."""
    b = model.block_size
    total = 0.0
    for row, (prompt, completion) in enumerate(pairs):
        seq = torch.tensor(prompt + completion)
        n = len(seq)
        pad = int(batch.real[row].nonzero()[0])
        positions = torch.arange(n)
        origin = block_origin(torch.tensor([len(prompt)]), b, model.settings.block_align)
        blocks = block_index(positions[None], origin, b)[0]
        masked = noise.mask[row, pad : pad + n]
        t = noise.t[row, pad : pad + n]
        for k in blocks[len(prompt) :].unique().tolist():
            end = int((blocks <= k).sum())
            ids = seq[:end].clone()
            in_k = (blocks[:end] == k) & masked[:end]
            ids[in_k] = model.mask_token_id
            bias = attention_bias(
                blocks[None, :end], blocks[None, :end], torch.ones(1, end, dtype=torch.bool),
                "block", torch.float32,
            )  # fmt: skip
            logits = model(ids[None], positions[None, :end], bias)[0]
            for q in in_k.nonzero().flatten().tolist():
                nll = -float(F.log_softmax(logits[q], dim=-1)[seq[q]])
                total += nll / float(t[q]) if elbo_weight else nll
    return total / sum(len(c) for _, c in pairs)


@pytest.mark.parametrize("elbo_weight", [True, False])
@pytest.mark.parametrize("align", ["zero", "prompt"])
@pytest.mark.parametrize("shift", [False, True])
def test_block_loss_equals_block_by_block_forwards(shift, align, elbo_weight):
    model = from_preset("nano-block", seed=4, shift_logits=shift, block_align=align).eval()
    pairs = _pairs(model)
    batch = collate(pairs, 0, model.block_size, align, whole_blocks=True)
    noise = sample_noise(batch, "block", 0.2, 1.0, torch.Generator().manual_seed(0))
    assert noise.mask.sum() >= 8
    with torch.no_grad():
        out = sft_loss(model, model.settings, batch, noise, "block", elbo_weight=elbo_weight)
        expected = _block_by_block(model, pairs, batch, noise, elbo_weight)
    assert abs(float(out.loss) - expected) < 1e-5


def test_noise_touches_only_the_completion_and_is_constant_per_block():
    model = from_preset("nano-block", seed=4)
    batch = collate(_pairs(model), 0, 4, "zero", whole_blocks=True)
    generator = torch.Generator().manual_seed(1)
    masked_any = torch.zeros_like(batch.completion)
    for _ in range(50):
        noise = sample_noise(batch, "block", 0.001, 1.0, generator)
        assert not (noise.mask & ~batch.completion).any()  # prompt and padding never masked
        masked_any |= noise.mask
        for row in range(batch.ids.shape[0]):
            for k in batch.blocks[row].unique():
                in_k = batch.blocks[row] == k
                assert noise.t[row, in_k].unique().numel() == 1
    assert torch.equal(masked_any, batch.completion)  # every completion token, EOS included
    seq = sample_noise(batch, "random_mask", 0.001, 1.0, generator)
    assert (seq.t == seq.t[:, :1]).all()  # one t per sequence


def test_two_stream_mask_is_block_diffusion():
    model = from_preset("nano-block", seed=4)
    tok = model.tokenizer
    pairs = [(tok("abcdef")["input_ids"], [*tok("ghijklmnop")["input_ids"], EOS])]
    batch = collate(pairs, 0, 4, "zero", whole_blocks=True)
    view = two_stream_view(batch, batch.ids, False, torch.float32)
    seen = view.bias[0, 0] == 0
    width, s = batch.ids.shape[1], batch.start
    blocks = torch.cat([batch.blocks[0], batch.blocks[0, s:]])
    noisy = torch.arange(len(blocks)) >= width
    for q in range(len(blocks)):
        for k in range(len(blocks)):
            if q == k:
                continue
            if not noisy[q]:
                want = not noisy[k] and blocks[k] <= blocks[q]
            elif noisy[k]:
                want = bool(blocks[k] == blocks[q])
            else:
                want = bool(blocks[k] < blocks[q])
            want = want and bool(torch.cat([batch.real[0], batch.real[0, s:]])[k])
            assert bool(seen[q, k]) == want, (q, k)
    assert torch.equal(view.position_ids[0, width:], batch.positions[0, s:])


def test_objective_must_fit_the_layout():
    assert resolve_objective("auto", "block") == "block"
    assert resolve_objective("auto", "full") == "random_mask"
    with pytest.raises(ValueError, match="does not fit a 'block' model"):
        resolve_objective("random_mask", "block")
    with pytest.raises(ValueError, match="one of"):
        resolve_objective("ar", "full")


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="row 1 has an empty prompt"):
        collate([([5], [6, EOS]), ([], [7, EOS])], 0, 4, "zero", whole_blocks=True)
