"""Evaluation: accuracy, pass@k, NFE and tokens per step; generations as JSONL."""

from unmask.eval.evaluate import EvalConfig, evaluate, pass_at_k, run_eval, wilson_interval

__all__ = ["EvalConfig", "evaluate", "pass_at_k", "run_eval", "wilson_interval"]
