"""The steps/accuracy trade-off: one evaluation per decoding setting, as a table and a plot.

Fewer denoising steps means more tokens per forward and (usually) lower accuracy. A sweep runs
the same held-out evaluation at several static step counts (``steps_per_block``) and several
dynamic confidence thresholds (``remasking: threshold``), and writes accuracy against NFE per
token, so a user can show that an RL gain holds when decoding with fewer steps (AGRPO, Fig. 3).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from unmask.sampling.sampler import SamplerConfig

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_PNG = "sweep.png"
SWEEP_TABLE_PNG = "sweep_table.png"
COLUMNS = ("setting", "remasking", "steps_per_block", "threshold", "accuracy", "accuracy_ci95",
           "mean_nfe", "nfe_per_token", "tokens_per_step", "reward", "wall_s")  # fmt: skip


@dataclass
class EvalSweep:
    """``sweep:`` of ``unmask eval``: one evaluation per listed setting (docs/eval.md).

    Each ``steps_per_block`` value is a static schedule (the config's ``sampler.remasking``,
    or ``low_confidence`` when that is ``threshold``); each ``threshold`` value is a dynamic one
    (``remasking: threshold``). The rows are the union, not the product: a threshold schedule
    ignores the step count.
    """

    steps_per_block: list[int] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, steps in enumerate(self.steps_per_block):
            if steps < 1:
                raise ValueError(f"sweep.steps_per_block[{i}] must be >= 1, got {steps}")
        for i, value in enumerate(self.threshold):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"sweep.threshold[{i}] must be in [0, 1], got {value}")

    @property
    def enabled(self) -> bool:
        """Whether any decoding setting is swept (otherwise one evaluation runs)."""
        return bool(self.steps_per_block or self.threshold)

    def settings(self, base: SamplerConfig) -> list[tuple[str, SamplerConfig]]:
        """``(name, sampler config)`` per row, static settings first."""
        static = "low_confidence" if base.remasking == "threshold" else base.remasking
        out = [
            (f"steps-{s}", replace(base, steps_per_block=s, remasking=static))
            for s in self.steps_per_block
        ]
        out += [
            (f"threshold-{t:g}", replace(base, remasking="threshold", threshold=t))
            for t in self.threshold
        ]
        return out


def sweep_row(name: str, sampler: SamplerConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One table row of an evaluation summary; NFE per token is ``1 / tokens_per_step``."""
    dynamic = sampler.remasking == "threshold"
    tps = summary["tokens_per_step"]
    return {
        "setting": name,
        "remasking": sampler.remasking,
        "steps_per_block": None if dynamic else sampler.steps_per_block,
        "threshold": sampler.threshold if dynamic else None,
        "accuracy": summary["accuracy"],
        "accuracy_ci95": list(summary["accuracy_ci95"]),
        "mean_nfe": summary["mean_nfe"],
        "nfe_per_token": 1.0 / tps if tps > 0 else None,
        "tokens_per_step": tps,
        "reward": summary["reward"],
        "wall_s": summary["wall_s"],
    }


def run_sweep(
    sweep: EvalSweep,
    base: SamplerConfig,
    evaluate_one: Callable[[SamplerConfig, Path], Mapping[str, Any]],
    output_dir: str | Path,
) -> list[dict[str, Any]]:
    """Evaluate every setting (``evaluate_one(sampler, folder)`` writes that setting's
    generations into ``output_dir/<setting>``), then write the table and the plot."""
    out = Path(output_dir)
    settings = sweep.settings(base)
    rows = [sweep_row(name, cfg, evaluate_one(cfg, out / name)) for name, cfg in settings]
    write_sweep(rows, out)
    return rows


def write_sweep(rows: Sequence[Mapping[str, Any]], output_dir: str | Path) -> list[Path]:
    """``sweep.json``, ``sweep.csv`` (the interval as two columns), the table as a PNG and
    ``sweep.png``: accuracy against NFE per token, one line per schedule kind."""
    from unmask.viz.plots import plot_table

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SWEEP_JSON).write_text(json.dumps(list(rows), indent=2) + "\n")
    with (out / SWEEP_CSV).open("w", newline="") as f:
        names = [c for c in COLUMNS if c != "accuracy_ci95"]
        names[names.index("accuracy") + 1 : names.index("accuracy") + 1] = ["ci95_low", "ci95_high"]
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            low, high = row["accuracy_ci95"]
            flat = {k: v for k, v in row.items() if k != "accuracy_ci95"}
            writer.writerow({**flat, "ci95_low": low, "ci95_high": high})
    table = [{k: row[k] for k in COLUMNS if k != "wall_s"} for row in rows]
    return [out / SWEEP_JSON, out / SWEEP_CSV, plot_table(table, out / SWEEP_TABLE_PNG),
            plot_sweep(rows, out / SWEEP_PNG)]  # fmt: skip


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy (with its 95% interval) against NFE per token, each point labelled."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for dynamic, label in ((False, "static (steps per block)"), (True, "dynamic (threshold)")):
        points = sorted(
            (r for r in rows if (r["remasking"] == "threshold") == dynamic
             and r["nfe_per_token"] is not None),
            key=lambda r: r["nfe_per_token"],
        )  # fmt: skip
        if not points:
            continue
        xs = [r["nfe_per_token"] for r in points]
        ys = [r["accuracy"] for r in points]
        errors = [[y - r["accuracy_ci95"][0] for y, r in zip(ys, points, strict=True)],
                  [r["accuracy_ci95"][1] - y for y, r in zip(ys, points, strict=True)]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
        for x, y, r in zip(xs, ys, points, strict=True):
            tag = r["threshold"] if dynamic else r["steps_per_block"]
            ax.annotate(f"{tag:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("NFE per token (forwards / decoded tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs decoding cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def print_sweep(rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """The table on stderr (stdout keeps the JSON)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("setting", "accuracy", "95% CI", "NFE/token", "tokens/step", "mean NFE"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        low, high = r["accuracy_ci95"]
        per_token = "-" if r["nfe_per_token"] is None else f"{r['nfe_per_token']:.3f}"
        table.add_row(r["setting"], f"{r['accuracy']:.3f}", f"{low:.3f}-{high:.3f}", per_token,
                      f"{r['tokens_per_step']:.2f}", f"{r['mean_nfe']:.1f}")  # fmt: skip
    Console(stderr=True).print(table)
