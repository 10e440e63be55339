"""Server parts without HTTP: text settling, chat prompts, the batcher, batch keys."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from unmask.models.tokenizer import build_char_tokenizer
from unmask.sampling.sampler import SamplerConfig
from unmask.serve.batcher import Batcher, Overloaded
from unmask.serve.chat import DEFAULT_CHAT_TEMPLATE, render_chat, resolve_template
from unmask.serve.config import ServeConfig
from unmask.serve.engine import Engine
from unmask.serve.protocol import APIError, CompletionRequest
from unmask.serve.text import Detokenizer

TOK = build_char_tokenizer()
MASK, EOS = TOK.mask_token_id, TOK.eos_token_id


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def detok(max_tokens: int = 16, stop: list[str] | None = None) -> Detokenizer:
    return Detokenizer(TOK, MASK, max_tokens, stop or [], placeholder="_")


def test_settled_text_stops_at_the_first_mask_eos_or_stop_string():
    d = detok()
    partial = d.settle([*ids("ab"), MASK, *ids("cd")], complete=False)
    assert (partial.text, partial.tokens, partial.finish) == ("ab", 2, None)
    ended = d.settle([*ids("ab"), EOS, *ids("zz"), MASK], complete=False)
    assert (ended.text, ended.finish) == ("ab", "stop")
    assert d.settle(ids("abcd"), complete=True).finish == "length"
    assert detok(max_tokens=3).settle(ids("abcd"), complete=False).text == "abc"
    stopped = detok(stop=["c", "xyz"]).settle(ids("abcdc"), complete=True)
    assert (stopped.text, stopped.finish) == ("ab", "stop")


def test_stream_holds_back_what_could_become_a_stop_string():
    d = detok(stop=["END"])
    assert d.streamable(d.settle([*ids("helloEN"), MASK], complete=False)) == "hello"
    assert d.streamable(d.settle([*ids("helloEND"), MASK], complete=False)) == "hello"
    assert d.streamable(d.settle(ids("helloEN"), complete=True)) == "helloEN"


def test_canvas_shows_masks_as_placeholders():
    text, tokens = detok().canvas([*ids("a"), MASK, MASK, *ids("b")])
    assert text == "a__b"
    assert tokens == [ids("a")[0], None, None, ids("b")[0]]


def test_default_chat_template_for_tokenizers_without_one(tmp_path):
    assert TOK.chat_template is None
    template = resolve_template(TOK, None)
    assert template == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert render_chat(TOK, template, messages) == "System: Be brief.\nUser: 2+2?\nAssistant:"
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[-1]['content'] }} =")
    assert render_chat(TOK, resolve_template(TOK, str(path)), messages) == "2+2? ="
    with pytest.raises(FileNotFoundError, match="chat_template"):
        resolve_template(TOK, str(tmp_path / "missing.jinja"))


@dataclass(eq=False)
class FakeJob:
    key: str
    rows: int = 1


def _batcher(**kwargs) -> tuple[Batcher, list[list[FakeJob]]]:
    seen: list[list[FakeJob]] = []

    def run(jobs: list[FakeJob]) -> list[str]:
        seen.append(jobs)
        if any(j.key == "boom" for j in jobs):
            raise RuntimeError("boom")
        return [j.key for j in jobs]

    settings = {"max_rows": 4, "wait_s": 0.05, "max_queue": 16, **kwargs}
    return Batcher(run, **settings), seen


def test_batcher_groups_equal_keys_up_to_max_rows():
    async def main():
        batcher, seen = _batcher()
        batcher.start()
        jobs = [FakeJob("a"), FakeJob("b"), FakeJob("a", rows=2), FakeJob("a"), FakeJob("a")]
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        await batcher.stop()
        return batcher, seen, results

    batcher, seen, results = asyncio.run(main())
    assert results == ["a", "b", "a", "a", "a"]
    assert [[j.key for j in batch] for batch in seen] == [["a", "a", "a"], ["b"], ["a"]]
    assert batcher.batch_sizes == {4: 1, 1: 2}


def test_batcher_refuses_when_full_and_survives_failures():
    async def main():
        batcher, seen = _batcher(max_queue=2, wait_s=10.0, max_rows=8)
        batcher.start()
        first, second = batcher.submit(FakeJob("boom")), batcher.submit(FakeJob("boom"))
        with pytest.raises(Overloaded):
            batcher.submit(FakeJob("x"))
        second.cancel()  # a client that left: its job is dropped, freeing its place
        third = batcher.submit(FakeJob("boom", rows=8))  # fills the batch: no waiting
        for future in (first, third):
            with pytest.raises(RuntimeError, match="boom"):
                await future
        assert await batcher.submit(FakeJob("ok", rows=8)) == "ok"
        await batcher.stop()
        return batcher, seen

    batcher, seen = asyncio.run(main())
    assert batcher.rejected == 1
    assert [len(batch) for batch in seen] == [1, 1, 1]  # first and third differ in rows only
    assert batcher.batch_sizes == {1: 1, 8: 2}


def test_batch_keys_and_request_checks(block_model):
    engine = Engine(block_model, ServeConfig(model="nano-block", max_batch_size=4))
    prompts = engine.encode(["12"], "prompt")

    def job(**fields):
        request = CompletionRequest(model="nano-block", prompt="12", **fields)
        return engine.prepare(prompts, request, request.max_tokens, "prompt")

    assert job(max_tokens=5).key == job(max_tokens=5).key
    assert job(max_tokens=5).config.gen_length == 8  # rounded up to whole blocks of 4
    assert job(max_tokens=5).key != job(max_tokens=9).key
    assert job(seed=1).key == job(seed=2).key  # greedy: the seed does not matter
    sampled = job(seed=1, temperature=1.0)
    assert sampled.key != job(seed=1, temperature=1.0).key  # seeded sampling runs alone
    assert job(temperature=1.0).key == job(temperature=1.0).key
    steps = job(max_tokens=8, diffusion={"steps": 3}).config
    assert steps.steps_per_block == 2  # 3 steps over 2 blocks, rounded up
    with pytest.raises(APIError, match="remasking") as err:
        job(diffusion={"remasking": "sideways"})
    assert err.value.param == "diffusion.remasking"
    with pytest.raises(APIError, match="not both"):
        job(diffusion={"steps": 4, "steps_per_block": 2})
    with pytest.raises(APIError) as err:
        job(n=5)
    assert (err.value.status, err.value.param) == (400, "n")
    with pytest.raises(APIError) as err:
        engine.encode([[1, 10**6]], "prompt")
    assert "vocabulary" in err.value.message


def test_server_config_checks():
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    assert ServeConfig(model="a", served_model_name=None).model_name == "a"
    assert ServeConfig(sampler=SamplerConfig(gen_length=4)).sampler.gen_length == 4
