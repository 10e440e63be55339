"""Code: a problem, and tests the completion's program must pass in the sandbox.

Rows come in the layouts the code RL recipes use (mapped by ``field_map`` when the names
differ):

- dLLM-RL (PrimeIntellect, MBPP, HumanEval, LiveCodeBench files): ``question``,
  ``test_method`` (``function`` or ``stdio``), ``test_list`` (assert snippets) and optional
  ``prefix``, or ``test_input`` / ``test_output`` (lists of equal length), and
  ``test_time_limit`` (seconds).
- KodCode: ``question``, ``solution`` and ``test`` (read as ``test_code``), a pytest module
  that imports the program with ``from solution import f``. Each top-level ``test_*``
  function without arguments (and each ``Test*`` class's ``test_*`` method) is one test;
  tests that take fixtures or parameters are left out. A HumanEval-style ``check(candidate)``
  module with an ``entry_point`` is one test.
- MBPP's ``test_setup_code`` is read as ``test_setup`` (run before every function test).

Programs run in :mod:`unmask.sandbox`; the rewards are in :mod:`unmask.rewards.code`.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unmask.config import from_dict
from unmask.rewards.code import EXTRACT_MODES, TEST_METHODS, CodeJudge
from unmask.sandbox import Sandbox, SandboxConfig
from unmask.tasks.base import RewardFunc, Task, require

logger = logging.getLogger(__name__)


def _string_list(value: Any, name: str, where: str) -> list[str]:
    """A list of strings, from a list or its JSON text (numbers become their text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: field {name!r} is not a list or its JSON ({exc})") from exc
    if not isinstance(value, list) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{where}: field {name!r} must be a list of strings, got {value!r:.200}")
    return [str(v) for v in value]


def _no_arguments(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> bool:
    args = node.args
    positional = args.posonlyargs + args.args
    return (
        len(positional) == int(method)
        and not (args.vararg or args.kwonlyargs or args.kwarg)
        and not isinstance(node, ast.AsyncFunctionDef)
    )


def pytest_calls(module: str, where: str, entry_point: str | None = None) -> list[str]:
    """One call per runnable test of a pytest-style module (see the module docstring)."""
    try:
        tree = ast.parse(module)
    except SyntaxError as exc:
        raise ValueError(f"{where}: field 'test_code' is not valid Python ({exc.msg})") from exc
    calls: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            if _no_arguments(node, method=False):
                calls.append(f"{node.name}()")
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            calls += [
                f"{node.name}().{item.name}()"
                for item in node.body
                if isinstance(item, ast.FunctionDef)
                and item.name.startswith("test")
                and _no_arguments(item, method=True)
            ]
    defines_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    if not calls and defines_check and entry_point:
        calls.append(f"check({entry_point})")
    return calls


@dataclass(kw_only=True)
class CodeTask(Task):
    """Code problems with function or stdio tests from a local file or the hub (no generator).

    ``time_limit``: seconds per test where a row has no ``test_time_limit``; ``max_tests``
    keeps a row's first tests only (bounds the cost of rows with hundreds); ``extract``: how a
    completion's program is found (``auto``, ``fenced``, ``raw``; docs/sandbox.md);
    ``sandbox``: the :class:`~unmask.sandbox.SandboxConfig` (a mapping in YAML).
    """

    name: ClassVar[str] = "code"
    accuracy_reward: ClassVar[str] = "code_all_passed"
    default_field_map: ClassVar[Mapping[str, str]] = {
        "test": "test_code",
        "test_setup_code": "test_setup",
    }

    time_limit: float = 1.0
    max_tests: int | None = None
    extract: str = "auto"
    sandbox: SandboxConfig | Mapping[str, Any] = field(default_factory=SandboxConfig)
    reward_funcs: list[RewardFunc] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)
    judge: CodeJudge = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.sandbox, Mapping):
            self.sandbox = from_dict(SandboxConfig, dict(self.sandbox), "sandbox")
        if not isinstance(self.time_limit, (int, float)) or not self.time_limit > 0:
            raise ValueError(f"time_limit must be a positive number, got {self.time_limit!r}")
        if self.max_tests is not None and (
            not isinstance(self.max_tests, int) or self.max_tests < 1
        ):
            raise ValueError(
                f"max_tests must be a positive integer or None, got {self.max_tests!r}"
            )
        if self.extract not in EXTRACT_MODES:
            raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {self.extract!r}")
        self.judge = CodeJudge(Sandbox(self.sandbox), extract=self.extract)
        if not self.reward_funcs and not self.reward_weights:
            self.reward_funcs = [self.judge.code_all_passed, self.judge.code_pass_rate]
            self.reward_weights = [1.0, 0.5]
        super().__post_init__()

    def convert(self, row: dict[str, Any], where: str) -> dict[str, Any] | None:
        question = str(require(row, "question", where)).strip()
        method = row.get("test_method") or _infer_method(row, where)
        out: dict[str, Any] = {
            "question": question, "test_method": method, "test_list": [], "test_setup": "",
            "test_input": [], "test_output": [], "prefix": str(row.get("prefix") or ""),
            "test_time_limit": _time_limit(row.get("test_time_limit"), self.time_limit, where),
            "solution": str(row.get("solution") or "").strip(),
        }  # fmt: skip
        if method == "stdio":
            inputs = _string_list(require(row, "test_input", where), "test_input", where)
            outputs = _string_list(require(row, "test_output", where), "test_output", where)
            if len(inputs) != len(outputs):
                raise ValueError(
                    f"{where}: {len(inputs)} test_input but {len(outputs)} test_output entries"
                )
            out["test_input"], out["test_output"] = (
                inputs[: self.max_tests],
                outputs[: self.max_tests],
            )
        elif method == "function":
            if row.get("test_list") is not None:
                tests = _string_list(row["test_list"], "test_list", where)
                out["test_setup"] = str(row.get("test_setup") or "")
            else:
                module = str(require(row, "test_code", where))
                tests = pytest_calls(module, where, row.get("entry_point"))
                out["test_setup"] = module
            out["test_list"] = tests[: self.max_tests]
        else:
            raise ValueError(
                f"{where}: field 'test_method' must be one of {TEST_METHODS}, got {method!r}"
            )
        if not (out["test_list"] or out["test_input"]):
            logger.warning("%s: no runnable tests; row skipped", where)
            return None
        return out

    def plain_prompt(self, row: Mapping[str, Any]) -> str:
        return f"{row['question']}\n"

    def plain_target(self, row: Mapping[str, Any]) -> str:
        return row["solution"]

    def instruction(self, row: Mapping[str, Any]) -> str:
        io = "reads standard input, writes standard output and " * (row["test_method"] == "stdio")
        ask = f"Write one Python program that {io}solves this, in a ```python code block."
        return f"{row['question']}\n\n{ask}"

    def chat_target(self, row: Mapping[str, Any]) -> str:
        return f"```python\n{row['solution']}\n```" if row["solution"] else ""


def _infer_method(row: Mapping[str, Any], where: str) -> str:
    if row.get("test_list") is not None or row.get("test_code") is not None:
        return "function"
    if row.get("test_input") is not None:
        return "stdio"
    fields = ", ".join(sorted(str(k) for k in row))
    raise ValueError(
        f"{where}: no tests: expected field 'test_list', 'test_code' (KodCode 'test') or "
        f"'test_input'/'test_output' (fields: {fields})"
    )


def _time_limit(value: Any, default: float, where: str) -> float:
    if value is None:
        return float(default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(
            f"{where}: field 'test_time_limit' must be a positive number, got {value!r}"
        )
    return seconds
