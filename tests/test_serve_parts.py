"""Server parts without HTTP: text settling, chat prompts, the batcher, batch keys."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

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
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


def _batcher(gate: threading.Event | None = None, **kwargs) -> tuple[Batcher, list[list[FakeJob]]]:
    """A batcher over a fake run that records its batches (and waits for ``gate`` if given)."""
    seen: list[list[FakeJob]] = []

    def run(jobs: list[FakeJob]) -> list[str]:
        seen.append(jobs)
        assert gate is None or gate.wait(30), "the test never opened the gate"
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


def test_cancelled_jobs_leave_the_queue_or_are_told_to_stop():
    async def main():
        gate = threading.Event()
        batcher, seen = _batcher(gate, wait_s=0.0)
        batcher.start()
        running, queued = FakeJob("a"), FakeJob("b")
        first, second = batcher.submit(running), batcher.submit(queued)
        while not batcher.running:
            await asyncio.sleep(0.001)
        first.cancel()
        second.cancel()
        await asyncio.sleep(0)  # the done callbacks run
        state = (running.cancelled, queued.cancelled, batcher.queued, batcher.cancelled)
        gate.set()
        assert await batcher.submit(FakeJob("c")) == "c"
        await batcher.stop()
        return state, seen

    state, seen = asyncio.run(main())
    assert state == (True, True, 0, 2)
    assert [[j.key for j in batch] for batch in seen] == [["a"], ["c"]]  # "b" never ran


def _stepping_jobs(engine: Engine, cancel_at: dict[int, int]) -> tuple[list, list[list[int]]]:
    """Two jobs of one batch; job i cancels itself at step ``cancel_at[i]``; steps seen each."""
    prompts = engine.encode(["12"], "prompt")
    request = CompletionRequest(model="nano-block", prompt="12", max_tokens=16)
    jobs = [engine.prepare(prompts, request, 16, "prompt") for _ in range(2)]
    steps: list[list[int]] = [[], []]
    for i, job in enumerate(jobs):

        def emit(view, i=i, job=job):
            steps[i].append(view.nfe)
            if view.nfe == cancel_at.get(i):
                job.cancel()

        job.emit = emit
    return jobs, steps


def test_a_batch_stops_at_the_next_step_once_all_its_jobs_are_cancelled(block_model):
    config = ServeConfig(model="nano-block", sampler=SamplerConfig(stop_at_eos=False))
    engine = Engine(block_model, config)
    jobs, steps = _stepping_jobs(engine, {})
    full = engine.run(jobs)
    assert steps[0] == list(range(1, 17))  # one token a step
    jobs, steps = _stepping_jobs(engine, {0: 3})
    partly = engine.run(jobs)
    assert partly == [[], full[1]]  # the other job's result is what it would have been
    assert (steps[0], len(steps[1])) == ([1, 2, 3], 16)
    jobs, steps = _stepping_jobs(engine, {0: 2, 1: 5})
    assert engine.run(jobs) == [[], []]
    assert steps == [[1, 2], [1, 2, 3, 4, 5]]  # no step after the last cancel


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
    assert job(top_k=-1).config.top_k == 0 and job(top_k=5).config.top_k == 5
    with pytest.raises(APIError) as err:
        engine.encode([[1, 10**6]], "prompt")
    assert "vocabulary" in err.value.message


def test_sizes_are_checked_before_tokenising(block_model):
    engine = Engine(block_model, ServeConfig(model="nano-block", max_batch_size=4))
    assert engine.max_prompt_chars == 16 * block_model.config.max_position_embeddings
    engine.check_size(["1" * engine.max_prompt_chars, [1, 2]], 2, "prompt")
    for prompts, n, param in ((["1"] * 5, 1, "prompt"), (["1", "2"], 3, "n")):
        with pytest.raises(APIError) as err:
            engine.check_size(prompts, n, "prompt")
        assert (err.value.status, err.value.param) == (400, param)
    with pytest.raises(APIError) as err:
        engine.check_size(["1", "1" * (engine.max_prompt_chars + 1)], 1, "prompt")
    assert err.value.code == "context_length_exceeded" and "prompt 1 has" in err.value.message
    small = Engine(block_model, ServeConfig(model="nano-block", max_prompt_chars=3))
    with pytest.raises(APIError, match="max_prompt_chars"):
        small.check_chars(["1234"], "messages")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 8.0}, "max_tokens"),
        ({"n": "2"}, "n"),
        ({"seed": False}, "seed"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"temperature": 1e-40}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [1, True]}, "prompt"),
        ({"diffusion": {"steps": "2"}}, "diffusion.steps"),
        ({"diffusion": {"block_length": 0}}, "diffusion.block_length"),
        ({"diffusion": {"threshold": 2}}, "diffusion.threshold"),
        ({"diffusion": {"stream_canvas": 1}}, "diffusion.stream_canvas"),
        ({"diffusion": {"remasking": "sideways"}}, "diffusion.remasking"),
        ({"diffusion": {"steps": 4, "steps_per_block": 2}}, "diffusion.steps_per_block"),
    ],
)
def test_request_fields_are_strict_and_bounded(fields, param):
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "1", **fields})
    assert [".".join(map(str, e["loc"])) for e in err.value.errors()] == [param]


def test_request_fields_in_bounds_pass():
    ok = {"max_tokens": 8, "temperature": 0, "top_p": 1, "top_k": 0, "seed": -1, "n": 2}
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1]], **ok}).n == 2
    for t in (0.0, 0.01, 2):
        assert CompletionRequest(model="m", prompt="1", temperature=t).temperature == t
    streamed = {"stream": True, "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate({"model": "m", "prompt": "1", **streamed}).stream


def test_server_config_checks():
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    assert ServeConfig(model="a", served_model_name=None).model_name == "a"
    assert ServeConfig(sampler=SamplerConfig(gen_length=4)).sampler.gen_length == 4
