"""Evaluation: accuracy, pass@k, NFE and tokens per step; generations as JSONL; sweeps of
decoding settings (accuracy vs NFE)."""

from unmask.eval.evaluate import (
    EvalConfig,
    evaluate,
    pass_at_k,
    run_eval,
    run_eval_sweep,
    wilson_interval,
)
from unmask.eval.sweep import EvalSweep

__all__ = [
    "EvalConfig",
    "EvalSweep",
    "evaluate",
    "pass_at_k",
    "run_eval",
    "run_eval_sweep",
    "wilson_interval",
]
