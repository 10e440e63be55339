"""The 4-D masks make a causal-LM class bidirectional or block-causal, and caches are exact."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from unmask.models import attention_bias, block_index, block_origin, from_preset


def _bias(model, positions, origin, valid=None):
    blocks = block_index(positions, origin, model.block_size)
    if valid is None:
        valid = torch.ones(positions.shape, dtype=torch.bool)
    return attention_bias(blocks, blocks, valid, model.layout, model.dtype)


def test_block_index_aligns_to_prompt_or_zero():
    lengths = torch.tensor([5, 8])
    assert block_origin(lengths, 4, "prompt").tolist() == [5, 8]
    assert block_origin(lengths, 4, "zero").tolist() == [4, 8]
    pos = torch.arange(12).expand(2, 12)
    blocks = block_index(pos, block_origin(lengths, 4, "zero"), 4)
    assert blocks[0].tolist() == [-1] * 4 + [0] * 4 + [1] * 4
    assert blocks[1].tolist() == [-2] * 4 + [-1] * 4 + [0] * 4


def test_full_layout_sees_later_tokens_block_layout_does_not(full_model, block_model):
    torch.manual_seed(0)
    ids = torch.randint(10, 90, (1, 12))
    pos = torch.arange(12)[None]
    origin = torch.tensor([4])  # blocks [4,8) and [8,12) after a 4-token prompt
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 90 + 5  # a token of the last block
    with torch.no_grad():
        for model, expect_change in ((full_model, True), (block_model, False)):
            a = model(ids, pos, _bias(model, pos, origin))
            b = model(changed, pos, _bias(model, pos, origin))
            earlier = (a[0, :8] - b[0, :8]).abs().max().item()
            assert (earlier > 1e-4) == expect_change, (model.layout, earlier)
            # inside the changed token's own block, a block model does see it
            if model.layout == "block":
                assert (a[0, 8:12] - b[0, 8:12]).abs().max().item() > 1e-4


def test_padding_is_invisible(full_model):
    torch.manual_seed(0)
    ids = torch.randint(10, 90, (1, 6))
    pos = torch.arange(6)[None]
    origin = torch.tensor([2])
    padded = torch.cat([torch.full((1, 3), 0), ids], dim=1)
    ppos = torch.cat([torch.zeros(1, 3, dtype=torch.long), pos], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        plain = full_model(ids, pos, _bias(full_model, pos, origin))
        blocks = block_index(ppos, origin, full_model.block_size)
        bias = attention_bias(
            blocks, blocks, valid, "full", full_model.dtype, self_keys=torch.arange(9)
        )
        out = full_model(padded, ppos, bias)
    assert torch.allclose(out[0, 3:], plain[0], atol=1e-5)
    assert torch.isfinite(out).all()


def test_cached_block_forward_equals_uncached(block_model):
    torch.manual_seed(0)
    ids = torch.randint(10, 90, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    origin = torch.zeros(2, dtype=torch.long)
    blocks = block_index(pos, origin, block_model.block_size)
    valid = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        full = block_model(ids, pos, attention_bias(blocks, blocks, valid, "block", torch.float32))
        cache = DynamicCache(config=block_model.config)
        block_model(
            ids[:, :8],
            pos[:, :8],
            attention_bias(blocks[:, :8], blocks[:, :8], valid[:, :8], "block", torch.float32),
            cache,
        )
        tail = block_model(
            ids[:, 8:],
            pos[:, 8:],
            attention_bias(blocks[:, 8:], blocks, valid, "block", torch.float32),
            cache,
        )
    assert (tail - full[:, 8:]).abs().max().item() < 1e-5


def test_shifted_logits_predict_from_previous_column():
    model = from_preset("nano-full", shift_logits=True).eval()
    ids = torch.randint(10, 90, (1, 7))
    pos = torch.arange(7)[None]
    bias = attention_bias(pos, pos, torch.ones(1, 7, dtype=torch.bool), "full", torch.float32)
    with torch.no_grad():
        raw = model.model(input_ids=ids, position_ids=pos, attention_mask=bias).logits
        shifted = model(ids, pos, bias)
    assert torch.equal(shifted[:, 1:], raw[:, :-1])


def test_backend_mask_omits_keeps_bool_or_adds(full_model):
    allowed = torch.tensor([[True, True], [False, True]])[None, None]
    assert full_model.backend_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool)) is None
    assert full_model.backend_mask(allowed) is allowed  # SDPA reads bools exactly
    eager = from_preset("nano-full", seed=2).eval()
    eager.model.set_attn_implementation("eager")
    bias = eager.backend_mask(allowed)
    assert bias.dtype == torch.float32 and bias[0, 0, 1, 0] == torch.finfo(torch.float32).min
    assert torch.equal(bias == 0, allowed)


def test_omitted_mask_is_bidirectional_with_and_without_cache(full_model):
    # No mask means every query sees every key: never a causal mask, also over a cache.
    torch.manual_seed(0)
    ids = torch.randint(10, 90, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    everyone = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    with torch.no_grad():
        masked = full_model(
            ids, pos, attention_bias(pos, pos, everyone[:, 0, 0], "full", torch.float32)
        )
        assert torch.allclose(full_model(ids, pos, None), masked, atol=1e-5)
        cache = DynamicCache(config=full_model.config)
        full_model(ids[:, :8], pos[:, :8], None, cache)
        tail = full_model(ids[:, 8:], pos[:, 8:], None, cache)
        again = DynamicCache(config=full_model.config)
        full_model(ids[:, :8], pos[:, :8], everyone[:, :, :8, :8], again)
        reference = full_model(ids[:, 8:], pos[:, 8:], everyone[:, :, 8:], again)  # bool mask
    assert torch.allclose(tail, reference, atol=1e-5)
