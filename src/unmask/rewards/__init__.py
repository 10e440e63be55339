"""Reward building blocks: answer extraction, a safe arithmetic evaluator, math verification,
sandboxed code tests.

Task-specific reward functions live with their task in :mod:`unmask.tasks`.
"""

from unmask.rewards.arithmetic import Evaluation, ExpressionError, Limits, evaluate
from unmask.rewards.code import CodeJudge, CodeTests, extract_program
from unmask.rewards.extract import answer_tag, completion_text, last_boxed, last_number
from unmask.rewards.math import (
    MathVerifier,
    as_latex,
    boxed_format,
    close,
    get_verifier,
    set_verifier,
    verify_answers,
)

__all__ = [
    "CodeJudge",
    "CodeTests",
    "Evaluation",
    "ExpressionError",
    "Limits",
    "MathVerifier",
    "answer_tag",
    "as_latex",
    "boxed_format",
    "close",
    "completion_text",
    "evaluate",
    "extract_program",
    "get_verifier",
    "last_boxed",
    "last_number",
    "set_verifier",
    "verify_answers",
]
