"""Seconds per SFT and RL step of the default quickstart recipe, before vs after, one run.

Each measurement runs in a fresh subprocess on one thread, against this checkout or (with
``--compare-to DIR``, a checkout of the landed code: ``git worktree add /tmp/old HEAD``)
against that one; the two alternate in rounds, so both see the same machine state. RL starts
from one SFT model (``--model``; by default a 300-step quickstart SFT model trained here
first). One JSON line per measurement, then the medians and the speed-ups.

    python benchmarks/quickstart_step.py --compare-to /tmp/old --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _runner import run_settings

STAGES = ("sft", "rl")


def run_one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from dataclasses import replace

    from unmask.quickstart import QuickstartConfig, plan

    out = Path(tempfile.mkdtemp(prefix="qs_step_"))
    p = plan(QuickstartConfig(output_dir=str(out), progress=False))
    times: list[float] = []
    extra: dict[str, float] = {}
    if args.one == "sft":
        from unmask.train.sft import SFTTrainer

        trainer = SFTTrainer(replace(p.sft, output_dir=str(out / "sft"), plots=False))
        for step in range(1, args.warmup + args.steps + 1):
            began = time.perf_counter()
            trainer._step(step)
            times.append(time.perf_counter() - began)
    else:
        from unmask.train.rl import RLTrainer

        rl = replace(p.rl, model=args.model, output_dir=str(out / "rl"), plots=False)
        trainer = RLTrainer(rl)
        samples = []
        for step in range(args.warmup + args.steps):
            trainer.steps_done = step
            began = time.perf_counter()
            metrics = trainer.step()
            times.append(time.perf_counter() - began)
            samples.append(metrics["sample_s"])
        extra["sample_s"] = round(statistics.median(samples[args.warmup :]), 4)
    return {
        "stage": args.one,
        "code": args.code_label,
        "step_s": round(statistics.median(times[args.warmup :]), 4),
        **extra,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare-to", help="a checkout of the landed code (the 'before')")
    parser.add_argument("--model", help="RL start model (default: a quickstart SFT model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(STAGES), choices=STAGES)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--code-label", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    argv = sys.argv[1:]
    if "rl" in args.only and args.model is None:
        args.model = _start_model()
        argv += ["--model", args.model]
    codes = {"after": None} if args.compare_to is None else {"before": args.compare_to,
                                                                "after": None}  # fmt: skip
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, code in codes.items():
            got = run_settings(__file__, [*argv, "--code-label", label], args.only, code)
            for stage, line in got.items():
                results.setdefault((stage, label), []).append(line["step_s"])
    for stage in args.only:
        row = {"stage": stage, **{f"{label}_step_s": round(statistics.median(
            results[(stage, label)]), 4) for label in codes}}  # fmt: skip
        if len(codes) == 2:
            row["speedup"] = round(row["before_step_s"] / row["after_step_s"], 2)
        print(json.dumps(row), flush=True)


def _start_model() -> str:
    """A quickstart SFT model trained with this checkout (the same start for both codes)."""
    import torch

    torch.set_num_threads(1)
    from dataclasses import replace

    from unmask.quickstart import QuickstartConfig, plan
    from unmask.train.sft import SFTTrainer

    out = Path(tempfile.mkdtemp(prefix="qs_step_sft_"))
    p = plan(QuickstartConfig(output_dir=str(out), progress=False))
    return str(SFTTrainer(replace(p.sft, output_dir=str(out / "sft"), plots=False)).train())


if __name__ == "__main__":
    main()
