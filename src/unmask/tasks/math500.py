"""MATH-500 (and other MATH-style sets): competition problems with a LaTeX answer.

The gold is the ``answer`` column, or the last ``\\boxed{}`` of ``solution`` where there is no
answer column (as in MATH's train split). A completion's answer is its last ``\\boxed{}``,
else the content of its ``<answer>`` block; math-verify decides equality (``\\frac{1}{2}`` =
``0.5``, ``\\frac{\\sqrt2}{2}`` = ``\\frac{1}{\\sqrt2}``). A gold math-verify cannot parse
scores None (cannot score), never a false 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unmask.rewards.extract import answer_tag, completion_text, last_boxed
from unmask.rewards.math import boxed_format, verify_answers
from unmask.tasks.base import RewardFunc, WorkedSolutionTask, require


def math_prediction(text: str) -> str | None:
    """The last ``\\boxed{}`` content, else the ``<answer>`` block, else None."""
    boxed = last_boxed(text)
    return boxed if boxed is not None else answer_tag(text)


def math_correct(
    prompts: list[str], completions: list[Any], answer: list[str], **_: Any
) -> list[float | None]:
    """1.0 if the completion's answer equals the gold by math-verify, else 0.0 (accuracy)."""
    preds = [math_prediction(completion_text(c)) for c in completions]
    return verify_answers(answer, preds)


@dataclass(kw_only=True)
class Math500Task(WorkedSolutionTask):
    """MATH-500 from the hub (``HuggingFaceH4/MATH-500``, split ``test`` only) or a file with
    ``problem`` and ``answer`` and/or ``solution``. Other columns (``level``, ``subject``, ...)
    are kept."""

    name: ClassVar[str] = "math500"
    question_field: ClassVar[str] = "problem"
    accuracy_reward: ClassVar[str] = "math_correct"

    source: str | Mapping[str, str] = "HuggingFaceH4/MATH-500"
    reward_funcs: list[RewardFunc] = field(default_factory=lambda: [math_correct, boxed_format])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1])

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        problem = str(require(row, "problem", where)).strip()
        solution = str(row.get("solution") or "").strip()
        answer = str(row.get("answer") or "").strip() or last_boxed(solution)
        if not answer:
            raise ValueError(f"{where}: missing field 'answer' (and no \\boxed{{}} in 'solution')")
        return {**row, "problem": problem, "answer": answer, "solution": solution}
