"""Which RL objective teaches most in equal time from one SFT model, each at its best lr?

For each task the quickstart recipe's SFT model is trained once (or taken from the cache) and
evaluated. Then, per task:

1. **Calibration**: every arm (an objective and its options) is built from the start model in
   this one process, and after ``--warmup-steps`` steps each, ``--calibration-steps`` steps
   are timed round-robin (one step of each arm in turn), so a load change on the machine
   touches every arm alike. A step's time is this process's CPU time by default (with one
   thread, what the step takes on an idle core, however busy the machine is; ``--calibrate-by
   wall`` for wall time). Each arm then gets ``max_steps = budget_s / step_s``: its
   learning-rate schedule (warmup, cosine decay) completes, and how loaded the machine is
   during a run changes its wall time, not its result.
2. **Learning-rate sweep**: seed 0 at each of ``--lrs``, evaluated (sampled at the RL
   temperature) on the task's ``validation`` split; the best rate per arm is the one with the
   highest validation accuracy.
3. **Seeds**: seeds 1, 2, ... at that rate (seed 0's sweep run is reused), and the final
   numbers, sampled and greedy, on the ``test`` split, which chooses nothing.

Every measurement is one JSON line, printed and appended to ``--out``; a run again with the
same ``--out`` and ``--work-dir`` skips what the file already holds (the calibration too, so
the step counts stay the same), so an interrupted run loses at most one run.

    python benchmarks/learning.py --tasks sudoku countdown --budget-s sudoku=120 countdown=60 \\
        --out results.jsonl --work-dir /tmp/learning
    python benchmarks/learning.py --tasks sudoku --arms tracerl spg --lrs 3e-4 --seeds 1 \\
        --budget-s 5 --validation-limit 16 --test-limit 16           # a smoke run

Arms: ``tracerl``, ``tracerl_value`` (with the diffusion value model, its lr 3e-3 as in
configs/rl_value_sudoku_tiny.yaml), ``agrpo_exact`` / ``agrpo_ignore`` (``selection``),
``spg``, ``wd1``, and every other objective by its name (its defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# name -> (objective, RL overrides on top of the quickstart recipe)
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "tracerl": ("tracerl", {}),
    "tracerl_value": ("tracerl", {"value_model": {"enabled": True, "lr": 3e-3}}),
    "agrpo_exact": ("agrpo", {"objective_options": {"selection": "exact"}}),
    "agrpo_ignore": ("agrpo", {"objective_options": {"selection": "ignore"}}),
    "spg": ("spg", {}),
    "wd1": ("wd1", {}),
}
DEFAULT_ARMS = list(ARMS)
# Sudoku's validation split is opt-in (grids held out of training); Countdown always has one.
VALIDATION: dict[str, dict[str, Any]] = {"sudoku": {"validation_grids": 20}}


def arm(name: str) -> tuple[str, dict[str, Any]]:
    """The objective and RL overrides of an arm; any objective's name is an arm too."""
    from unmask.objectives import OBJECTIVES

    if name in ARMS:
        return ARMS[name]
    if name in OBJECTIVES:
        return name, {}
    raise SystemExit(f"unknown arm {name!r}: one of {sorted(ARMS)} or an objective "
                     f"{sorted(OBJECTIVES)}")  # fmt: skip


