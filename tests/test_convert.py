"""Published family checkpoints (LLaDA, MMaDA, Dream, SDAR) into native classes.

Each test writes a tiny random checkpoint in the family's own layout: its config fields, its
weight names (as the published safetensors index files list them), and its tokenizer files
(including Dream's remote-code tokenizer class). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from unmask.cli import main
from unmask.models import DiffusionLM
from unmask.models.export import convert_checkpoint
from unmask.sampling.sampler import Sampler, SamplerConfig

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "hello world 12+3=15"
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 32, 4, 2, 2, 48


# -- tokenizers in the families' file layouts ---------------------------------------------------


def _bpe(specials: list[str]) -> Tokenizer:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(
        ["hello world the quick brown fox 0123456789 +-*/= sudoku"] * 4, trainer
    )
    core.add_special_tokens(specials)
    return core


def _write_tokenizer_json(folder: Path, specials: list[str], config: dict) -> int:
    """A fast tokenizer (``tokenizer.json``), as LLaDA and SDAR ship; returns its size."""
    core = _bpe(specials)
    core.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT}))
    return core.get_vocab_size()


def _write_dream_tokenizer(folder: Path, specials: list[str]) -> int:
    """Dream's layout: vocab.json + merges.txt read by a remote-code ``DreamTokenizer``."""
    core = _bpe([])
    core.model.save(str(folder))
    n = core.get_vocab_size()
    decoder = {
        str(n + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
        for i, s in enumerate(specials)
    }  # fmt: skip
    config = {
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": decoder,
        "bos_token": "<|beginoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return n + len(specials)


# -- checkpoints in the families' layouts -------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.2).to(torch.bfloat16)


def llada_tensors(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaDA-8B's weight names (model.safetensors.index.json), at a tiny size, in bf16."""
    g = torch.Generator().manual_seed(seed)
    head = HIDDEN // HEADS
    t = {
        "model.transformer.wte.weight": _randn(g, vocab, HIDDEN),
        "model.transformer.ln_f.weight": 1 + _randn(g, HIDDEN),
        "model.transformer.ff_out.weight": _randn(g, vocab, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        t |= {
            p + "q_proj.weight": _randn(g, HIDDEN, HIDDEN),
            p + "k_proj.weight": _randn(g, KV_HEADS * head, HIDDEN),
            p + "v_proj.weight": _randn(g, KV_HEADS * head, HIDDEN),
            p + "attn_out.weight": _randn(g, HIDDEN, HIDDEN),
            p + "ff_proj.weight": _randn(g, FFN, HIDDEN),
            p + "up_proj.weight": _randn(g, FFN, HIDDEN),
            p + "ff_out.weight": _randn(g, HIDDEN, FFN),
            p + "attn_norm.weight": 1 + _randn(g, HIDDEN),
            p + "ff_norm.weight": 1 + _randn(g, HIDDEN),
        }
    return t


def write_llada(folder: Path, model_type: str = "llada", **config_changes) -> dict:
    folder.mkdir(parents=True)
    specials = ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mdm_mask|>"]
    vocab = _write_tokenizer_json(
        folder,
        specials,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>"},
    )  # fmt: skip
    config = {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"},
        "model_type": model_type,
        "d_model": HIDDEN, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS,
        "mlp_hidden_size": FFN, "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab,
        "max_sequence_length": 256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "weight_tying": False, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "rope": True, "alibi": False, "include_bias": False,
        "include_qkv_bias": False, "attention_layer_norm": False, "scale_logits": False,
        "clip_qkv": None, "block_group_size": 1, "bias_for_layer_norm": False,
        "eos_token_id": vocab - 4, "pad_token_id": vocab - 4, "torch_dtype": "bfloat16",
        **config_changes,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tensors = llada_tensors(vocab)
    names = sorted(tensors)  # two shards with an index, as the 8B checkpoint has six
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}  # fmt: skip
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def write_qwen_family(folder: Path, family: str, tied: bool = False) -> dict:
    """Dream (Qwen2 names and fields) or SDAR (Qwen3 names and fields)."""
    folder.mkdir(parents=True)
    if family == "dream":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
        vocab = _write_dream_tokenizer(folder, specials)
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
        vocab = _write_tokenizer_json(
            folder, specials, {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
                               "pad_token": "<|endoftext|>"}
        )  # fmt: skip
    fields = {
        "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": tied,
    }  # fmt: skip
    torch.manual_seed(1)
    if family == "dream":
        native = Qwen2ForCausalLM(Qwen2Config(**fields))
        extra = {"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": vocab - 1}
    else:
        native = Qwen3ForCausalLM(Qwen3Config(**fields, head_dim=HIDDEN // HEADS))
        extra = {"model_type": "sdar", "architectures": ["SDARForCausalLM"], "head_dim": 8,
                 "fuse_cross_entropy": True, "block_size": 8}  # fmt: skip
    extra["auto_map"] = {"AutoConfig": f"configuration_{family}.Config"}
    (folder / "config.json").write_text(json.dumps({**fields, **extra}))
    tensors = {
        k: v.detach().clone().to(torch.bfloat16)
        for k, v in native.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


# -- an independent LLaDA forward, written from the architecture's description ---------------


def llada_reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Full-attention LLaDA: RMSNorm, RoPE (theta 5e5), GQA, SwiGLU with ff_proj as the gate."""
    w = {k: v.float() for k, v in t.items()}
    head = HIDDEN // HEADS
    pos = torch.arange(ids.shape[1]).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, head, 2).float() / head))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = torch.cat([-x[..., head // 2 :], x[..., : head // 2]], dim=-1)
        return x * ang.cos() + half * ang.sin()

    h = w["model.transformer.wte.weight"][ids]
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        x = rms(h, w[p + "attn_norm.weight"])
        q = (x @ w[p + "q_proj.weight"].T).unflatten(-1, (HEADS, head)).transpose(1, 2)
        k = (x @ w[p + "k_proj.weight"].T).unflatten(-1, (KV_HEADS, head)).transpose(1, 2)
        v = (x @ w[p + "v_proj.weight"].T).unflatten(-1, (KV_HEADS, head)).transpose(1, 2)
        k, v = (z.repeat_interleave(HEADS // KV_HEADS, dim=1) for z in (k, v))
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(head), dim=-1)
        h = h + (att @ v).transpose(1, 2).flatten(2) @ w[p + "attn_out.weight"].T
        x = rms(h, w[p + "ff_norm.weight"])
        gated = F.silu(x @ w[p + "ff_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)
        h = h + gated @ w[p + "ff_out.weight"].T
    return rms(h, w["model.transformer.ln_f.weight"]) @ w["model.transformer.ff_out.weight"].T


def _logits(model: DiffusionLM, ids: torch.Tensor) -> torch.Tensor:
    """Full-attention logits (LLaDA and Dream attend everywhere)."""
    n = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(n)[None], torch.zeros(1, 1, n, n))


def _generate(model: DiffusionLM) -> None:
    block = model.block_size if model.layout == "block" else 4
    rollout = Sampler(SamplerConfig(gen_length=8, block_length=block)).generate(model, [TEXT])
    assert rollout.completion_ids.shape == (1, 8)
    assert (rollout.completion_ids != model.mask_token_id).all()


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            out |= {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return out


# -- tests ---------------------------------------------------------------------------------------

# The published LLaDA names and their Llama names, listed here independently of the library.
LLADA_TO_LLAMA = {
    "wte": "embed_tokens", "ln_f": "norm", "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}  # fmt: skip


def _llama_name(llada: str) -> str:
    if llada == "model.transformer.ff_out.weight":
        return "lm_head.weight"
    parts = llada.removeprefix("model.transformer.").removesuffix(".weight").split(".")
    if parts[0] == "blocks":
        return f"model.layers.{parts[1]}.{LLADA_TO_LLAMA[parts[2]]}.weight"
    return f"model.{LLADA_TO_LLAMA[parts[0]]}.weight"


@pytest.mark.parametrize("model_type", ["llada", "mmada"])
def test_llada_converts_computes_the_same_function_and_keeps_every_tensor(tmp_path, model_type):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_llada(src, model_type)
    assert main(["convert", str(src), str(dst)]) == 0

    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["diffusion"]["layout"] == "full" and not config["diffusion"]["shift_logits"]
    saved = _saved_tensors(dst)
    assert set(saved) == {_llama_name(k) for k in tensors}  # round trip: every tensor, no other
    for name, tensor in tensors.items():
        assert saved[_llama_name(name)].dtype == torch.bfloat16
        assert torch.equal(saved[_llama_name(name)], tensor), name

    model = DiffusionLM.from_pretrained(dst, dtype="float32", device="cpu")
    tok = model.tokenizer
    assert model.mask_token_id == tok.convert_tokens_to_ids("<|mdm_mask|>") == tok.mask_token_id
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    expected = llada_reference_logits(tensors, ids)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    direct = DiffusionLM.from_pretrained(src, dtype="float32", device="cpu")  # no conversion
    assert torch.equal(_logits(direct, ids), _logits(model, ids))
    _generate(model)


def test_tokenizer_and_chat_template_are_kept(tmp_path):
    from transformers import PreTrainedTokenizerFast

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_llada(src)
    convert_checkpoint(src, dst)
    before = PreTrainedTokenizerFast.from_pretrained(src)
    after = DiffusionLM.from_pretrained(dst, device="cpu").tokenizer
    text = f"{TEXT}<|im_end|><|mdm_mask|>"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert len(after) == len(before) and after.chat_template == before.chat_template == CHAT
    msgs = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(msgs, tokenize=False) == before.apply_chat_template(
        msgs, tokenize=False
    )


def test_dream_converts_with_shifted_logits_and_its_remote_tokenizer(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_qwen_family(src, "dream")
    convert_checkpoint(src, dst)
    saved = _saved_tensors(dst)
    assert set(saved) == set(tensors)
    assert all(torch.equal(saved[k], v) for k, v in tensors.items())
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config  # loadable without remote code

    model = DiffusionLM.from_pretrained(dst, dtype="float32", device="cpu")
    assert model.config.model_type == "qwen2" and model.shift_logits
    assert model.mask_token_id == model.tokenizer.convert_tokens_to_ids("<|mask|>")
    # Dream predicts token i from the hidden state at i-1: the wrapper shifts the raw logits.
    ids = torch.tensor([model.tokenizer(TEXT)["input_ids"]])
    n = ids.shape[1]
    with torch.no_grad():
        raw = model.model(input_ids=ids, attention_mask=torch.zeros(1, 1, n, n)).logits
    shifted = _logits(model, ids)
    assert torch.equal(shifted[:, 1:], raw[:, :-1])
    _generate(model)


@pytest.mark.parametrize("tied", [True, False])
def test_sdar_converts_as_block_model_with_its_block_size(tmp_path, tied):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tensors = write_qwen_family(src, "sdar", tied=tied)
    convert_checkpoint(src, dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwen3" and "fuse_cross_entropy" not in config
    assert config["diffusion"] | {"mask_token_id": 0} == {
        "mask_token_id": 0, "layout": "block", "block_size": 8, "shift_logits": False,
        "block_align": "zero",
    }  # fmt: skip
    saved = _saved_tensors(dst)
    assert set(saved) == set(tensors) and all(torch.equal(saved[k], v) for k, v in tensors.items())
    model = DiffusionLM.from_pretrained(dst, device="cpu")
    assert model.tokenizer.convert_ids_to_tokens(model.mask_token_id) == "<|MASK|>"
    assert model.model.config.tie_word_embeddings == tied
    _generate(model)


def test_missing_and_unexpected_tensors_are_refused_by_name(tmp_path):
    src = tmp_path / "src"
    tensors = write_llada(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.transformer.blocks.1.ff_proj.weight"]
    kept = {k: v for k, v in _saved_tensors_file(shard).items() if "blocks.1.ff_proj" not in k}
    kept["model.transformer.blocks.0.extra_norm.weight"] = tensors["model.transformer.ln_f.weight"]
    save_file(kept, str(shard))
    with pytest.raises(ValueError) as err:
        convert_checkpoint(src, tmp_path / "dst")
    message = str(err.value)
    assert "missing tensors (1): model.transformer.blocks.1.ff_proj.weight" in message
    assert "unexpected tensors (1): model.transformer.blocks.0.extra_norm.weight" in message
    assert not (tmp_path / "dst").exists()


def _saved_tensors_file(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def test_wrong_shapes_and_unsupported_features_are_refused(tmp_path):
    write_llada(tmp_path / "shape", mlp_hidden_size=FFN + 2)
    with pytest.raises(ValueError, match=r"wrong shape.*ff_proj.weight \[48, 32\] \(expected \[50"):
        convert_checkpoint(tmp_path / "shape", tmp_path / "out1")
    write_llada(tmp_path / "alibi", alibi=True)
    with pytest.raises(ValueError, match="alibi"):
        DiffusionLM.from_pretrained(tmp_path / "alibi", device="cpu")


def test_cli_refuses_native_folders_and_existing_destinations(tmp_path, capsys):
    from unmask.models import from_preset

    from_preset("nano-full").save_pretrained(tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "out")]) == 2
    assert "not a checkpoint of a published dLLM family" in capsys.readouterr().err
    write_llada(tmp_path / "src")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_hub_names_download_family_checkpoints_only(tmp_path, monkeypatch):
    import huggingface_hub

    from unmask.models import from_preset
    from unmask.models.convert import DOWNLOAD_PATTERNS, find_family_checkpoint

    write_qwen_family(tmp_path / "sdar", "sdar")
    from_preset("nano-full").save_pretrained(tmp_path / "native")
    calls = []

    def file(repo, name):
        calls.append(("file", repo, name))
        return str(tmp_path / repo.split("/")[1] / name)

    def snapshot(repo, allow_patterns):
        calls.append(("snapshot", repo, allow_patterns))
        return str(tmp_path / repo.split("/")[1])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert find_family_checkpoint("org/native") is None  # a native config: nothing downloaded
    model = DiffusionLM.from_pretrained("org/sdar", device="cpu")
    assert model.layout == "block" and model.block_size == 8
    assert calls == [
        ("file", "org/native", "config.json"),
        ("file", "org/sdar", "config.json"),
        ("snapshot", "org/sdar", DOWNLOAD_PATTERNS),
    ]
