"""What ``eval`` writes with ``report: true``: the trace page of the first rollouts and the
summary as a PNG table.

:func:`summary_row` is also the row format of before/after tables (``plot_table([
summary_row(before, "sft"), summary_row(after, "sft + rl")], path)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unmask.models.diffusion_lm import DiffusionLM
from unmask.sampling.rollout import Rollout
from unmask.viz.plots import plot_table
from unmask.viz.trace_html import replay_confidences, write_trace_html

TRACE_FILE = "trace.html"
SUMMARY_PNG = "summary.png"
MAX_TRACED = 8  # rows shown when each prompt has a single sample


def summary_row(summary: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The headline numbers of an evaluation summary, as one table row."""
    row: dict[str, Any] = {} if name is None else {"model": name}
    row.update(
        samples=summary["num_samples"],
        accuracy=summary["accuracy"],
        **{"95% CI": summary["accuracy_ci95"]},
    )
    row.update({k: summary[k] for k in sorted(summary) if k.startswith("pass@")})
    row.update(
        {
            "reward": summary.get("reward"),
            "NFE": summary["mean_nfe"],
            "tokens/step": summary["tokens_per_step"],
        }
    )
    return row


def write_eval_report(
    output_dir: str | Path,
    model: DiffusionLM,
    rollout: Rollout,
    scores: Mapping[str, list[float | None]],
    totals: list[float | None],
    summary: Mapping[str, Any],
    num_generations: int,
) -> list[Path]:
    """Write ``trace.html`` (one prompt's samples, or the first rows) and ``summary.png``.

    ``rollout``, ``scores`` and ``totals`` are the first evaluation batch's; confidences are
    replayed for the shown rows only.
    """
    assert model.tokenizer is not None
    out = Path(output_dir)
    shown = num_generations if num_generations > 1 else MAX_TRACED
    rows = list(range(min(shown, rollout.batch_size)))
    labels = [f"sample {r}" if num_generations > 1 else f"row {r}" for r in rows]
    title = f"{summary['task']}/{summary['split']}: first prompt's samples"
    if num_generations == 1:
        title = f"{summary['task']}/{summary['split']}: first {len(rows)} rows"
    trace = write_trace_html(
        rollout,
        model.tokenizer,
        out / TRACE_FILE,
        rewards=totals,
        reward_parts=scores,
        rows=rows,
        confidences=replay_confidences(model, rollout, rows),
        labels=labels,
        title=title,
    )
    table = plot_table(
        [summary_row(summary)],
        out / SUMMARY_PNG,
        title=f"{summary['task']}/{summary['split']}",
    )
    return [trace, table]
