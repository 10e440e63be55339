"""MATH-500: local files, gold answers, chat template through a tokenizer, scoring."""

import json
from pathlib import Path

import pytest

from unmask.tasks import Math500Task

ROWS = [
    {
        "problem": "What is $\\frac{28}{6}$ in lowest terms?",
        "solution": "Divide by 2: $\\boxed{\\frac{14}{3}}$.",
        "answer": "\\frac{14}{3}",
        "subject": "Prealgebra",
        "level": 1,
    },
    {
        "problem": "Compute $1+1$.",
        "solution": "It is $\\boxed{2}$.",
        "subject": "Algebra",
        "level": 1,
    },
]


class ChatTokenizer:
    """Just enough of a tokenizer: a chat template and apply_chat_template."""

    chat_template = "fake"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<|user|>{messages[0]['content']}<|assistant|>"


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def test_rows_keep_extra_columns_and_derive_missing_answers(source: str) -> None:
    data = Math500Task(source=source).dataset("test")
    assert data["answer"] == ["\\frac{14}{3}", "2"]
    assert data["level"] == [1, 1] and data["subject"] == ["Prealgebra", "Algebra"]
    assert data["prompt"][0] == ROWS[0]["problem"] + "\n"
    assert data["target"][0] == ROWS[0]["solution"]  # already ends in a boxed answer


def test_chat_template_goes_through_the_tokenizer(source: str) -> None:
    data = Math500Task(source=source, template="chat", tokenizer=ChatTokenizer()).dataset("test")
    assert data["prompt"][1].startswith("<|user|>Compute $1+1$.")
    assert data["prompt"][1].endswith("inside <answer> </answer>.<|assistant|>")
    assert data["target"][1].endswith("<answer>\n\\boxed{2}\n</answer>")


def test_tokenizer_without_chat_template_is_an_error() -> None:
    class Plain:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        Math500Task(template="chat", tokenizer=Plain())


def test_score(source: str) -> None:
    task = Math500Task(source=source)
    data = task.dataset("test")
    completions = ["so $\\boxed{4\\frac{2}{3}}$", "<answer>3</answer>"]
    scores = task.score(data["prompt"], completions, {"answer": data["answer"]})
    assert scores == {"math_correct": [1.0, 0.0], "boxed_format": [1.0, 0.0]}
    assert task.weighted_sum(scores) == [1.1, 0.0]


def test_missing_answer_and_box_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl row 0: missing field 'answer'"):
        Math500Task(source=str(path)).rows("test")
