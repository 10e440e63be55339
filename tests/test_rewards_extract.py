"""Answer extraction shared by all tasks."""

import pytest

from unmask.rewards.extract import answer_tag, completion_text, last_boxed, last_number


def test_completion_text_accepts_strings_and_messages() -> None:
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "xyz"}]) == "xyz"
    assert completion_text(None) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>12</answer>", "12"),
        ("<answer>1</answer> then <answer>\n 2 \n</answer>", "2"),
        ("<reasoning>x</reasoning><answer>3+4", "3+4"),  # truncated: up to the end
        ("<answer></answer>", ""),
        ("no tags", None),
    ],
)
def test_answer_tag(text: str, expected: str | None) -> None:
    assert answer_tag(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{18}.", "18"),
        ("\\boxed{1} and \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),
        ("\\boxed{3} then \\boxed{4", "3"),  # an unclosed last box falls back to a complete one
        ("\\boxed{", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("she pays $1,250 in total", "1250"),
        ("5 - 3 = 2", "2"),
        ("it is -7 degrees", "-7"),
        ("5-3", "3"),
        ("x = 2.50.", "2.50"),
        ("١٢ apples", None),  # ASCII digits only
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected
