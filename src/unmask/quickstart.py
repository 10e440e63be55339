"""``unmask quickstart``: the main CPU job. SFT a tiny model, evaluate, RL, evaluate again.

Stages write into their own folders under ``output_dir`` and a finished stage is skipped, so
running the same command again after an interruption continues where it stopped (the trainers
resume from their last checkpoint). The SFT model is also cached by recipe under
``cache_dir``, so a second quickstart with another objective or output folder starts from the
same model without training it again.

The recipes (:data:`RECIPES`) are ordinary :class:`~unmask.train.sft.SFTConfig` and
:class:`~unmask.train.rl_config.RLConfig` fields; any of them can be overridden with ``sft.KEY=...``
and ``rl.KEY=...``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Any

import yaml

from unmask.config import ConfigError, from_dict, to_dict
from unmask.integrity import publish_folder
from unmask.metrics import METRICS_FILE, read_metrics
from unmask.sampling.sampler import SamplerConfig
from unmask.tasks.registry import TASKS
from unmask.train.pace import clock, time_cap_message
from unmask.train.rl_config import RLConfig
from unmask.train.sft import SFTConfig

FINAL = "final"
RESULTS_JSON = "results.json"
RESULTS_PNG = "results.png"


@dataclass(frozen=True)
class Recipe:
    """A task's quickstart: the starting model, task options, and the SFT and RL fields."""

    model: str
    task_options: Mapping[str, Any]
    gen_length: int
    sft: Mapping[str, Any]
    rl: Mapping[str, Any]
    # For the trace objectives (TraceRL, AGRPO): whether to score the remasking rule's choice
    # of positions too ("exact", the library default) or only the tokens ("ignore").
    selection: str = "exact"


_RL = {"num_prompts": 8, "num_generations": 8, "lr": 3e-4, "warmup_steps": 10}
RECIPES: dict[str, Recipe] = {
    "sudoku": Recipe(
        model="nano-block",
        task_options={"blanks": 10, "num_test": 512},
        # The answer is 16 digits: decoding only those skips the EOS block (4 of the 20
        # columns; the digits' blocks never attend to it), a step about 15% cheaper, which
        # buys RL 100 more steps inside the 10 minutes.
        gen_length=16,
        # SFT to convergence on puzzles of 1 to 6 blanks, so every seed starts alike: the easy
        # ones teach the rules (on 6 blanks alone some seeds sat on a plateau for 500+ steps)
        # and t_min 0.2 bounds the ELBO's 1/t weight at 5 (at 1e-3 a block with one hidden
        # token could weigh 1000x; that noise set when each seed found the rules: held-out
        # 0.48-0.85 across seeds, 0.89-0.94 with 0.2). RL and both evaluations use 10-blank
        # puzzles, which the converged model solves a third of: the room RL has to show.
        sft={
            "max_steps": 600,
            "batch_size": 64,
            "lr": 3e-3,
            "warmup_steps": 50,
            "t_min": 0.2,
            "data": {"options": {"blanks": [1, 6]}},
        },
        # lr 5e-4 learns faster than 3e-4, but only without the exact selection term: with it
        # the training reward collapsed for ~150 steps at 5e-4 (benchmarks/RESULTS.md). Seed 0
        # gained +10 sampled with the earlier 600 steps at 3e-4 (exact), +15 with this.
        rl={**_RL, "max_steps": 700, "lr": 5e-4},
        selection="ignore",
    ),
    "countdown": Recipe(
        model="micro-block",
        task_options={"num_test": 512},
        gen_length=16,  # the longest 3-number equation is 13 characters + EOS
        sft={"max_steps": 3000, "batch_size": 64, "lr": 3e-3, "warmup_steps": 50},
        rl={"max_steps": 250, **_RL},
    ),
}
# Every QuickstartConfig field, as `unmask quickstart --help` and docs/quickstart.md list them.
OPTIONS: dict[str, str] = {
    "task": "sudoku (default) or countdown; picks the recipe",
    "objective": "tracerl (default) or any RL objective (docs/objectives.md)",
    "model": "a preset, folder or hub name to start SFT from (default: the recipe's)",
    "output_dir": "the run folder (default runs/quickstart)",
    "cache_dir": "where finished SFT models are kept by recipe (default "
    "~/.cache/unmask/quickstart, or $XDG_CACHE_HOME/unmask/quickstart)",
    "minutes": "optional wall-clock cap of the whole run; RL stops early to fit it and the "
    "results say so (default: none, the recipe's steps)",
    "seed": "seeds SFT, RL and the evaluations (default 0)",
    "eval_limit": "held-out rows evaluated before and after RL (default 512)",
    "eval_batch_size": "rows sampled at once in the evaluations (default 256)",
    "task_options": "the task's options, e.g. task_options.blanks=8",
    "sft": "any `unmask sft` field, e.g. sft.max_steps=500 (docs/sft.md)",
    "rl": "any `unmask rl` field, e.g. rl.lr=1e-4 (docs/rl.md)",
    "progress": "progress bars and the plan's timing lines (default true)",
}