# -- the JSONL record ------------------------------------------------------------------------
class Record:
    """Appends each measurement to ``path`` (and stdout); ``find`` looks one up for resuming."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lines: list[dict[str, Any]] = []
        if path is not None and path.exists():
            self.lines = [json.loads(line) for line in path.read_text().splitlines() if line]

    def find(self, **key: Any) -> dict[str, Any] | None:
        for line in self.lines:
            if all(line.get(k) == v for k, v in key.items()):
                return line
        return None

    def add(self, line: dict[str, Any], *, keep: bool = True) -> dict[str, Any]:
        print(json.dumps(line), flush=True)
        if keep:
            self.lines.append(line)
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
        return line


# -- models and evaluation -------------------------------------------------------------------
def start_model(task: str, args: argparse.Namespace, work: Path) -> tuple[Path, Any]:
    """The recipe's SFT model (cached by recipe) and the recipe's plan."""
    from unmask.quickstart import QuickstartConfig, copy_model, is_model, plan
    from unmask.train.sft import SFTTrainer

    config = QuickstartConfig(task=task, output_dir=str(work / task / "sft"), progress=False,
                              task_options=VALIDATION.get(task, {}),
                              cache_dir=args.cache_dir)  # fmt: skip
    p = plan(config)
    if not is_model(p.sft_cache):
        final = SFTTrainer(p.sft).train()
        copy_model(final, p.sft_cache)
    return p.sft_cache, p


def evaluate(task: str, p: Any, model_dir: Path, split: str, limit: int,
             modes: tuple[str, ...], seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Accuracy on ``split`` in the quickstart's modes: ``accuracy`` sampled at the RL
    temperature (the policy RL trains; the headline) and ``greedy_accuracy``. ``seed`` seeds
    the sampled decoding: each training seed's model gets its own, so the spread across seeds
    includes the evaluation's sampling noise."""
    from unmask.eval.evaluate import evaluate as run
    from unmask.models.diffusion_lm import DiffusionLM
    from unmask.tasks.registry import build_task

    model = DiffusionLM.from_pretrained(str(model_dir))
    data = build_task(task, p.task_options, model.tokenizer)
    out: dict[str, float] = {}
    began = time.perf_counter()
    for mode in modes:
        summary = run(model, data, p.eval_samplers[mode], split=split, limit=limit,
                      batch_size=256, seed=seed, progress=False)  # fmt: skip
        prefix = "" if mode == "sampled" else f"{mode}_"
        out[f"{prefix}accuracy"] = summary["accuracy"]
    out["eval_s"] = time.perf_counter() - began
    return out


