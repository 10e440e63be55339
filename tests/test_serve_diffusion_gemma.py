"""``unmask serve`` over a uniform-noise model (DiffusionGemma): the same routes, decoded by the
step sampler; a seeded request gives the step sampler's (and ``unmask generate``'s) tokens,
streamed text grows a canvas at a time, and the masked-only fields are refused."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gemma_models import char_gemma
from unmask.cli import main
from unmask.models.diffusion_gemma import DiffusionGemma
from unmask.sampling.step_sampler import StepSampler, StepSamplerConfig
from unmask.serve import BackgroundServer, ServeConfig, create_app
from unmask.serve.engine import Engine
from unmask.serve.protocol import APIError, CompletionRequest

MODEL = "gemma"
SAMPLER = StepSamplerConfig(max_new_tokens=16, max_denoising_steps=4, entropy_bound=0.5)


@pytest.fixture(scope="module")
def model() -> DiffusionGemma:
    """Canvas 8, sharpened, EOS ids 16 and 58 (``b`` and ``R``): some rows end early."""
    return char_gemma()


@pytest.fixture
def start(model, monkeypatch):
    """``start(**config) -> (server, client)`` over ``model``; stopped after the test."""
    monkeypatch.delenv("UNMASK_API_KEY", raising=False)
    servers: list[BackgroundServer] = []

    def _start(**fields):
        config = ServeConfig(model=MODEL, step_sampler=SAMPLER, **fields)
        server = BackgroundServer(create_app(config, model)).start()
        servers.append(server)
        return server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)

    yield _start
    for server in servers:
        server.stop()


def _sampled(model, prompt: str, seed: int, config: StepSamplerConfig = SAMPLER) -> str:
    """The step sampler's text for ``prompt``: its tokens up to the first EOS."""
    rollout = StepSampler(config).generate(model, [prompt], seed=seed)
    ids = rollout.completion_ids[0][rollout.completion_mask[0]].tolist()
    eos = set(model.model.generation_config.eos_token_id)
    ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def _length(max_new_tokens: int) -> StepSamplerConfig:
    return dataclasses.replace(SAMPLER, max_new_tokens=max_new_tokens)


def test_completions_and_chat(start, model):
    _, client = start()
    done = client.completions.create(model=MODEL, prompt=["12+3=", "abc"], max_tokens=12, n=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert all(len(c.text) <= 12 and c.finish_reason in ("stop", "length") for c in done.choices)
    assert done.usage.prompt_tokens == 2 * (5 + 3)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    template = "User: hi\nAssistant:"
    assert chat.usage.prompt_tokens == len(template)  # the default template, one char a token
    assert chat.choices[0].message.content == _sampled(model, template, 3, _length(8))


def test_a_seeded_request_gives_the_step_samplers_tokens(start, model):
    _, client = start()

    def text(**fields):
        return client.completions.create(model=MODEL, prompt="12+3=", **fields).choices[0]

    for seed in (0, 5, 11):
        assert text(seed=seed).text == _sampled(model, "12+3=", seed)
    hot = text(seed=5, temperature=1.5, max_tokens=24, extra_body={"diffusion": {"steps": 6}})
    scaled = dataclasses.replace(
        SAMPLER, max_new_tokens=24, max_denoising_steps=2, t_min=0.4 * 1.5, t_max=0.8 * 1.5
    )  # 6 steps over 3 canvases; the schedule scaled by the temperature
    assert hot.text == _sampled(model, "12+3=", 5, scaled)
    finished = {text(seed=s).finish_reason for s in range(6)}
    assert finished == {"stop", "length"}  # an EOS id (16 or 58) ends some rows early


def test_a_seeded_request_equals_unmask_generate(capsys, monkeypatch):
    """The server loads the model by name (``load_model``), as ``unmask generate`` does."""
    monkeypatch.delenv("UNMASK_API_KEY", raising=False)
    small = ["step_sampler.max_new_tokens=16", "step_sampler.max_denoising_steps=3"]
    args = ["generate", "--model", "diffusion-gemma-nano", "--prompt", "12+3=", "--json"]
    assert main([*args, *small]) == 0  # seeds with step_sampler.seed, 0
    generated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]
    steps = StepSamplerConfig(max_new_tokens=16, max_denoising_steps=3)
    config = ServeConfig(model="diffusion-gemma-nano", device="cpu", step_sampler=steps)
    with BackgroundServer(create_app(config)) as server:
        reply = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "diffusion-gemma-nano", "prompt": "12+3=", "seed": 0},
            timeout=60,
        ).json()
    assert reply["choices"][0]["text"] == generated
    assert reply["usage"]["completion_tokens"] <= 16  # step_sampler.max_new_tokens: the default


