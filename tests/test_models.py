"""Presets, the character tokenizer, and save/load in the Hugging Face layout."""

from __future__ import annotations

import json

import pytest
import torch

from unmask.models import PRESETS, DiffusionLM, build_char_tokenizer, from_preset


def test_presets_cover_both_layouts_and_sizes():
    sizes = {name: from_preset(name).num_parameters() for name in ("nano-full", "base-block")}
    assert 2e5 < sizes["nano-full"] < 5e5
    assert 3.5e7 < sizes["base-block"] < 4.5e7
    assert {"tiny-full", "tiny-block"} <= set(PRESETS)
    assert from_preset("tiny-block").layout == "block"


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="known presets"):
        from_preset("huge-block")


def test_char_tokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer()
    text = "12+3*4 = 16\n<answer>"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert {tok.mask_token, tok.pad_token, tok.bos_token, tok.eos_token} <= set(tok.get_vocab())
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.mask_token_id == tok.mask_token_id


def test_save_and_load_keeps_weights_and_settings(tmp_path):
    model = from_preset("nano-block", seed=3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen3"
    assert saved["diffusion"]["layout"] == "block"
    loaded = DiffusionLM.from_pretrained(tmp_path, dtype="float32", device="cpu")
    assert loaded.settings == model.settings
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(model.tokenizer)
    bigger = DiffusionLM.from_pretrained(tmp_path, device="cpu", block_size=8)
    assert bigger.block_size == 8


def test_missing_mask_token_is_a_clear_error(tmp_path):
    model = from_preset("nano-full")
    model.model.save_pretrained(tmp_path)  # no diffusion settings, no tokenizer
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("diffusion", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mask_token_id"):
        DiffusionLM.from_pretrained(tmp_path, device="cpu")
    from unmask.models.tokenizer import resolve_mask_token_id

    tok = build_char_tokenizer()
    tok.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        resolve_mask_token_id(tok, None)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        DiffusionLM.from_pretrained(tmp_path, device="cpu")
