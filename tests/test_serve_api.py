"""The server on a loopback port, called with the real ``openai`` client (and raw httpx)."""

from __future__ import annotations

import json
import os
import socket
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


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"n": "2"}, "n"),
        ({"temperature": 1e308}, "temperature"),
        ({"extra_body": {"top_k": "5"}}, "top_k"),
        ({"stream": 1}, "stream"),
        ({"stop": 5}, "stop"),
        ({"extra_body": {"diffusion": {"steps": True}}}, "diffusion.steps"),
    ],
)
def test_fields_are_strict_with_the_openai_client(start, fields, param):
    _, client = start()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="1", **fields)
    assert err.value.body["param"] == param
    assert err.value.body["message"].startswith(param)


def test_fields_are_strict_over_raw_http(start):
    server, _ = start()
    url = f"{server.url}/v1/completions"
    for raw, param in (
        (b'{"model": "nano-block", "prompt": "1", "max_tokens": true}', "max_tokens"),
        (b'{"model": "nano-block", "prompt": "1", "temperature": Infinity}', "temperature"),
        (b'{"model": "nano-block", "prompt": "1", "temperature": 1e400}', "temperature"),
        (b'{"model": "nano-block", "prompt": "1", "temperature": NaN}', "temperature"),
        (b'{"model": "nano-block", "prompt": [1, false]}', "prompt"),
    ):
        reply = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 400, raw
        assert reply.json()["error"]["param"] == param, raw
    reply = httpx.post(url, json={"model": MODEL, "prompt": "1", "max_tokens": "8"})
    message = reply.json()["error"]["message"]
    assert message == 'max_tokens: Input should be a valid integer (got "8")'
    chat = {"model": MODEL, "messages": [{"role": "user", "content": 5}]}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat)
    assert reply.json()["error"]["param"] == "messages.0.content"


@pytest.fixture
def tokenizer_calls(block_model, monkeypatch):
    """Texts the tokenizer was called on; ``gate`` (open by default) holds calls while cleared."""
    calls: list[str] = []
    entered = threading.Event()
    gate = threading.Event()
    gate.set()
    kind = type(block_model.tokenizer)
    tokenize = kind.__call__

    def spy(self, text, *args, **kwargs):
        calls.append(text)
        entered.set()
        assert gate.wait(30), "the test never opened the gate"
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(kind, "__call__", spy)
    yield calls, entered, gate
    gate.set()  # a failed test leaves no tokenizer call waiting


def test_sizes_are_refused_before_tokenising(start, tokenizer_calls):
    calls, _, _ = tokenizer_calls
    _, client = start(max_batch_size=4, max_prompt_chars=1000)
    too_big = [
        ({"prompt": "1" * 1001}, "prompt", "context_length_exceeded"),
        ({"prompt": ["1"] * 1000}, "prompt", None),
        ({"prompt": [[1]] * 1000}, "prompt", None),
        ({"prompt": ["1", "2"], "n": 3}, "n", None),
    ]
    for fields, param, code in too_big:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, max_tokens=4, **fields)
        assert (err.value.body["param"], err.value.body["code"]) == (param, code)
    long_chat = [{"role": "user", "content": "1" * 1000}]  # too long once templated
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long_chat)
    assert err.value.body["code"] == "context_length_exceeded"
    templated = len("User: \nAssistant:") + 1000
    assert f"conversation has {templated} characters" in err.value.body["message"]
    url = f"{client.base_url}completions"
    for prompt in ("1" * 1001, ["1"] * 1000):
        reply = httpx.post(url, json={"model": MODEL, "prompt": prompt})
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, "prompt")
    assert calls == []
    assert client.completions.create(model=MODEL, prompt="1" * 1000, max_tokens=4).choices
    assert calls == ["1" * 1000]


def test_health_answers_while_a_prompt_is_tokenised(start, tokenizer_calls):
    _, entered, gate = tokenizer_calls
    server, client = start()
    gate.clear()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.completions.create, model=MODEL, prompt="12", max_tokens=4)
        assert entered.wait(30)
        health = httpx.get(f"{server.url}/health", timeout=20)
        stats = httpx.get(f"{server.url}/v1/stats", timeout=20).json()
        assert not pending.done()  # the tokenizer was still busy
        gate.set()
        assert pending.result().choices[0].finish_reason == "length"
    assert health.json() == {"status": "ok"}
    assert stats["queued"] == 0  # not yet queued: still tokenising


@pytest.fixture
def denoising_steps(monkeypatch):
    """Steps each sampler call ran; ``hold`` (open by default) holds a call after each step."""
    runs: list[int] = []
    stepped = threading.Event()
    hold = threading.Event()
    hold.set()
    generate = Sampler.generate

    def counting(self, model, prompts, *args, on_step, **kwargs):
        runs.append(0)
        run = len(runs) - 1

        def step(view):
            runs[run] += 1
            stepped.set()
            assert hold.wait(30), "the test never released the sampler"
            on_step(view)

        return generate(self, model, prompts, *args, on_step=step, **kwargs)

    monkeypatch.setattr(Sampler, "generate", counting)
    yield runs, stepped, hold
    hold.set()  # a failed test leaves no sampler call waiting


def _wait_stats(server: BackgroundServer, field: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v1/stats").json()[field] != value:
        assert time.monotonic() < deadline, f"stats {field} never reached {value}"
        time.sleep(0.01)


LONG_JOB = {"model": MODEL, "prompt": "12", "max_tokens": 32}  # 32 steps, one token each


def test_a_dropped_stream_stops_its_job_at_the_next_step(start, denoising_steps):
    runs, stepped, hold = denoising_steps
    server, client = start(batch_wait_ms=0, sampler=SamplerConfig(stop_at_eos=False))
    hold.clear()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={**LONG_JOB, "stream": True}):
            assert stepped.wait(30)  # the job ran one step and is held there
            with http.stream("POST", "/v1/completions", json={**LONG_JOB, "stream": True}):
                _wait_stats(server, "queued", 1)  # a second stream waits behind it
        _wait_stats(server, "cancelled", 2)
        assert httpx.get(f"{server.url}/v1/stats").json()["queued"] == 0
    hold.set()
    after = client.completions.create(**LONG_JOB)
    assert after.choices[0].finish_reason == "length"
    assert runs == [1, 32]  # the dropped job stopped after its step; the queued one never ran


def test_a_client_leaving_a_plain_request_stops_its_job(start, denoising_steps):
    runs, stepped, hold = denoising_steps
    server, client = start(batch_wait_ms=0, sampler=SamplerConfig(stop_at_eos=False))
    hold.clear()
    body = json.dumps(LONG_JOB).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=30) as raw:
        raw.sendall(head.encode() + body)
        assert stepped.wait(30)
    _wait_stats(server, "cancelled", 1)
    hold.set()
    assert client.completions.create(**LONG_JOB).choices[0].finish_reason == "length"
    assert runs == [1, 32]
