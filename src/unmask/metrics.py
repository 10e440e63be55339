"""Training metrics: always JSONL (``RUN_DIR/metrics.jsonl``); TensorBoard or W&B when asked.

One JSON object per logging step, ``{"step": ..., "loss": ..., ...}``, so a run can be plotted
or compared with nothing but the standard library. On resume the lines written after the
checkpoint's step are dropped (all of them when a resumed run found no checkpoint and starts
over), so the file reads as one uninterrupted run.

``report_to`` uses TRL's names (``tensorboard``, ``wandb``). Neither package is a dependency:
each is imported only when named, and a missing one is a warning, never an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REPORTERS: tuple[str, ...] = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id, so a resumed run continues the same W&B run


class MetricsWriter:
    """Append metrics to ``run_dir/metrics.jsonl`` (and to TensorBoard / W&B per ``report_to``).

    ``resume_step`` truncates the file to the lines with ``step <= resume_step``; 0 (a
    resumed run that found no checkpoint) empties it, since step 0's evaluation is logged
    again. A writer with ``enabled=False`` (non-main ranks) writes nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        report_to: Sequence[str] = (),
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        unknown = sorted(set(report_to) - set(REPORTERS))
        if unknown:
            raise ValueError(f"report_to: unknown reporter(s) {unknown}; known: {REPORTERS}")
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._tensorboard: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate(resume_step)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("report_to: tensorboard is not installed; logging to JSONL only")
            else:
                self._tensorboard = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        if "wandb" in report_to:
            self._wandb = _start_wandb(self.path.parent)

    def log(self, step: int, metrics: Mapping[str, float | int | None]) -> None:
        """Write one line; non-finite numbers become ``null`` (JSON has no NaN)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            # "step" is a logged metric, not W&B's own step counter, which must only grow:
            # train and eval lines share a step, and a resumed run repeats steps.
            self._wandb.log({k: v for k, v in record.items() if v is not None})

    def close(self) -> None:
        """Flush and close the TensorBoard and W&B writers (the JSONL file is closed per line)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _truncate(self, resume_step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a crash
            if resume_step > 0 and step <= resume_step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl``.

    A last line cut short (a run killed mid-write) is skipped; a bad line elsewhere is an
    error naming the file and line.
    """
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: skipping the last line, cut short: %r", path, line[:80])
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return records


def _start_wandb(run_dir: Path) -> Any:
    """A W&B run for ``run_dir`` (project from ``WANDB_PROJECT``, default ``unmask``), or None.

    The run's config is the run folder's ``config.yaml`` when the trainer wrote one.
    """
    try:
        import wandb
    except ImportError:
        logger.warning(
            "report_to: wandb is not installed (pip install wandb); logging to JSONL only"
        )
        return None
    import yaml

    id_file = run_dir / WANDB_ID_FILE
    resumed = id_file.is_file()
    run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "unmask"),
        name=run_dir.resolve().name,
        dir=str(run_dir),
        id=run_id,
        resume="allow" if resumed else None,
        config=config,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def _clean(value: float | int | None) -> float | int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
