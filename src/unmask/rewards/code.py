"""Code rewards: the program a completion proposes, run against its row's tests in the sandbox.

A row's tests are either ``function`` tests (snippets such as ``assert f(2) == 4`` run after
the program, MBPP / HumanEval / KodCode style) or ``stdio`` tests (an input and the expected
output, PrimeIntellect / LiveCodeBench style). Every test is a separate sandboxed run
(:mod:`unmask.sandbox`); a function test's verdict comes from a test process that calls the
program across a pipe with plain data, a stdio test's from comparing its output here. The
rewards are the fraction of tests passed and whether all passed; one batch runs once (cached
by program and tests, so the second reward of :meth:`Task.score` costs nothing), on at most
``sandbox.workers`` processes at a time.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from unmask.rewards.extract import completion_text
from unmask.sandbox import Job, RunResult, Sandbox, SandboxConfig

logger = logging.getLogger(__name__)

EXTRACT_MODES = ("auto", "fenced", "raw")
TEST_METHODS = ("function", "stdio")
PYTHON_TAGS = frozenset({"", "python", "python3", "py", "py3"})
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_GAVE_UP = ("timeout", "cpu_time")  # out of time on the first test: the others are skipped


def extract_program(completion: Any, mode: str = "auto") -> str | None:
    """The program a completion proposes, or None.

    ``fenced``: the last complete fenced block tagged ``python`` (or ``py``, or untagged);
    ``raw``: the whole text; ``auto``: fenced when the text has a fence, else raw.
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {mode!r}")
    text = completion_text(completion)
    if mode == "raw" or (mode == "auto" and "```" not in text):
        return text.strip() or None
    blocks = [body for tag, body in _FENCE.findall(text) if tag.lower() in PYTHON_TAGS]
    return (blocks[-1].strip() or None) if blocks else None


def same_output(actual: str, expected: str) -> bool:
    """Outputs are equal up to whitespace (dLLM-RL's ``split()`` comparison)."""
    return actual.split() == expected.split()


@dataclass(frozen=True)
class CodeTests:
    """One row's tests. ``cases``: the test snippets (function) or the inputs (stdio);
    ``expected``: the stdio outputs; ``setup`` runs before each function test; ``prefix`` is
    put before the program (HumanEval's imports and signature); ``time_limit`` in seconds."""

    method: str
    cases: tuple[str, ...]
    expected: tuple[str, ...] = ()
    setup: str = ""
    prefix: str = ""
    time_limit: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in TEST_METHODS:
            raise ValueError(f"test_method must be one of {TEST_METHODS}, got {self.method!r}")
        if not self.cases:
            raise ValueError("a code row needs at least one test")
        if self.method == "stdio" and len(self.expected) != len(self.cases):
            raise ValueError(
                f"{len(self.cases)} test inputs but {len(self.expected)} expected outputs"
            )
        if not self.time_limit > 0:
            raise ValueError(f"test_time_limit must be > 0, got {self.time_limit!r}")

    def jobs(self, program: str) -> list[Job]:
        """One sandbox job per test case of ``program`` (the shared prefix prepended)."""
        if self.prefix and not program.startswith(self.prefix):
            program = f"{self.prefix}\n{program}"
        if self.method == "stdio":
            return [Job(program, "stdio", stdin=c, time_limit=self.time_limit) for c in self.cases]
        return [
            Job(program, "function", setup=self.setup, test=c, time_limit=self.time_limit)
            for c in self.cases
        ]

    def passed(self, index: int, result: RunResult) -> bool:
        """Whether test case ``index`` passed, judged from the sandbox's result only."""
        if self.method == "function":
            return result.completed
        return result.completed and same_output(result.stdout, self.expected[index])