def rl_config(task: str, name: str, seed: int, lr: float, steps: int, start: Path,
              out: Path, args: argparse.Namespace) -> Any:  # fmt: skip
    """The quickstart recipe's RL config for an arm, at ``lr`` for ``steps`` steps."""
    from unmask.quickstart import QuickstartConfig, plan

    objective, overrides = arm(name)
    warmup = min(args.lr_warmup, steps // 5)
    config = QuickstartConfig(task=task, objective=objective, seed=seed, progress=False,
                              task_options=VALIDATION.get(task, {}),
                              output_dir=str(out), cache_dir=args.cache_dir,
                              rl={**overrides, "lr": lr, "max_steps": steps,
                                  "warmup_steps": warmup, "save_every": 0,
                                  "plots": False})  # fmt: skip
    p = plan(config)
    return replace(p.rl, model=str(start), eval=replace(p.rl.eval, every=0)), p


def calibrate(task: str, names: list[str], start: Path, budget_s: float, work: Path,
              args: argparse.Namespace, record: Record) -> dict[str, int]:  # fmt: skip
    """Steps per arm for ``budget_s`` seconds: each arm's step time measured round-robin in
    this process, after a warm-up, from the start model."""
    from unmask.train.rl import RLTrainer

    steps: dict[str, int] = {}
    todo = []
    for name in names:
        found = record.find(kind="calibration", task=task, arm=name, budget_s=budget_s)
        if found is not None:
            steps[name] = found["steps"]
        else:
            todo.append(name)
    if not todo:
        return steps
    lr = sorted(args.lrs)[len(args.lrs) // 2]
    trainers = {}
    for name in todo:
        cfg, _ = rl_config(task, name, 0, lr, 10**6, start, work / task / "calibration" / name,
                           args)  # fmt: skip
        trainers[name] = RLTrainer(cfg)
    wall: dict[str, list[float]] = {name: [] for name in todo}
    cpu: dict[str, list[float]] = {name: [] for name in todo}
    for step in range(1, args.warmup_steps + args.calibration_steps + 1):
        for name, trainer in trainers.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(step)
            if step > args.warmup_steps:
                wall[name].append(time.perf_counter() - began)
                cpu[name].append(time.process_time() - began_cpu)
    for name in todo:
        times = cpu[name] if args.calibrate_by == "cpu" else wall[name]
        mean = statistics.fmean(times)
        steps[name] = max(1, round(budget_s / mean))
        record.add({"kind": "calibration", "task": task, "arm": name, "budget_s": budget_s,
                    "by": args.calibrate_by, "step_s": mean,
                    "step_s_median": statistics.median(times), "step_s_min": min(times),
                    "step_s_max": max(times), "wall_step_s": statistics.fmean(wall[name]),
                    "cpu_step_s": statistics.fmean(cpu[name]), "timed_steps": len(times),
                    "warmup_steps": args.warmup_steps, "steps": steps[name],
                    "loadavg": os.getloadavg()[0]})  # fmt: skip
    return steps


def train(task: str, name: str, seed: int, lr: float, steps: int, start: Path, work: Path,
          args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """RL for exactly ``steps`` steps (a safety cap of ``--max-time-factor`` x the budget)."""
    import shutil

    from unmask.train.rl import RLTrainer

    out = work / task / name / f"lr{lr:g}" / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts over
    cfg, _ = rl_config(task, name, seed, lr, steps, start, out, args)
    cap = args.max_time_factor * budget(task, args)
    cfg = replace(cfg, output_dir=str(out / "rl"), max_time_s=cap)
    began, began_cpu = time.perf_counter(), time.process_time()
    final = RLTrainer(cfg).train()
    wall, used = time.perf_counter() - began, time.process_time() - began_cpu
    lines = (out / "rl" / "metrics.jsonl").read_text().splitlines()
    done = max(json.loads(line)["step"] for line in lines)
    return final, {"steps": done, "planned_steps": steps, "rl_s": wall, "rl_cpu_s": used,
                   "loadavg": os.getloadavg()[0]}  # fmt: skip


def budget(task: str, args: argparse.Namespace) -> float:
    """``--budget-s``: one number for every task, or ``task=seconds`` items."""
    plain = [b for b in args.budget_s if "=" not in b]
    named = dict(b.split("=", 1) for b in args.budget_s if "=" in b)
    if task in named:
        return float(named[task])
    if plain:
        return float(plain[0])
    raise SystemExit(f"--budget-s has no budget for {task}")


# -- one task ------------------------------------------------------------------------------------
def run_task(task: str, args: argparse.Namespace, record: Record, work: Path) -> None:
    budget_s = budget(task, args)
    start, p = start_model(task, args, work)
    began = record.find(kind="start", task=task)
    if began is None:
        val = evaluate(task, p, start, "validation", args.validation_limit, ("sampled",))
        test = evaluate(task, p, start, "test", args.test_limit, ("sampled", "greedy"))
        began = record.add({"kind": "start", "task": task, "model": str(start),
                            "validation_accuracy": val["accuracy"],
                            "test_accuracy": test["accuracy"],
                            "test_greedy_accuracy": test["greedy_accuracy"],
                            "validation_limit": args.validation_limit,
                            "test_limit": args.test_limit})  # fmt: skip
    steps = calibrate(task, args.arms, start, budget_s, work, args, record)
    for name in args.arms:
        # 1. the learning-rate sweep, seed 0, on validation
        sweep: dict[float, float] = {}
        for lr in args.lrs:
            key = {"kind": "sweep", "task": task, "arm": name, "lr": lr, "seed": 0}
            found = record.find(**key)
            if found is None:
                final, run = train(task, name, 0, lr, steps[name], start, work, args)
                val = evaluate(task, p, final, "validation", args.validation_limit, ("sampled",))
                found = record.add({**key, **run, "validation_accuracy": val["accuracy"],
                                    "eval_s": val["eval_s"], "budget_s": budget_s})  # fmt: skip
            sweep[lr] = found["validation_accuracy"]
        best = max(args.lrs, key=lambda lr: (sweep[lr], -lr))  # a tie: the smaller rate
        record.add({"kind": "choice", "task": task, "arm": name, "best_lr": best,
                    "validation_accuracy": sweep, "start_validation_accuracy":
                    began["validation_accuracy"]}, keep=False)  # fmt: skip
        # 2. seeds at the best rate, on test (seed 0: the sweep's model)
        finals = []
        for seed in range(args.seeds):
            key = {"kind": "test", "task": task, "arm": name, "lr": best, "seed": seed}
            found = record.find(**key)
            if found is None:
                model = work / task / name / f"lr{best:g}" / f"seed{seed}" / "rl" / "final"
                swept = record.find(kind="sweep", task=task, arm=name, lr=best, seed=seed)
                if seed == 0 and swept is not None and (model / "model.safetensors").exists():
                    run = {k: swept[k] for k in ("steps", "planned_steps", "rl_s", "rl_cpu_s")}
                else:
                    model, run = train(task, name, seed, best, steps[name], start, work, args)
                modes = ("sampled", "greedy")
                test = evaluate(task, p, model, "test", args.test_limit, modes, seed)
                found = record.add({**key, **run, **test, "budget_s": budget_s})
            finals.append(found)
        acc = [f["accuracy"] for f in finals]
        greedy = [f["greedy_accuracy"] for f in finals]
        record.add({
            "kind": "summary", "task": task, "arm": name, "objective": arm(name)[0],
            "best_lr": best, "steps": finals[0]["planned_steps"], "budget_s": budget_s,
            "start_accuracy": began["test_accuracy"],
            "start_greedy_accuracy": began["test_greedy_accuracy"],
            "mean_accuracy": statistics.fmean(acc),
            "std_accuracy": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "min_accuracy": min(acc), "max_accuracy": max(acc), "accuracies": acc,
            "mean_greedy_accuracy": statistics.fmean(greedy), "seeds": len(acc),
            "validation_sweep": sweep,
        }, keep=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=["sudoku", "countdown"])
    parser.add_argument(
        "--arms",
        "--objectives",
        nargs="+",
        default=DEFAULT_ARMS,
        help="arms (default: %(default)s) or any objective's name",
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 at the best lr")
    parser.add_argument(
        "--budget-s",
        nargs="+",
        default=["sudoku=120", "countdown=60"],
        help="RL seconds per run: one number, or TASK=SECONDS items",
    )
    parser.add_argument(
        "--calibrate-by",
        choices=["cpu", "wall"],
        default="cpu",
        help="step time as this process's CPU time (default: what the step costs on an idle "
        "core, whatever else runs) or as wall time",
    )
    parser.add_argument("--warmup-steps", type=int, default=2, help="calibration warm-up steps")
    parser.add_argument(
        "--calibration-steps", type=int, default=5, help="timed calibration steps per arm"
    )
    parser.add_argument(
        "--lr-warmup", type=int, default=10, help="lr warmup steps (at most a fifth of the run)"
    )
    parser.add_argument(
        "--max-time-factor",
        type=float,
        default=10.0,
        help="a run stops after this many budgets even if steps are left",
    )
    parser.add_argument("--validation-limit", type=int, default=256)
    parser.add_argument("--test-limit", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="SFT cache (the quickstart's)")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="run folders (kept, for resuming; default: a temporary folder)",
    )
    parser.add_argument("--out", default=None, help="JSONL file: appended, and resumed from")
    args = parser.parse_args()
    for name in args.arms:
        arm(name)

    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    record = Record(Path(args.out) if args.out else None)
    with tempfile.TemporaryDirectory(prefix="unmask-learning-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        for task in args.tasks:
            run_task(task, args, record, work)


if __name__ == "__main__":
    main()
