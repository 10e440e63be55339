"""Command line: ``unmask [--debug] COMMAND [CONFIG.yaml] [key.sub=value ...]``.

Every command reads a typed config (a YAML recipe plus dotted overrides) and runs in this one
process. A user's mistake (config, path, data, checkpoint, model) exits with status 2 and one
line naming the field or file; a bug keeps its traceback. ``--debug`` (or ``UNMASK_DEBUG=1``)
shows the traceback of every error (docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.config import ConfigError, load_config
from unmask.errors import UserError
from unmask.sampling.sampler import SamplerConfig
from unmask.sampling.step_sampler import StepSamplerConfig

USER_ERROR = 2  # the exit status of a user's mistake (argparse's for a bad command line)
DEBUG_HINT = "(run with --debug for the traceback)"
# OSErrors about a path: whatever their cause, the path and the reason are the whole story.
PATH_ERRORS = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError
)  # fmt: skip


@dataclass
class GenerateConfig:
    """``unmask generate``: sample completions and show when each token was unmasked.

    ``step_sampler`` replaces ``sampler`` for a uniform-noise model (DiffusionGemma)."""

    model: str = "tiny-block"
    prompts: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "auto"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    step_sampler: StepSamplerConfig = field(default_factory=StepSamplerConfig)


def _generate(args: argparse.Namespace) -> int:
    from unmask.models.loading import load_model
    from unmask.sampling.for_model import sampler_for

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={json.dumps(args.model)}")
    config = load_config(GenerateConfig, args.config, overrides)
    prompts = list(args.prompt or []) or config.prompts
    if not prompts:
        raise ConfigError("give at least one --prompt (or prompts: in the config)")
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    model.eval()
    rollout = sampler_for(model, config.sampler, config.step_sampler).generate(model, prompts)
    tokenizer = model.tokenizer
    assert tokenizer is not None
    texts = rollout.completion_texts(tokenizer)
    for row, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        keep = rollout.completion_mask[row]
        ids = rollout.completion_ids[row][keep].tolist()
        steps = rollout.steps[row][keep].tolist()
        if args.json:
            record = {"prompt": prompt, "completion": text, "token_ids": ids, "steps": steps}
            print(json.dumps(record))
            continue
        print(f"prompt:     {prompt!r}")
        print(f"completion: {text!r}")
        if args.trace:
            print(render_trace(tokenizer.convert_ids_to_tokens(ids), steps))
        print(f"steps: {int(rollout.num_steps[row])}  tokens: {len(ids)}\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from unmask.eval.evaluate import EvalConfig, run_eval, run_eval_sweep

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={json.dumps(args.model)}")
    config = load_config(EvalConfig, args.config, overrides)
    if config.output_dir is not None:
        check_output_dir(config.output_dir)
    if config.sweep.enabled:
        from unmask.eval.sweep import print_sweep

        rows = run_eval_sweep(config)
        print(json.dumps(rows, indent=2))
        print_sweep(rows, f"{config.task}/{config.split}: accuracy vs NFE ({config.model})")
        print(f"sweep table and plot in {config.output_dir}", file=sys.stderr)
        return 0
    summary = run_eval(config)
    low, high = summary["accuracy_ci95"]
    print(json.dumps(summary, indent=2))
    print(
        f"accuracy {summary['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}) on "
        f"{summary['num_samples']} samples, mean NFE {summary['mean_nfe']:.1f}, "
        f"{summary['tokens_per_step']:.2f} tokens/step",
        file=sys.stderr,
    )
    return 0


def _trace(args: argparse.Namespace) -> int:
    from unmask.viz.trace import TraceConfig, run_trace

    overrides = list(args.overrides)
    for key, value in (("model", args.model), ("output", args.output)):
        if value:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.prompt:
        overrides.append(f"prompts={json.dumps(args.prompt)}")
    config = load_config(TraceConfig, args.config, overrides)
    check_output_file(config.output)
    path = run_trace(config)
    print(f"trace page: {path}")
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """Dotted overrides plus what ``--model`` and ``--resume`` say."""
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={json.dumps(args.model)}")
    if args.resume and "=" in args.resume:  # `--resume key=value`: argparse took an override
        overrides.append(args.resume)
        args.resume = "latest"
    if args.resume:
        overrides.append(f"resume={json.dumps(args.resume)}")
    return overrides


def _sft(args: argparse.Namespace) -> int:
    from unmask.train.sft import SFTConfig, train_sft

    return _train(SFTConfig, train_sft, args)


def _rl(args: argparse.Namespace) -> int:
    from unmask.train.rl import train_rl
    from unmask.train.rl_config import RLConfig

    return _train(RLConfig, train_rl, args)


def _train(config_class: type[Any], train: Callable[[Any], Path], args: argparse.Namespace) -> int:
    """A trainer's command: config, a folder that will not overwrite a run, the run."""
    config = load_config(config_class, args.config, _train_overrides(args))
    check_output_dir(config.output_dir)
    print(f"final model: {train(config)}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from unmask.quickstart import QuickstartConfig, run_quickstart

    overrides = list(args.overrides)
    for name in ("task", "objective", "minutes", "seed", "output_dir"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={json.dumps(value)}")
    config = load_config(QuickstartConfig, args.config, overrides)
    check_output_dir(config.output_dir)
    run_quickstart(config)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from unmask.models.export import convert_checkpoint

    overrides = {
        key: value
        for key, value in (("block_size", args.block_size), ("mask_token_id", args.mask_token_id))
        if value is not None
    }
    check_output_dir(args.destination, "destination")
    path = convert_checkpoint(args.source, args.destination, dtype=args.dtype, **overrides)
    print(f"converted model: {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from unmask.serve.server import serve
    except ImportError as err:
        print(f"unmask serve needs FastAPI and uvicorn ({err}): pip install 'unmask[serve]'",
              file=sys.stderr)  # fmt: skip
        return USER_ERROR
    from unmask.serve.config import ServeConfig

    overrides = list(args.overrides)
    path = args.config
    if path is not None and not path.endswith((".yaml", ".yml")):  # `unmask serve MODEL`
        overrides.insert(0, f"model={json.dumps(path)}")
        path = None
    for key, value in (("model", args.model), ("host", args.host), ("port", args.port),
                       ("api_key", args.api_key)):  # fmt: skip
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    serve(load_config(ServeConfig, path, overrides))
    return 0


def check_output_dir(path: str, name: str = "output_dir") -> None:
    """Refuse, before any model loads, a folder that cannot be created or written to."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{name} {path} is a file, not a folder")
    _check_writable_parent(folder, f"{name} {path}")


def check_output_file(path: str, name: str = "output") -> None:
    """Refuse, before any model loads, a file path that cannot be written."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{name} {path} is a folder, not a file")
    _check_writable_parent(file.parent, f"{name} {path}")


def _check_writable_parent(folder: Path, label: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a writable folder."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{label}: {existing} is not writable (permission denied)")


def render_trace(tokens: Sequence[str], steps: Sequence[int]) -> str:
    """One line per denoising step: the tokens it unmasked, at their positions."""
    lines = []
    for step in sorted(set(steps)):
        cells = [
            repr(t)[1:-1] if s == step else "·" * max(1, len(repr(t)) - 2)
            for t, s in zip(tokens, steps, strict=True)
        ]
        lines.append(f"  step {step:>3}: {' '.join(cells)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``unmask`` argument parser: one subcommand per job, each taking a YAML config."""
    parser = argparse.ArgumentParser(
        prog="unmask", description="RL post-training for masked diffusion language models"
    )
    debug_help = "show the full traceback of any error (or set UNMASK_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="sample from a model and show the trace")
    gen.add_argument("config", nargs="?", help="YAML config (optional)")
    gen.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.gen_length=32")
    gen.add_argument("--model", help="preset name (e.g. tiny-block), local folder or hub name")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.add_argument("--trace", action="store_true", help="show which step unmasked each token")
    gen.add_argument("--json", action="store_true", help="print one JSON line per completion")
    gen.set_defaults(run=_generate)
    ev = commands.add_parser("eval", help="evaluate a model on a task split")
    ev.add_argument("config", nargs="?", help="YAML config (see configs/eval_sudoku_tiny.yaml)")
    ev.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. limit=64 sweep.threshold=[0.5,0.9]"
    )
    ev.add_argument("--model", help="preset name, local folder or hub name")
    ev.set_defaults(run=_eval)
    tr = commands.add_parser("trace", help="write an HTML page replaying rollouts step by step")
    tr.add_argument("config", nargs="?", help="YAML config (see configs/trace_sudoku_tiny.yaml)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task=sudoku index=3")
    tr.add_argument("--model", help="preset name, local folder or hub name")
    tr.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    tr.add_argument("--output", help="where to write the page (default trace.html)")
    tr.set_defaults(run=_trace)
    trainers = (
        ("sft", "masked-diffusion supervised fine-tuning", "configs/sft_sudoku_tiny.yaml", _sft),
        ("rl", "RL post-training (objective=tracerl, agrpo, diffu_grpo, coupled, random_mask, "
         "elbo, spg, wd1)", "configs/rl_sudoku_tiny.yaml", _rl),
    )  # fmt: skip
    for name, help_text, example, run in trainers:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", nargs="?", help=f"YAML config (see {example})")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_steps=200")
        sub.add_argument("--model", help="preset name, local folder or hub name to start from")
        sub.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            help="continue from the latest checkpoint in output_dir, or from the folder given",
        )
        sub.set_defaults(run=run)
    from unmask.quickstart import options_help

    qs = commands.add_parser(
        "quickstart",
        help="the main CPU job: SFT a tiny model, evaluate, RL, evaluate again",
        epilog=options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qs.add_argument("config", nargs="?", help="YAML config (optional; see docs/quickstart.md)")
    qs.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.lr=1e-4")
    qs.add_argument("--task", help="sudoku (default) or countdown")
    qs.add_argument("--objective", help="tracerl (default), agrpo, diffu_grpo, coupled, ...")
    qs.add_argument("--minutes", type=float, help="optional wall-clock cap of the whole run")
    qs.add_argument("--seed", type=int, help="seeds SFT, RL and the evaluations (default 0)")
    qs.add_argument("--output-dir", dest="output_dir", help="run folder (runs/quickstart)")
    qs.set_defaults(run=_quickstart)
    srv = commands.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serve.md)")
    srv.add_argument("config", nargs="?", help="a model (preset, folder, hub name) or YAML config")
    srv.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_batch_size=16")
    srv.add_argument("--model", help="preset name, local folder or hub name")
    srv.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default 8000)")
    srv.add_argument("--api-key", dest="api_key", help="require this key (or set UNMASK_API_KEY)")
    srv.set_defaults(run=_serve)
    conv = commands.add_parser(
        "convert", help="write a LLaDA/MMaDA/Dream/DiffuCoder/SDAR/TraDo checkpoint natively"
    )
    conv.add_argument(
        "source", help="a family checkpoint (local folder or hub name), or a LoRA folder to merge"
    )
    conv.add_argument("destination", help="new folder for the native checkpoint")
    conv.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep each tensor's stored dtype)",
    )
    conv.add_argument("--block-size", type=int, help="override the diffusion block size")
    conv.add_argument("--mask-token-id", type=int, help="override the mask token id")
    conv.set_defaults(run=_convert, config=None)
    for command in commands.choices.values():  # `unmask sft x.yaml --debug` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
        )
    return parser


def user_message(err: BaseException) -> str | None:
    """One line for a user's mistake; None for what looks like a bug (it keeps its traceback).

    ValueError stays a mistake: data and config checks across the package raise it with a
    message naming the file and field. So does an OSError (a path, the disk, the network).
    Both get a hint, as they may also come from deep inside a library.
    """
    if isinstance(err, UserError):
        message = str(err)
    elif isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror}"
    elif isinstance(err, PATH_ERRORS):
        message = str(err)
    elif isinstance(err, (ValueError, OSError)):
        message = f"{err} {DEBUG_HINT}"
    else:
        return None
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _debug(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get("UNMASK_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``unmask`` command line; returns the exit code (2 for a user's mistake)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends the positionals at the first option, so `--seed 1 lr=1e-4` leaves the
    # override over; key=value words anywhere are overrides, anything else is an error.
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "config", None) is not None and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        return int(args.run(args))
    except Exception as err:
        message = None if _debug(args) else user_message(err)
        if message is None:
            raise
        print(f"unmask {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
