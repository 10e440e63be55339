"""A user's mistake is one line on stderr and exit status 2; a bug keeps its traceback, and
``--debug`` (or ``UNMASK_DEBUG=1``) shows every traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from repo_root import CONFIGS, REPO
from unmask.cli import main
from unmask.config import ConfigError, load_config
from unmask.errors import UserError
from unmask.models.diffusion_lm import DiffusionLM, WeightsError
from unmask.train.sft import SFTConfig

SFT = str(CONFIGS / "sft_sudoku_tiny.yaml")
COMMANDS = {  # each command that writes, with its recipe and the field that says where
    "sft": [SFT, "output_dir={}"],
    "rl": [str(CONFIGS / "rl_sudoku_tiny.yaml"), "output_dir={}"],
    "eval": [str(CONFIGS / "eval_sudoku_tiny.yaml"), "output_dir={}"],
    "trace": [str(CONFIGS / "trace_sudoku_tiny.yaml"), "output={}/page.html"],
    "quickstart": ["--output-dir", "{}"],
    "convert": ["nano-full", "{}"],
}


@pytest.fixture
def no_model_loads(monkeypatch):
    """The output check comes first: loading a model would be a failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    monkeypatch.setattr(DiffusionLM, "from_pretrained", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _run(command: str, target: str) -> int:
    return main([command, *(a.format(target) for a in COMMANDS[command])])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_output_path_under_a_file_is_one_line(tmp_path, capsys, no_model_loads, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _run(command, str(blocker / "sub")) == 2
    line = _error_line(capsys)
    assert line.startswith(f"unmask {command}: error: ")
    assert line.endswith(f"/sub{'/page.html' if command == 'trace' else ''}: {blocker} is a file, "
                         "not a folder")  # fmt: skip


@pytest.mark.parametrize("command", ["sft", "rl", "eval", "quickstart"])
def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, no_model_loads, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _run(command, str(blocker)) == 2
    assert _error_line(capsys).endswith(f"output_dir {blocker} is a file, not a folder")


def test_an_output_dir_that_is_not_writable_is_one_line(
    tmp_path, capsys, monkeypatch, no_model_loads
):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: deny it this folder the way access(2) would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: p != locked and access(p, mode))
    try:
        assert _run("sft", str(locked / "run")) == 2
    finally:
        locked.chmod(0o755)
    assert f"{locked} is not writable" in _error_line(capsys)


def test_a_trace_page_that_is_a_folder_is_one_line(tmp_path, capsys, no_model_loads):
    assert main(["trace", str(CONFIGS / "trace_sudoku_tiny.yaml"), f"output={tmp_path}"]) == 2
    assert _error_line(capsys).endswith(f"output {tmp_path} is a folder, not a file")


def _damage(tmp_path, how: str):
    from unmask.models import from_preset

    folder = tmp_path / how
    from_preset("nano-full").save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:  # a flipped byte in the JSON header
        data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return folder, weights


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_corrupted_safetensors_file_is_named(tmp_path, capsys, how):
    folder, weights = _damage(tmp_path, how)
    capsys.readouterr()  # saving shows a progress bar
    with pytest.raises(WeightsError, match=f"{weights}: cannot read the weights"):
        DiffusionLM.from_pretrained(folder, device="cpu")
    assert main(["generate", "--model", str(folder), "--prompt", "1"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"unmask generate: error: {weights}: cannot read the weights")
    assert "truncated or corrupted" in line


def test_an_unknown_key_names_the_override_or_the_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: nano-block\nmax_stepz: 3\n")
    expected = "unknown field 'max_stepz' of SFTConfig (did you mean max_steps?)"
    with pytest.raises(ConfigError, match=rf"^{recipe}: unknown field 'max_stepz'") as info:
        load_config(SFTConfig, recipe)
    assert expected in str(info.value)
    assert main(["sft", SFT, "max_stepz=3"]) == 2
    assert _error_line(capsys) == f"unmask sft: error: override max_stepz=3: {expected}"
    assert main(["sft", SFT, "eval.sampler.gen_lenght=3"]) == 2
    assert "override eval.sampler.gen_lenght=3: unknown field 'eval.sampler.gen_lenght' of " \
        "SamplerConfig (did you mean eval.sampler.gen_length?)" in _error_line(capsys)  # fmt: skip


def test_bad_values_name_their_source(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: nano-block\nmax_steps: 'ten'\nlr: [1,\n")
    assert main(["sft", SFT, "max_steps=ten"]) == 2
    assert _error_line(capsys).endswith("override max_steps=ten: max_steps must be an integer, "
                                        "got 'ten'")  # fmt: skip
    assert main(["sft", SFT, "lr=[1,"]) == 2
    assert "override lr=[1,: not valid YAML at line 1, column 4" in _error_line(capsys)
    assert main(["sft", str(recipe)]) == 2
    assert f"error: {recipe}: not valid YAML at line 4, column 1" in _error_line(capsys)
    recipe.write_text("model: nano-block\nmax_steps: 'ten'\n")
    assert main(["sft", str(recipe), "lr=0.1"]) == 2
    assert f"error: {recipe}: max_steps must be an integer" in _error_line(capsys)


def test_a_value_error_is_one_line_with_a_hint(capsys):
    assert main(["eval", "--model", "nano-block", "task=chess"]) == 2
    line = _error_line(capsys)
    assert "unknown task 'chess'" in line and line.endswith("(run with --debug for the traceback)")


def test_debug_shows_the_traceback(tmp_path, monkeypatch, no_model_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = ["sft", SFT, f"output_dir={blocker}"]
    for argv in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(UserError, match="is a file, not a folder"):
            main(argv)
    monkeypatch.setenv("UNMASK_DEBUG", "1")
    with pytest.raises(UserError):
        main(args)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import unmask.train.sft

    def broken(config):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(unmask.train.sft, "train_sft", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["sft", SFT, f"output_dir={tmp_path / 'run'}"])


def _unmask(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("UNMASK_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "unmask.cli", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "a_file").write_text("")
    done = _unmask(tmp_path, "sft", SFT, "output_dir=a_file/run")
    assert done.returncode == 2
    expected = "unmask sft: error: output_dir a_file/run: a_file is a file, not a folder\n"
    assert done.stderr == expected
    debug = _unmask(tmp_path, "--debug", "sft", SFT, "output_dir=a_file/run")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("unmask.errors.UserError: output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


def test_overrides_may_follow_options(monkeypatch):
    """`--seed 2 progress=false` works as `progress=false --seed 2` does; a stray word does not."""
    import unmask.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_quickstart", lambda args: seen.append(args) or 0)
    assert cli.main(["quickstart", "rl.lr=1e-4", "--seed", "2", "progress=false"]) == 0
    assert (seen[0].config, seen[0].overrides, seen[0].seed) == (
        None, ["rl.lr=1e-4", "progress=false"], 2,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main(["quickstart", "a.yaml", "--seed", "2", "stray"])
