"""Finding the answer inside a completion: ``<answer>`` tags, ``\\boxed{}``, the last number.

Shared by every task so that the plain format (a bare answer) and the chat formats
(``<answer>...</answer>``, ``\\boxed{...}``) are read the same way everywhere. Digits are ASCII
only: ``\\d`` would also match Arabic-Indic or full-width digits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_NUMBER = re.compile(r"(?<![0-9A-Za-z)])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_BOXED = "\\boxed"


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational ``[{"content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    return "" if completion is None else str(completion)


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>`` block (to ``</answer>`` or the end), stripped."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    body = text[start + len("<answer>") :]
    end = body.find("</answer>")
    return (body if end < 0 else body[:end]).strip()


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (balanced braces); None if there is none."""
    start = text.rfind(_BOXED + "{")
    while start >= 0:
        depth = 0
        begin = start + len(_BOXED) + 1
        for i in range(begin - 1, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[begin:i].strip()
        start = text.rfind(_BOXED + "{", 0, start)
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed (``1,000`` -> ``1000``)."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None