def options_help() -> str:
    """The ``--help`` epilog: every option as ``key=value``."""
    width = max(map(len, OPTIONS))
    lines = [f"  {name:<{width}}  {text}" for name, text in OPTIONS.items()]
    return "options (key=value, or in the YAML config):\n" + "\n".join(lines)


@dataclass
class QuickstartConfig:
    """``unmask quickstart``: what to run, and where; the recipe fills in the rest.

    The recipe fixes the steps of both trainers. ``minutes``, when set, caps the wall time of
    the whole run: RL then stops early (saving its model) when the remaining time would not
    leave room for the final evaluation, and the results say so. ``sft`` and ``rl`` hold field
    overrides of the recipe's trainer configs (``rl.lr=1e-4``). Every field: :data:`OPTIONS`.
    """

    task: str = "sudoku"
    objective: str = "tracerl"
    model: str | None = None  # None: the recipe's preset
    output_dir: str = "runs/quickstart"
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/unmask/quickstart (~/.cache/...)
    minutes: float | None = None  # None: no time cap, the recipe's steps
    seed: int = 0
    eval_limit: int = 512
    eval_batch_size: int = 256
    task_options: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    rl: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in RECIPES:
            raise ValueError(f"task must be one of {sorted(RECIPES)}, got {self.task!r}")
        from unmask.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0 (or null for no budget), got {self.minutes}")
        if self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1, got {self.eval_limit}")


@dataclass
class Plan:
    """The resolved configs of every stage."""

    sft: SFTConfig
    rl: RLConfig
    eval_samplers: dict[str, SamplerConfig]
    task_options: dict[str, Any]
    sft_cache: Path


def plan(config: QuickstartConfig) -> Plan:
    """Resolve the recipe and the user's overrides into the trainers' configs."""
    recipe = RECIPES[config.task]
    out = Path(config.output_dir)
    task_options = {**recipe.task_options, **config.task_options}
    data = {"task": config.task, "options": task_options, "split": "train"}
    model = config.model or recipe.model
    sft = _build(SFTConfig, "sft", _merge({
        "model": model, "seed": config.seed, "data": data, "save_every": 50, "log_every": 10,
        "progress": config.progress,
    }, recipe.sft), config.sft)  # fmt: skip
    options = {"selection": recipe.selection} if _traces(config.objective) else {}
    rl = _build(RLConfig, "rl", {
        "objective": config.objective, "seed": config.seed, "data": data, "save_every": 10,
        "progress": config.progress,
        "sampler": {"gen_length": recipe.gen_length, "temperature": 1.0},
        "objective_options": options, **recipe.rl,
    }, config.rl)  # fmt: skip
    # The cache key is what shapes the model, not where or how the run reports.
    shown = replace(sft, output_dir="", progress=True, plots=True, report_to=[])
    key = json.dumps(to_dict(shown), sort_keys=True)
    cache = Path(config.cache_dir) if config.cache_dir else _default_cache()
    sft_cache = cache / f"sft-{config.task}-{sha256(key.encode()).hexdigest()[:12]}"
    return Plan(
        sft=replace(sft, output_dir=str(out / "sft")),
        rl=replace(rl, model=str(out / "sft" / FINAL), output_dir=str(out / "rl")),
        eval_samplers={
            "sampled": replace(rl.sampler, return_logprobs=False, seed=None),
            "greedy": replace(rl.sampler, temperature=0.0, top_k=0, top_p=1.0, seed=None),
        },
        task_options=task_options,
        sft_cache=sft_cache,
    )


def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run every stage not yet done; returns (and writes) the before/after results."""
    from unmask.train.rl import RLTrainer
    from unmask.train.sft import SFTTrainer

    began = time.monotonic()
    p = plan(config)
    out = Path(config.output_dir)
    _check_same_run(out, config)
    show = _Stages(config, began)
    show.plan(p)

    sft_final = out / "sft" / FINAL
    show.stage(1, f"SFT {p.sft.model} on {config.task} ({p.sft.max_steps} steps)")
    if is_model(sft_final):
        show.note(f"done already: {sft_final}")
    elif is_model(p.sft_cache):
        copy_model(p.sft_cache, sft_final)
        show.note(f"reused the cached SFT model {p.sft_cache}")
    else:
        SFTTrainer(_resuming(p.sft)).train()
        copy_model(sft_final, p.sft_cache)

    show.stage(2, f"evaluate the SFT model on {config.eval_limit} held-out rows")
    first_eval = time.monotonic()
    before = _evaluate(config, p, sft_final, out / "eval_sft")
    eval_s = time.monotonic() - first_eval

    rl_final = out / "rl" / FINAL
    show.stage(3, f"RL ({config.objective}) from the SFT model")
    if is_model(rl_final):
        show.note(f"done already: {rl_final}")
    else:
        rl = _resuming(p.rl)
        if config.minutes is not None:
            left = config.minutes * 60 - (time.monotonic() - began) - 1.2 * eval_s
            rl = replace(rl, max_time_s=max(left, 0.0))
        RLTrainer(rl).train()

    show.stage(4, "evaluate the RL model on the same rows")
    after = _evaluate(config, p, rl_final, out / "eval_rl")

    results = compare(before, after, TASKS[config.task].accuracy_reward)
    rl_steps = _last_step(out / "rl")
    cut = rl_steps is not None and rl_steps < p.rl.max_steps
    results.update(
        task=config.task,
        objective=config.objective,
        rl_steps=rl_steps,
        rl_max_steps=p.rl.max_steps,
        stopped=time_cap_message("RL", rl_steps, p.rl.max_steps) if cut else None,
        wall_s=time.monotonic() - began,
    )
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    _table_png(results, out / RESULTS_PNG)
    show.table(results)
    return results


# -- results ---------------------------------------------------------------------------------
def compare(
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    accuracy_reward: str = "",
) -> dict[str, Any]:
    """Before/after rows per evaluation mode: accuracy (Wilson interval), each other reward's
    mean (normal interval), then mean NFE. ``before``/``after`` map a mode to its evaluation
    summary plus ``samples`` (each reward's per-sample values). ``significant``: the headline
    (first mode's) accuracy intervals do not overlap."""
    rows: list[dict[str, Any]] = []
    for mode in before:
        b, a = before[mode], after[mode]
        rows.append({"metric": f"accuracy ({mode})", "before": b["accuracy"],
                     "before_ci95": b["accuracy_ci95"], "after": a["accuracy"],
                     "after_ci95": a["accuracy_ci95"]})  # fmt: skip
        for name, values in b["samples"].items():
            if name != accuracy_reward and name in a["samples"]:
                rows.append({"metric": f"{name} ({mode})", "before": _mean(values),
                             "before_ci95": _normal_ci(values), "after": _mean(a["samples"][name]),
                             "after_ci95": _normal_ci(a["samples"][name])})  # fmt: skip
    for mode in before:
        rows.append({"metric": f"mean NFE ({mode})", "before": before[mode]["mean_nfe"],
                     "after": after[mode]["mean_nfe"]})  # fmt: skip
    for row in rows:
        row["change"] = row["after"] - row["before"]
    head = next(iter(before))
    (b_low, b_high), (a_low, a_high) = before[head]["accuracy_ci95"], after[head]["accuracy_ci95"]
    return {
        "rows": rows,
        "headline": head,
        "num_samples": after[head]["num_samples"],
        "accuracy_gain": after[head]["accuracy"] - before[head]["accuracy"],
        "significant": max(b_low, a_low) > min(b_high, a_high),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _normal_ci(values: list[float]) -> list[float]:
    """95% normal-approximation interval of a mean."""
    n, mean = len(values), _mean(values)
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    half = 1.96 * math.sqrt(var / n)
    return [mean - half, mean + half]


def _per_sample(eval_dir: Path) -> dict[str, list[float]]:
    """Each reward's per-sample values from an evaluation's generations.jsonl (unscored
    samples count as 0, as they do in accuracy)."""
    values: dict[str, list[float]] = {}
    with (eval_dir / "generations.jsonl").open() as f:
        for line in f:
            for name, value in json.loads(line)["rewards"].items():
                values.setdefault(name, []).append(0.0 if value is None else float(value))
    return values


def _fmt(value: float, ci: list[float] | None) -> str:
    text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return text if ci is None else f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _title(results: Mapping[str, Any]) -> str:
    """``sudoku: tracerl, RL 600 steps``, or the time cap's words when it cut RL."""
    steps = results["stopped"] or f"RL {results['rl_steps']} steps"
    return f"{results['task']}: {results['objective']}, {steps}"


def _table_png(results: Mapping[str, Any], path: Path) -> None:
    from unmask.viz.plots import plot_table

    rows = [
        {
            "metric": r["metric"],
            "SFT [95% CI]": _fmt(r["before"], r.get("before_ci95")),
            "SFT + RL [95% CI]": _fmt(r["after"], r.get("after_ci95")),
            "change": f"{r['change']:+.3f}",
        }
        for r in results["rows"]
    ]
    plot_table(rows, path, title=f"{_title(results)}, {results['num_samples']} held-out samples")


# -- stages ----------------------------------------------------------------------------------
def _traces(objective: str) -> bool:
    """Whether ``objective`` has the ``selection`` option (the trace objectives)."""
    from unmask.objectives import OBJECTIVES
    from unmask.objectives.selection import ExactSelection

    return issubclass(OBJECTIVES[objective], ExactSelection)


def _build(cls: type, where: str, recipe: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The recipe's fields with the user's overrides, checked; errors name ``where.field``."""
    return from_dict(cls, _merge(recipe, overrides), where)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _resuming(config: Any) -> Any:
    """The trainer config, resuming from the stage's latest checkpoint when there is one."""
    from unmask.train.checkpoint import latest_checkpoint

    found = latest_checkpoint(Path(config.output_dir)) is not None
    return replace(config, resume="latest" if found else None)


def _evaluate(
    config: QuickstartConfig, p: Plan, model_dir: Path, out: Path
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model_dir`` in every mode into ``out/MODE`` (reading back the summaries a
    finished evaluation left there); each summary gains its per-sample rewards."""
    from unmask.eval.evaluate import evaluate
    from unmask.models.diffusion_lm import DiffusionLM
    from unmask.tasks.registry import build_task
    from unmask.train.common import pin_threads

    model = task = None
    summaries: dict[str, dict[str, Any]] = {}
    for mode, sampler in p.eval_samplers.items():
        folder = out / mode
        if (folder / "summary.json").exists() and (folder / "generations.jsonl").exists():
            summary = json.loads((folder / "summary.json").read_text())
        else:
            if model is None:
                model = DiffusionLM.from_pretrained(str(model_dir))
                pin_threads(model, model.device, p.rl.cpu_threads)
                task = build_task(config.task, p.task_options, model.tokenizer)
            summary = evaluate(model, task, sampler, split="test", limit=config.eval_limit,
                               batch_size=config.eval_batch_size, output_dir=folder,
                               seed=config.seed, progress=config.progress, report=True)  # fmt: skip
        summaries[mode] = {**summary, "samples": _per_sample(folder)}
    return summaries


def is_model(path: Path) -> bool:
    """Whether ``path`` holds a finished model folder (config and weights)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def copy_model(src: Path, dst: Path) -> None:
    """Copy a model folder atomically: a temporary sibling, published by rename, so a crash
    never leaves a half-copied cache entry that a later run would reuse."""
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    publish_folder(tmp, dst)


def _default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "unmask" / "quickstart"


def _check_same_run(out: Path, config: QuickstartConfig) -> None:
    """Refuse to continue a run folder that was started with another task, objective or
    recipe: its finished stages would be silently reused."""
    saved = out / "quickstart.yaml"
    mine = {k: v for k, v in to_dict(config).items() if k not in ("minutes", "progress")}
    if saved.exists():
        theirs = yaml.safe_load(saved.read_text()) or {}
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise ConfigError(
                f"{out} holds a quickstart run with other settings ({', '.join(differ)}); "
                "choose another output_dir (--output-dir) or delete that folder"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(mine, sort_keys=False))


def _last_step(run_dir: Path) -> int | None:
    if not (run_dir / METRICS_FILE).exists():
        return None
    steps = [record["step"] for record in read_metrics(run_dir)]
    return max(steps) if steps else None


class _Stages:
    """Stage headers with the elapsed time and the budget, and the final table."""

    def __init__(self, config: QuickstartConfig, began: float) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.config, self.began = config, began

    def plan(self, p: Plan) -> None:
        """The steps before any work; each trainer adds its time once its first steps ran."""
        cap = (f"time cap {clock(self.config.minutes * 60)}: RL stops early to fit it"
               if self.config.minutes else "no time cap (minutes=N sets one)")  # fmt: skip
        self.console.print(
            f"plan: SFT {p.sft.max_steps} steps, evaluate, RL ({self.config.objective}) "
            f"{p.rl.max_steps} steps, evaluate; {cap}"
        )

    def stage(self, number: int, what: str) -> None:
        elapsed = clock(time.monotonic() - self.began)
        budget = f" of {clock(self.config.minutes * 60)}" if self.config.minutes else ""
        self.console.print(f"[bold]\\[{number}/4][/bold] {what}  [dim]({elapsed}{budget})[/dim]")

    def note(self, text: str) -> None:
        self.console.print(f"      {text}")

    def table(self, results: Mapping[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{_title(results)}; held-out, {results['num_samples']} rows, "
                      "95% intervals", caption=results["stopped"])  # fmt: skip
        for column in ("metric", "SFT", "SFT + RL", "change"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for r in results["rows"]:
            table.add_row(r["metric"], _fmt(r["before"], r.get("before_ci95")),
                          _fmt(r["after"], r.get("after_ci95")), f"{r['change']:+.3f}")  # fmt: skip
        console = Console()
        console.print(table)
        verdict = "intervals do not overlap" if results["significant"] else "intervals overlap"
        if results["stopped"]:
            console.print(f"[bold]{results['stopped']}[/bold]")
        console.print(f"accuracy ({results['headline']}) {results['accuracy_gain']:+.3f} "
                      f"({verdict}); {clock(results['wall_s'])} in all")  # fmt: skip
        # On a line of its own and never wrapped, so the path can be copied.
        console.print(f"results: {Path(self.config.output_dir) / RESULTS_JSON}", soft_wrap=True)
