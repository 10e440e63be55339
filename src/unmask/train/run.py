"""The run skeleton SFT and RL share, so that what one gains the other has too.

A run: resume (refusing a fresh run into a used folder, and a resume on other data) -> config
snapshot -> metrics writer and progress bar -> per step, the trainer's :meth:`Run.train_step`,
then logging, held-out evaluation and checkpoint cadences -> a stop at ``max_steps``, at the
wall-clock cap ``max_time_s`` (decided over all processes) or after ``max_bad_steps``
non-finite updates in a row -> the final model (merged, with LoRA) and plots. Checkpoints are
atomic and hold everything a resumed run needs to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from unmask.config import to_dict
from unmask.metrics import MetricsWriter
from unmask.models.diffusion_lm import DiffusionLM
from unmask.models.lora import has_lora, merge_lora
from unmask.models.saving import save_model
from unmask.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from unmask.train.common import BatchStream
from unmask.train.distributed import Parallel, on_any_process
from unmask.train.pace import Pace, time_cap_message
from unmask.train.update import UpdateGuard

logger = logging.getLogger(__name__)


class Run:
    """Base of the trainers: ``trainer.train()`` runs the loop and returns the final folder.

    A trainer sets, in its ``__init__``: ``config`` (``output_dir``, ``resume``, ``max_steps``,
    ``max_time_s``, ``log_every``, ``save_every``, ``keep_last``, ``report_to``, ``progress``,
    ``plots``, ``seed``, ``eval``), ``accelerator``, ``parallel``, ``core`` (the network being
    trained, unwrapped), ``model`` (``core`` as prepared for gradients), ``optimizer``,
    ``scheduler``, ``stream`` (the data order), ``guard``, ``task`` and ``output_dir``; and
    implements :meth:`train_step`.
    """

    name: ClassVar[str]  # "sft" or "rl": in the progress bar and messages

    config: Any
    accelerator: Any
    parallel: Parallel
    core: DiffusionLM
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: BatchStream
    guard: UpdateGuard
    task: Any
    output_dir: Path
    pace: Pace | None = None
    elapsed_before = 0.0  # training seconds of the run before this process resumed it

    # -- what a trainer provides -----------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """Take optimizer step ``step``; its metrics."""
        raise NotImplementedError

    def logged(self, metrics: dict[str, float]) -> dict[str, float]:
        """What a logging step writes, given the step's metrics."""
        return metrics

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures, from a logged line."""
        return {}

    def label(self) -> str:
        """The run's name on the progress bar and in messages."""
        return self.name

    def eval_options(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`unmask.eval.evaluate.evaluate`."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """The trainer's own part of a checkpoint's state."""
        return {}

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        """Restore :meth:`extra_state` (and any files of its own) from checkpoint ``path``."""

    def write_checkpoint_files(self, folder: Path) -> None:
        """Write the trainer's own files into the checkpoint ``folder`` being written (every
        process; listed in its manifest)."""

    def save_extras(self) -> None:
        """Save what the final model does not hold (every process, after it: a sharded model
        is gathered)."""

    # -- the loop --------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        """Training seconds so far, across resumes."""
        return self.elapsed_before + (self.pace.elapsed_s if self.pace is not None else 0.0)

    def train(self) -> Path:
        """Train to ``max_steps`` (or the time cap), from the latest checkpoint when resuming;
        returns the final model folder."""
        cfg, acc = self.config, self.accelerator
        start = self._resume()
        main = acc.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        writer = MetricsWriter(
            self.output_dir, cfg.report_to, resume_step=start if cfg.resume else None, enabled=main
        )
        shown = cfg.progress and main
        bar = tqdm(total=cfg.max_steps, initial=start, desc=self.label(), disable=not shown)
        if cfg.eval.every and start == 0:
            writer.log(0, self.evaluate())
        self.pace = pace = Pace(self.name, start, cfg.max_steps, cfg.max_time_s, enabled=shown)
        step, cut = start, False
        for step in range(start + 1, cfg.max_steps + 1):
            metrics = self.train_step(step)
            cut = (cfg.max_time_s is not None and step < cfg.max_steps
                   and on_any_process(acc, pace.out_of_time()))  # fmt: skip
            last = step == cfg.max_steps or cut
            failing = self.guard.failing
            if step % cfg.log_every == 0 or last or failing:
                logged = self.logged(metrics)
                writer.log(step, logged)
                bar.set_postfix(self.postfix(logged))
            if failing:
                writer.close()
                raise self.guard.error(step, self.output_dir)
            bar.update(1)
            pace.tick(step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                writer.log(step, self.evaluate())
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
            if last:
                break
        bar.close()
        if cut and main:
            notice(f"{time_cap_message(self.name.upper(), step, cfg.max_steps)} "
                   f"(max_time_s={cfg.max_time_s:g})")  # fmt: skip
        final = self.output_dir / "final"
        with self.parallel.whole(self.model, main_only=True) as whole:
            if main:
                save_final(whole, final)
        self.save_extras()
        acc.wait_for_everyone()
        writer.close()
        if main and cfg.plots:
            write_plots(self.output_dir)
        return final

    # -- evaluation and checkpoints --------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Sample the held-out split and score it (main process; the others wait)."""
        from unmask.eval.evaluate import evaluate

        cfg, acc = self.config.eval, self.accelerator
        metrics: dict[str, float] = {}
        with self.parallel.whole(self.model, self.parallel.sampling_dtype()) as model:
            if acc.is_main_process:
                with acc.autocast():
                    summary = evaluate(model, self.task, cfg.sampler, split=cfg.split,
                                       limit=cfg.limit, batch_size=cfg.batch_size,
                                       seed=self.config.seed, progress=False,
                                       **self.eval_options())  # fmt: skip
                model.train()
                metrics = eval_metrics(summary)
        acc.wait_for_everyone()
        return metrics

    def save(self, step: int) -> Path:
        """Checkpoint ``step``: weights, optimizer, scheduler, the RNG states of every process,
        the data position and the trainer's state. Every process calls it: the main process
        writes the whole model (gathered, if sharded), every process its optimizer shards."""
        acc = self.accelerator
        state = {
            "data": self.stream.state_dict(),
            "num_rows": self.stream.size,
            "skipped_in_a_row": self.guard.in_a_row,
            "elapsed_s": self.elapsed_s,
            **self.extra_state(),
        }
        rng = [capture_rng_state()]
        if acc.num_processes > 1:
            rng = gather_object(rng)
        with self.parallel.whole(self.model, main_only=True) as model:
            path = save_checkpoint(
                self.output_dir, step, model, self.optimizer, self.scheduler, state,
                rng_states=rng, keep_last=self.config.keep_last, trained=self.model,
                write_extra=self.write_checkpoint_files,
            )  # fmt: skip
        acc.wait_for_everyone()
        return path

    def _resume(self) -> int:
        """Load the checkpoint ``config.resume`` names; the step to continue after (0: none)."""
        acc = self.accelerator
        path = checkpoint_to_resume(self.output_dir, self.config.resume, acc.is_main_process)
        if path is None:
            return 0
        sharded = self.parallel.sharded
        state = load_checkpoint(
            path,
            None if sharded else self.core,
            self.optimizer,
            self.scheduler,
            rank=acc.process_index,
            trained=self.model,
        )
        if sharded:
            self.parallel.load_weights(path, self.core)
        rows = int(state.get("num_rows", self.stream.size))  # absent in older RL checkpoints
        if rows != self.stream.size:
            raise ValueError(
                f"{path} was trained on {rows} rows, this run has {self.stream.size}: resume "
                "with the same data"
            )
        self.stream.load_state_dict(state["data"])
        self.guard.in_a_row = int(state.get("skipped_in_a_row", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.load_extra_state(state, path)
        logger.info("resumed from %s at step %d", path, state["step"])
        return int(state["step"])


def checkpoint_to_resume(output_dir: Path, resume: str | None, main: bool = True) -> Path | None:
    """The checkpoint ``resume`` names (``latest`` or a folder), or None for a fresh run.

    A fresh run into a folder that already holds checkpoints is refused: it would silently
    mix two runs' metrics and checkpoints. ``resume=latest`` with no checkpoint yet starts
    from step 0 with a notice (on the ``main`` process), so a cluster's requeue loop can
    always pass ``--resume``.
    """
    if resume is None:
        existing = latest_checkpoint(output_dir)
        if existing is not None:
            raise ValueError(
                f"{output_dir} already has checkpoints (latest: {existing}); resume with "
                "resume=latest or choose another output_dir"
            )
        return None
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None and main:
        notice(f"resume=latest: no checkpoint in {output_dir / 'checkpoints'} yet; "
               "starting from step 0")  # fmt: skip
    return path


def notice(message: str) -> None:
    """A warning the user must see: logged, and printed to stderr unless logging has no
    handler at all (Python's last-resort handler prints it there already)."""
    logger.warning(message)
    if logger.hasHandlers():
        print(message, file=sys.stderr)


def save_final(model: DiffusionLM, path: Path) -> Path:
    """Save the trained model to ``path``; a LoRA model is first saved as it is, adapters and
    all, to ``path`` + ``_lora``, then merged (in place) into a plain native model."""
    if has_lora(model):
        save_model(model, path.with_name(f"{path.name}_lora"))
        merge_lora(model)
    return save_model(model, path)


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The ``eval/...`` metrics of an evaluation summary."""
    metrics = {
        "eval/accuracy": summary["accuracy"],
        "eval/nfe": summary["mean_nfe"],
        "eval/reward": summary["reward"],
    }
    for key, value in summary.items():
        if key.startswith("reward/") and key.endswith("/mean"):
            metrics[f"eval/{key.split('/')[1]}"] = value
    return metrics


def write_plots(output_dir: Path) -> None:
    """PNG plots of the run's metrics in ``OUTPUT_DIR/plots``. A plotting failure only warns:
    the model is saved by then."""
    from unmask.viz.plots import plot_metrics

    try:
        plot_metrics(output_dir)
    except Exception as err:
        logger.warning("could not plot %s: %s", output_dir / "metrics.jsonl", err)