def tests_from_columns(columns: Mapping[str, Sequence[Any]], index: int) -> CodeTests | None:
    """Row ``index``'s tests from the code task's columns; None if the row is malformed."""
    try:
        method = columns["test_method"][index]
        cases = columns["test_list" if method == "function" else "test_input"][index]
        return CodeTests(
            method=method,
            cases=tuple(cases),
            expected=tuple(columns["test_output"][index]) if method == "stdio" else (),
            setup=columns.get("test_setup", [""] * (index + 1))[index] or "",
            prefix=columns.get("prefix", [""] * (index + 1))[index] or "",
            time_limit=float(columns["test_time_limit"][index]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        logger.warning("code row %d has no usable tests: %s", index, exc)
        return None


class CodeJudge:
    """Runs completions' programs against their tests; its methods ``code_pass_rate`` and
    ``code_all_passed`` are TRL-style reward functions over the code task's columns.

    ``skip_after_timeout``: a program that runs out of time on its first test fails the
    others without running them (an endless loop costs one time limit, not one per test).
    """

    def __init__(
        self,
        sandbox: Sandbox | SandboxConfig | None = None,
        extract: str = "auto",
        skip_after_timeout: bool = True,
        cache_size: int = 4096,
    ) -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {extract!r}")
        self.sandbox = sandbox if isinstance(sandbox, Sandbox) else Sandbox(sandbox)
        self.extract = extract
        self.skip_after_timeout = skip_after_timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, CodeTests], list[bool]] = OrderedDict()
        self._lock = threading.Lock()

    def judge(
        self, completions: Sequence[Any], tests: Sequence[CodeTests | None]
    ) -> list[list[bool] | None]:
        """Per completion, whether each test passed; None where the row has no tests. A
        completion without a program fails every test without running."""
        keys: list[tuple[str, CodeTests] | None] = []
        for completion, row in zip(completions, tests, strict=True):
            program = extract_program(completion, self.extract) if row is not None else None
            keys.append(None if row is None else (program or "", row))
        known: dict[tuple[str, CodeTests], list[bool]] = {}
        for key in keys:
            if key is not None and key[0] and key not in known:
                cached = self._cached(key)
                if cached is not None:
                    known[key] = cached
        todo = {k for k in keys if k is not None and k[0] and k not in known}
        known.update(self._run(sorted(todo, key=lambda k: (k[0], k[1].cases))))
        return [
            None if key is None else known[key] if key[0] else [False] * len(key[1].cases)
            for key in keys
        ]

    def code_pass_rate(
        self, prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        """Fraction of the row's tests the program passes."""
        return [
            None if r is None else sum(r) / len(r) for r in self._verdicts(completions, columns)
        ]

    def code_all_passed(
        self, prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        """1.0 if the program passes every test of its row (accuracy), else 0.0."""
        return [None if r is None else float(all(r)) for r in self._verdicts(completions, columns)]

    def _verdicts(
        self, completions: list[Any], columns: Mapping[str, Sequence[Any]]
    ) -> list[list[bool] | None]:
        tests = [tests_from_columns(columns, i) for i in range(len(completions))]
        return self.judge(completions, tests)

    def _cached(self, key: tuple[str, CodeTests]) -> list[bool] | None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            return None

    def _run(self, keys: list[tuple[str, CodeTests]]) -> dict[tuple[str, CodeTests], list[bool]]:
        """Run every test of ``keys``: the first test of each program, then (in parallel
        too) the others of programs whose first test did not run out of time."""
        jobs = {k: k[1].jobs(k[0]) for k in keys}
        verdicts = {k: [False] * len(jobs[k]) for k in keys}
        statuses: Counter[str] = Counter()

        def one(item: tuple[tuple[str, CodeTests], int]) -> RunResult:
            key, index = item
            result = self.sandbox.run(jobs[key][index])
            verdicts[key][index] = key[1].passed(index, result)
            return result

        if not keys:
            return verdicts
        self.sandbox.start()
        firsts = [(k, 0) for k in keys]
        total = sum(len(j) for j in jobs.values())
        with ThreadPoolExecutor(min(self.sandbox.config.workers, total)) as pool:
            results = list(pool.map(one, firsts))
            statuses.update(r.status for r in results)
            rest = [
                (k, i)
                for k, first in zip(keys, results, strict=True)
                if not (self.skip_after_timeout and first.status in _GAVE_UP)
                for i in range(1, len(jobs[k]))
            ]
            statuses.update(r.status for r in pool.map(one, rest))
        with self._lock:
            for key, values in verdicts.items():
                self._cache[key] = values
                self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        logger.debug("code tests on %s: %s", self.sandbox.backend, dict(statuses))
        return verdicts
