"""The server on a loopback port, called with the real ``openai`` client (and raw httpx)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from unmask.sampling.sampler import Sampler, SamplerConfig
from unmask.serve import BackgroundServer, ServeConfig, create_app

MODEL = "nano-block"


@pytest.fixture
def start(block_model, monkeypatch):
    """``start(**config) -> (server, client)``; every server is stopped after the test."""
    monkeypatch.delenv("UNMASK_API_KEY", raising=False)
    servers: list[BackgroundServer] = []

    def _start(**fields):
        fields.setdefault("sampler", SamplerConfig(gen_length=8))
        config = ServeConfig(model=MODEL, **fields)
        server = BackgroundServer(create_app(config, block_model)).start()
        servers.append(server)
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=fields.get("api_key") or "-", max_retries=0
        )
        return server, client

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def sampler_calls(monkeypatch):
    """Rows of every sampler call; ``gate`` (open by default) holds calls while cleared."""
    calls: list[int] = []
    entered = threading.Event()
    gate = threading.Event()
    gate.set()
    generate = Sampler.generate

    def recording(self, model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        entered.set()
        assert gate.wait(30), "the test never opened the gate"
        return generate(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(Sampler, "generate", recording)
    return calls, entered, gate


def test_completions_chat_and_models(start, block_model):
    _, client = start()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    done = client.completions.create(model=MODEL, prompt="1203", max_tokens=6)
    assert done.object == "text_completion"
    assert len(done.choices[0].text) == 6  # one character per token, no EOS from this model
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4, 6)
    many = client.completions.create(model=MODEL, prompt=["1203", "ab"], max_tokens=4, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == done.choices[0].text[:4]  # greedy
    ids = block_model.tokenizer("1203")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=[ids], max_tokens=4)
    assert by_ids.choices[0].text == many.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5
    )
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].message.content) == 5
    assert chat.usage.prompt_tokens == len("User: hi\nAssistant:")  # the default template


def test_seed_stop_and_diffusion_settings(start):
    _, client = start()

    def text(**fields):
        fields.setdefault("max_tokens", 8)
        return client.completions.create(model=MODEL, prompt="1203", **fields).choices[0]

    sampled = [text(temperature=1.5, seed=7).text for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert text(temperature=1.5, seed=8).text != sampled[0]
    greedy = text().text
    stop = greedy[3:5]
    cut = text(stop=[stop, "never"])
    assert (cut.text, cut.finish_reason) == (greedy[: greedy.index(stop)], "stop")
    one_step = text(extra_body={"diffusion": {"steps": 2, "remasking": "low_confidence"}})
    assert len(one_step.text) == 8
    dynamic = {"diffusion": {"remasking": "threshold", "threshold": 0.5, "block_length": 2}}
    assert len(text(extra_body=dynamic).text) == 8


def test_concurrent_requests_share_one_sampler_call(start, sampler_calls):
    calls, _, _ = sampler_calls
    prompts = ["1", "22", "333", "4444"]
    _, single = start()
    alone = [single.completions.create(model=MODEL, prompt=p, max_tokens=8) for p in prompts]
    assert calls == [1, 1, 1, 1]
    server, client = start(max_batch_size=4, batch_wait_ms=5000)  # a full batch goes at once

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(ask, prompts))
    assert time.monotonic() - started < 5.0  # did not sit out the wait window
    assert calls == [1, 1, 1, 1, 4]
    assert httpx.get(f"{server.url}/v1/stats").json()["batch_sizes"] == {"4": 1}
    for one, together in zip(alone, batched, strict=True):
        assert together.choices[0].text == one.choices[0].text  # each got its own rows back


def test_settings_that_differ_are_not_batched(start, sampler_calls):
    calls, entered, gate = sampler_calls
    _, client = start(max_batch_size=8, batch_wait_ms=0)
    gate.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.completions.create, model=MODEL, prompt="1", max_tokens=4)
        assert entered.wait(30)
        later = []
        for queued, (prompt, max_tokens) in enumerate((("2", 4), ("3", 8), ("4", 4)), 1):
            ask = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
            later.append(pool.submit(client.completions.create, **ask))
            _wait_queued(client, queued)  # arrivals in this order
        gate.set()
        for future in (first, *later):
            assert future.result().choices[0].finish_reason == "length"
    assert calls == [1, 2, 1]  # the two max_tokens=4 requests that waited went together


def _wait_queued(client: openai.OpenAI, n: int) -> None:
    url = str(client.base_url).rstrip("/") + "/stats"
    deadline = time.monotonic() + 30
    while httpx.get(url).json()["queued"] < n:
        assert time.monotonic() < deadline, f"{n} requests never queued"
        time.sleep(0.01)


def test_overload_answers_503_at_once(start, sampler_calls):
    _, entered, gate = sampler_calls
    _, client = start(max_batch_size=1, max_queue=1, batch_wait_ms=0)
    gate.clear()
    ask = {"model": MODEL, "prompt": "12", "max_tokens": 4}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.completions.create, **ask)
        assert entered.wait(30)
        waiting = pool.submit(client.completions.create, **ask)
        _wait_queued(client, 1)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**ask)
        assert time.monotonic() - started < 5.0
        gate.set()
        assert running.result().choices[0].text == waiting.result().choices[0].text
    assert err.value.status_code == 503
    assert err.value.body["code"] == "server_overloaded"
    assert err.value.response.headers["retry-after"] == "1"


def test_streaming_token_deltas_and_canvases(start):
    _, client = start()
    ask = {"model": MODEL, "prompt": "1203", "max_tokens": 8}
    full = client.completions.create(**ask).choices[0].text
    chunks = list(client.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"

    canvases = [
        c.choices[0].model_extra["canvas"]
        for c in client.completions.create(
            **ask, stream=True, extra_body={"diffusion": {"stream_canvas": True}}
        )
        if c.choices[0].model_extra.get("canvas")
    ]
    assert [c["step"] for c in canvases] == list(range(1, len(canvases) + 1))
    masked = [c["tokens"].count(None) for c in canvases]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert canvases[-1]["text"] == full
    assert any(  # text appears out of order: a committed token right of a masked one
        t is not None and None in c["tokens"][:j]
        for c in canvases
        for j, t in enumerate(c["tokens"])
    )

    two_steps = client.completions.create(
        **ask, stream=True, extra_body={"diffusion": {"stream_canvas": True, "steps": 2}}
    )
    steps = [c.choices[0].model_extra["canvas"]["tokens"].count(None) for c in two_steps]
    assert steps[:2] == [4, 0]  # two blocks of 4, each unmasked in one step

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        stop="zzz",
    )
    texts, finished, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stop="zzz"
    )
    assert texts == [plain.choices[0].message.content] * 2
    assert finished == ["length", "length"]
    assert usage is not None and usage.completion_tokens == 12


def test_bad_requests_get_openai_errors_and_the_server_lives(start, block_model):
    server, client = start(max_batch_size=4)
    cases = [
        ({"model": "gpt-4", "prompt": "1"}, 404, "model", "model_not_found"),
        ({"model": MODEL, "prompt": "1", "max_tokens": -3}, 400, "max_tokens", None),
        ({"model": MODEL, "prompt": "1", "top_p": 0}, 400, "top_p", None),
        ({"model": MODEL, "prompt": "1", "n": 5}, 400, "n", None),
        ({"model": MODEL, "prompt": ""}, 400, "prompt", None),
        ({"model": MODEL, "prompt": ["1", [2]]}, 400, "prompt", None),
        ({"model": MODEL, "prompt": "1", "logprobs": 2}, 400, "logprobs", None),
        ({"model": MODEL, "prompt": "1", "stop": [""]}, 400, "stop", None),
        ({"model": MODEL, "prompt": "1", "diffusion": {"steps": 0}}, 400, "diffusion.steps", None),
        ({"model": MODEL, "prompt": "1", "diffusion": {"nope": 1}}, 400, "diffusion.nope", None),
    ]
    too_long = "1" * block_model.config.max_position_embeddings
    cases.append(({"model": MODEL, "prompt": too_long}, 400, "prompt", "context_length_exceeded"))
    for body, status, param, code in cases:
        reply = httpx.post(f"{server.url}/v1/completions", json=body)
        assert reply.status_code == status, body
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
        assert error["message"] and error["type"]
    for raw in (b"{not json", b"[1, 2]", b""):
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert reply.status_code == 400 and "error" in reply.json()
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    )
    assert reply.json()["error"]["param"] == "messages.0.content"
    assert httpx.get(f"{server.url}/v1/nowhere").json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "1"}])
    assert client.completions.create(model=MODEL, prompt="1", max_tokens=4).choices[0].text


def test_api_key(start):
    server, client = start(api_key="s3cret")
    assert client.completions.create(model=MODEL, prompt="1", max_tokens=4).choices
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        reply = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_api_key_from_the_environment(start, monkeypatch):
    monkeypatch.setenv("UNMASK_API_KEY", "from-env")
    server, _ = start()
    assert os.environ["UNMASK_API_KEY"] == "from-env"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer from-env"})
    assert ok.status_code == 200