def test_streamed_deltas_add_up_to_the_text(start, model):
    _, client = start()
    ask = {"model": MODEL, "prompt": "abc", "max_tokens": 20, "seed": 1}
    full = client.completions.create(**ask).choices[0]
    chunks = list(
        client.completions.create(
            **ask, stream=True, extra_body={"diffusion": {"stream_canvas": True}}
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert chunks[-1].choices[0].finish_reason == full.finish_reason
    assert sum(bool(c.choices[0].text) for c in chunks) >= 2  # a finished canvas at a time
    canvases = [c.choices[0].model_extra["canvas"] for c in chunks if c.choices[0].model_extra]
    assert [c["step"] for c in canvases] == list(range(1, len(canvases) + 1))
    for canvas in canvases:  # finished canvases and the current draft; later ones not begun
        begun = 8 * (canvas["block"] + 1)
        assert None not in canvas["tokens"][:begun]
        assert set(canvas["tokens"][begun:]) <= {None}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=2,
        n=2, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    texts, usage = ["", ""], None
    for chunk in chat:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=2, n=2
    )
    assert texts == [c.message.content for c in plain.choices]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"diffusion": {"remasking": "low_confidence"}}, "diffusion.remasking"),
        ({"diffusion": {"threshold": 0.9}}, "diffusion.threshold"),
        ({"diffusion": {"steps_per_block": 2}}, "diffusion.steps_per_block"),
        ({"diffusion": {"block_length": 4}}, "diffusion.block_length"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 0.5}, "top_p"),
        ({"top_k": 5}, "top_k"),
    ],
)
def test_masked_only_fields_get_a_400(start, fields, param):
    server, _ = start()
    for route, body in (
        ("completions", {"prompt": "abc"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        reply = httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, **body, **fields})
        assert reply.status_code == 400, (route, fields)
        error = reply.json()["error"]
        assert error["param"] == param
        assert error["message"].startswith(f"{param} does not apply to this uniform-noise")


def test_fields_that_apply_pass_and_map_onto_the_step_sampler(model):
    engine = Engine(model, ServeConfig(model=MODEL, step_sampler=SAMPLER))
    prompts = engine.encode(["12"], "prompt")

    def job(**fields):
        request = CompletionRequest(model=MODEL, prompt="12", **fields)
        engine.check_fields(request)
        return engine.prepare(prompts, request, request.max_tokens, "prompt")

    assert job().config == dataclasses.replace(SAMPLER, seed=None)  # the configured defaults
    config = job(max_tokens=9, temperature=0.5, diffusion={"steps": 6}).config
    assert (config.max_new_tokens, config.max_denoising_steps) == (16, 3)  # 2 canvases
    assert (config.t_min, config.t_max) == (0.2, 0.4)
    assert job(top_p=1, top_k=-1).config == job().config  # "off" values are fine
    assert job(max_tokens=5).key == job(max_tokens=7).key  # one canvas either way
    assert job(seed=1).key != job(seed=1).key  # every request samples: a seeded one runs alone
    with pytest.raises(APIError) as err:
        job(max_tokens=5000)  # 4096 positions
    assert err.value.code == "context_length_exceeded"


@pytest.fixture
def step_sampler_calls(monkeypatch):
    """Rows of every step sampler call."""
    calls: list[int] = []
    generate = StepSampler.generate

    def recording(self, model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(StepSampler, "generate", recording)
    return calls


def test_concurrent_requests_share_one_step_sampler_call(start, step_sampler_calls):
    server, client = start(max_batch_size=4, batch_wait_ms=5000)  # a full batch goes at once

    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, ["1", "22", "333", "4444"]))
    assert time.monotonic() - started < 5.0
    assert step_sampler_calls == [4]
    assert httpx.get(f"{server.url}/v1/stats").json()["batch_sizes"] == {"4": 1}
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)


def test_a_cancelled_batch_stops_at_its_next_step():
    """Two jobs in one call: the first leaving changes nothing for the second; once both left,
    the call stops at its next step (of 16: no EOS, no adaptive stop)."""
    no_stop = dataclasses.replace(SAMPLER, stability_threshold=None, max_new_tokens=32)
    config = ServeConfig(model=MODEL, step_sampler=no_stop)
    model = char_gemma(eos=())
    request = CompletionRequest(model=MODEL, prompt="12", max_tokens=32)

    def run(cancel_at: dict[int, int]) -> tuple[list, list[list[int]]]:
        engine = Engine(model, config)  # a fresh stream of batch seeds: the same each run
        prompts = engine.encode(["12"], "prompt")
        jobs = [engine.prepare(prompts, request, 32, "prompt") for _ in range(2)]
        steps: list[list[int]] = [[], []]
        for i, job in enumerate(jobs):

            def emit(progress, i=i, job=job):
                steps[i].append(progress.nfe)
                if progress.nfe == cancel_at.get(i):
                    job.cancel()

            job.emit = emit
        return engine.run(jobs), steps

    full, steps = run({})
    assert steps == [list(range(1, 17))] * 2 and all(full)
    partly, steps = run({0: 2})
    assert partly == [[], full[1]]  # the other job's result is what it would have been
    assert (steps[0], len(steps[1])) == ([1, 2], 16)
    assert run({0: 2, 1: 5}) == ([[], []], [[1, 2], [1, 2, 3, 4, 5]])
