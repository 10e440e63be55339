"""``unmask serve``: arguments into a ``ServeConfig``, and that config into uvicorn."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmask import cli
from unmask.serve import ServeConfig, server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(monkeypatch):
    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    return seen


def test_model_config_and_overrides(served):
    assert cli.main(["serve", "nano-block", "max_batch_size=2", "--port", "9001"]) == 0
    assert (served[0].model, served[0].max_batch_size, served[0].port) == ("nano-block", 2, 9001)
    config = str(ROOT / "configs" / "serve.yaml")
    assert cli.main(["serve", config, "sampler.gen_length=16", "--api-key", "k"]) == 0
    assert (served[1].model, served[1].sampler.gen_length, served[1].api_key) == (
        "tiny-block",
        16,
        "k",
    )
    assert cli.main(["serve", config, "--model", "micro-full"]) == 0
    assert served[2].model == "micro-full"


def test_bad_settings_name_the_field(served, capsys):
    assert cli.main(["serve", "nano-block", "max_queue=0"]) == 2
    assert "max_queue" in capsys.readouterr().err
    assert cli.main(["serve", "nano-block", "batch_size=3"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert served == []


def test_serve_runs_the_app_with_uvicorn(monkeypatch):
    runs = []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    server.serve(ServeConfig(model="nano-block", host="0.0.0.0", port=1234, device="cpu"))
    ((app, options),) = runs
    assert (options["host"], options["port"]) == ("0.0.0.0", 1234)
    paths = set(app.openapi()["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= paths


def test_a_uniform_noise_model_takes_step_sampler_settings(served):
    args = ["serve", "diffusion-gemma-nano", "step_sampler.max_denoising_steps=8"]
    assert cli.main(args) == 0
    assert (served[0].model, served[0].step_sampler.max_denoising_steps) == (
        "diffusion-gemma-nano",
        8,
    )
