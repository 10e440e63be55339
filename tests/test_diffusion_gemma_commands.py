"""DiffusionGemma as a ``--model`` like any other: one loader picks the class from the name or
config, and ``unmask generate`` and ``unmask eval`` sample it with its own sampler."""

from __future__ import annotations

import json

from unmask.cli import main
from unmask.eval.evaluate import EvalConfig, run_eval
from unmask.models.diffusion_gemma import DiffusionGemma, gemma_preset
from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.loading import load_model
from unmask.sampling.step_sampler import StepSamplerConfig

SMALL = ["step_sampler.max_new_tokens=16", "step_sampler.max_denoising_steps=3"]


def test_loader_dispatches_on_preset_name_and_saved_config(tmp_path):
    assert isinstance(load_model("nano-block", device="cpu"), DiffusionLM)
    assert load_model("nano-block", device="cpu").noise == "mask"
    gemma = load_model("diffusion-gemma-nano", device="cpu")
    assert isinstance(gemma, DiffusionGemma) and gemma.noise == "uniform"
    gemma_preset("diffusion-gemma-nano", canvas_length=8).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert isinstance(loaded, DiffusionGemma) and loaded.canvas_length == 8


def test_generate_samples_a_diffusion_gemma(capsys):
    args = ["generate", "--model", "diffusion-gemma-nano", "--prompt", "12+3=", "--json", *SMALL]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == "12+3=" and len(record["token_ids"]) == len(record["steps"])
    assert max(record["steps"]) < 3  # each canvas's output comes from its last step


def test_eval_samples_with_the_step_sampler(tmp_path):
    config = EvalConfig(
        model="diffusion-gemma-nano", limit=4, batch_size=4, output_dir=str(tmp_path),
        step_sampler=StepSamplerConfig(max_new_tokens=16, max_denoising_steps=3),
    )  # fmt: skip
    summary = run_eval(config, progress=False)
    assert summary["num_samples"] == 4 and 0 < summary["mean_nfe"] <= 3
    assert summary["sampler"]["entropy_bound"] == 0.1  # the step sampler's settings
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 4
