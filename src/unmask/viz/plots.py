"""PNG plots of a run folder's ``metrics.jsonl``, and small tables rendered as PNG.

The plots are a function of the metrics file alone, so any trainer (or a finished, copied or
crashed run) gets them with one call: ``plot_metrics(run_dir)``. Figures are drawn on
matplotlib's Agg canvas through the object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from unmask.metrics import read_metrics

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class Series:
    """One line: a metric key, its legend label, and optionally a key holding a +-std band."""

    key: str
    label: str
    band: str | None = None


@dataclass(frozen=True)
class Panel:
    """One plot (one PNG): the series drawn on it, if any of them was logged."""

    name: str
    title: str
    ylabel: str
    series: tuple[Series, ...]
    prefix: str | None = None  # also draw every ``prefix<name>/mean`` key (per-function rewards)


PANELS: tuple[Panel, ...] = (
    Panel(
        "reward",
        "Reward",
        "reward",
        (
            Series("reward", "train (band: +- mean within-group std)", band="reward_std"),
            Series("eval/reward", "eval"),
        ),
        prefix="reward/",
    ),
    Panel("accuracy", "Held-out accuracy", "accuracy", (Series("eval/accuracy", "eval accuracy"),)),
    Panel("loss", "Training loss", "loss", (Series("loss", "loss"), Series("nll", "masked NLL"))),
    Panel("kl", "KL to the reference model (k3)", "KL", (Series("kl", "kl"),)),
    Panel(
        "clip_ratio",
        "Clipped token fraction",
        "fraction",
        (
            Series("clip_ratio", "clipped (either side)"),
            Series("clip_ratio/low_mean", "below 1 - epsilon"),
            Series("clip_ratio/high_mean", "above 1 + epsilon_high"),
        ),
    ),
    Panel(
        "nfe_per_token",
        "Forward passes per decoded token (1 / tokens per step)",
        "NFE / token",
        (Series("nfe_per_token", "rollouts"),),
    ),
    Panel(
        "completion_length",
        "Completion length",
        "tokens",
        (Series("completions/mean_length", "mean"),),
    ),
    Panel("entropy", "Entropy of the scored tokens", "nats", (Series("entropy", "entropy"),)),
)


def load_series(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` over all records; nulls (non-finite values) are skipped.

    ``nfe_per_token`` is derived as ``1 / tokens_per_step`` where that was logged.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a run folder?)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(run_dir):
        step = record.get("step")
        if not isinstance(step, int):
            continue
        values = dict(record)
        tps = values.get("tokens_per_step")
        if isinstance(tps, (int, float)) and tps > 0:
            values["nfe_per_token"] = 1.0 / tps
        for key, value in values.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, ys = series.setdefault(key, ([], []))
            steps.append(step)
            ys.append(float(value))
    return series


def plot_metrics(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel with logged data, plus ``overview.png``, into ``run_dir/plots``.

    Returns the written paths (panels in :data:`PANELS` order, overview last); an empty list
    when nothing plottable was logged.
    """
    series = load_series(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / PLOTS_DIR
    drawn = [p for p in PANELS if _panel_series(p, series)]
    if not drawn:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in drawn:
        fig = Figure(figsize=(6, 3.6), layout="constrained")
        _draw(fig.add_subplot(), panel, series)
        written.append(_save(fig, out / f"{panel.name}.png"))
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(Path(run_dir).resolve().name)
    for i, panel in enumerate(drawn):
        _draw(fig.add_subplot(rows, cols, i + 1), panel, series)
    written.append(_save(fig, out / "overview.png"))
    return written


def plot_table(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Render ``rows`` (one mapping per row; columns in first-seen key order) as a PNG table.

    Floats print with 3 decimals, a pair of numbers as ``[low, high]`` (a confidence
    interval), a missing value or None as an en dash.
    """
    if not rows:
        raise ValueError("plot_table: rows is empty")
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    total = sum(widths)
    fig = Figure(
        figsize=(max(3.0, 0.1 * total + 0.3 * len(columns)), 0.38 * (len(rows) + 1)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        colLabels=columns,
        colWidths=[w / total for w in widths],
        cellLoc="center",
        bbox=(0.0, 0.0, 1.0, 1.0),  # rows fill the axes: the figure size sets their height
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#e8e8f0")
    if title:
        ax.set_title(title)
    return _save(fig, Path(path), tight=True)


def _panel_series(
    panel: Panel, series: Mapping[str, tuple[list[int], list[float]]]
) -> list[Series]:
    """The panel's series that have data (per-function rewards only when there are several)."""
    found = [s for s in panel.series if s.key in series]
    if panel.prefix is not None:
        extra = sorted(k for k in series if k.startswith(panel.prefix) and k.endswith("/mean"))
        if len(extra) > 1:
            found += [Series(k, k[len(panel.prefix) : -len("/mean")]) for k in extra]
    return found


def _draw(ax: Axes, panel: Panel, series: Mapping[str, tuple[list[int], list[float]]]) -> None:
    for s in _panel_series(panel, series):
        steps, ys = series[s.key]
        marker = "o" if len(steps) <= 20 else None
        (line,) = ax.plot(steps, ys, label=s.label, marker=marker, markersize=3)
        if s.band is not None and s.band in series:
            band = dict(zip(*series[s.band], strict=True))
            pts = [(x, y, band[x]) for x, y in zip(steps, ys, strict=True) if x in band]
            if pts:
                xs, mid, half = zip(*pts, strict=True)
                low = [m - h for m, h in zip(mid, half, strict=True)]
                high = [m + h for m, h in zip(mid, half, strict=True)]
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return f"[{_cell(float(value[0]))}, {_cell(float(value[1]))}]"
    return str(value)


def _save(fig: Figure, path: Path, tight: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight" if tight else None, pad_inches=0.15)
    return path
