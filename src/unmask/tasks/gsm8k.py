"""GSM8K: grade-school word problems with an integer answer after ``####``.

The gold is the text after the last ``####`` (thousands separators removed); the worked
solution, with its ``<<48/2=24>>`` calculator annotations removed, is the SFT target.
A completion's answer is the last number of its last ``\\boxed{}``, else of its ``<answer>``
block, else of the whole text (the last fallback can score an intermediate number of a
truncated completion; the boxed and tagged formats avoid that). math-verify compares it to the
gold, so ``18.00`` and ``$18`` are right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unmask.rewards.extract import answer_tag, completion_text, last_boxed, last_number
from unmask.rewards.math import boxed_format, verify_answers
from unmask.tasks.base import RewardFunc, WorkedSolutionTask, require

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_prediction(text: str) -> str | None:
    """The number a completion answers with (see the module docstring for the fallbacks)."""
    span = last_boxed(text)
    if span is None:
        span = answer_tag(text)
    return last_number(text if span is None else span)


def gsm8k_correct(
    prompts: list[str], completions: list[Any], answer: list[str], **_: Any
) -> list[float | None]:
    """1.0 if the completion's number equals the gold (math-verify), else 0.0 (accuracy)."""
    preds = [gsm8k_prediction(completion_text(c)) for c in completions]
    return verify_answers(answer, preds)


@dataclass(kw_only=True)
class GSM8KTask(WorkedSolutionTask):
    """GSM8K from the hub (``openai/gsm8k``, config ``main``) or a file with ``question`` and
    ``answer`` (GSM8K style, or a bare final answer)."""

    name: ClassVar[str] = "gsm8k"
    question_field: ClassVar[str] = "question"
    accuracy_reward: ClassVar[str] = "gsm8k_correct"

    source: str | Mapping[str, str] = "openai/gsm8k"
    hub_config: str | None = "main"
    reward_funcs: list[RewardFunc] = field(default_factory=lambda: [gsm8k_correct, boxed_format])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.1])

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        question = str(require(row, "question", where)).strip()
        worked, _, gold = str(require(row, "answer", where)).rpartition("####")
        gold = gold.strip().replace(",", "")
        if not gold:
            raise ValueError(f"{where}: field 'answer' has no final answer after '####'")
        solution = _CALCULATOR.sub("", worked).strip()
        return {"question": question, "answer": gold, "solution": solution}
