"""The code task: layouts, program extraction, and rewards from sandboxed test runs."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from unmask.config import ConfigError
from unmask.rewards.code import CodeJudge, CodeTests, extract_program, same_output
from unmask.sandbox import Sandbox, SandboxConfig
from unmask.sandbox.isolation import world_usable
from unmask.tasks import get_task

DATA = Path(__file__).parent / "data" / "code_tiny.jsonl"
# As root, the fallback (used where bubblewrap cannot run) needs an interpreter any uid can run.
PYTHON = sys.executable if world_usable(sys.executable) else "/usr/bin/python3"
SANDBOX = {
    "python": PYTHON,
    "site_packages": False,
    "workers": 2,
    "wall_slack": 1.0,
    "memory_mb": 512,
}


@pytest.fixture(scope="module")
def task():
    return get_task("code", source=str(DATA), sandbox=SANDBOX)


@pytest.fixture(scope="module")
def rows(task):
    return task.rows("train")


def columns_of(rows, repeat=1):
    return {k: [r[k] for r in rows for _ in range(repeat)] for k in rows[0]}


def score(task, rows, completions):
    return task.score([""] * len(completions), completions, columns_of(rows))


# Extraction.


def test_extract_program():
    fenced = "Idea.\n```python\nprint(1)\n```\nOr better:\n```py\nprint(2)\n```\n```text\nout\n```"
    assert extract_program(fenced) == "print(2)"
    assert extract_program("```\nx = 1\n```") == "x = 1"
    assert extract_program("print(3)\n") == "print(3)"  # no fence: the raw text
    assert extract_program("print(3)", "fenced") is None
    assert extract_program("```python\nprint(4)") is None  # cut off before the fence closed
    assert extract_program("see ```bash\nls\n```") is None
    assert extract_program([{"role": "assistant", "content": "```python\nx=2\n```"}]) == "x=2"
    assert extract_program("  ", "raw") is None
    with pytest.raises(ValueError, match="extract"):
        extract_program("x", "first")


def test_same_output_ignores_whitespace_only():
    assert same_output("1 2\n3\n", "1 2 3")
    assert not same_output("1 2 3", "1 23")


# Layouts.


def test_layouts_are_read(rows, task):
    add, total, plus, largest, kodcode, setup = rows
    assert add["test_method"] == "function" and len(add["test_list"]) == 3
    assert total["prefix"].startswith("from typing import List")
    assert plus["test_method"] == "stdio" and plus["test_output"] == ["3\n", "12\n", "0\n"]
    assert largest["test_time_limit"] == 1.0 and setup["test_time_limit"] == 2.0
    # KodCode: the pytest module is the setup; argument-free tests are the tests.
    assert kodcode["test_method"] == "function"
    assert kodcode["test_list"] == ["test_even()", "test_odd()", "TestEdge().test_zero()"]
    assert "from solution import is_even" in kodcode["test_setup"]
    assert setup["test_setup"] == "SCALE = 2"
    data = task.dataset("train")
    assert data[2]["prompt"] == f"{plus['question']}\n" and data[0]["target"] == add["solution"]
    chat = get_task("code", source=str(DATA), template="chat", sandbox=SANDBOX)
    assert "standard input" in chat.format_prompt(plus) and "```python" in chat.format_prompt(add)
    assert chat.format_target(add) == f"```python\n{add['solution']}\n```"


def test_max_tests_and_humaneval_check(tmp_path):
    path = tmp_path / "rows.jsonl"
    check = {"question": "q", "test": "def check(candidate):\n    assert candidate(1) == 1\n",
             "entry_point": "ident", "solution": "def ident(x):\n    return x"}  # fmt: skip
    path.write_text(json.dumps(check) + "\n" + DATA.read_text().splitlines()[0] + "\n")
    rows = get_task("code", source=str(path), max_tests=2, sandbox=SANDBOX).rows("train")
    assert rows[0]["test_list"] == ["check(ident)"]
    assert len(rows[1]["test_list"]) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"test_list": ["assert 1"]}, "row 0: missing field 'question'"),
        ({"question": "q"}, "no tests: expected field 'test_list'"),
        ({"question": "q", "test_method": "judge", "test_list": []}, "'test_method' must be"),
        ({"question": "q", "test_input": ["1"], "test_output": []}, "1 test_input but 0"),
        ({"question": "q", "test_input": "[1,", "test_output": "[]"}, "'test_input' is not a list"),
        ({"question": "q", "test_list": [["x"]]}, "'test_list' must be a list of strings"),
        ({"question": "q", "test": "def test_a(:\n"}, "'test_code' is not valid Python"),
        ({"question": "q", "test_list": ["x"], "test_time_limit": 0}, "'test_time_limit' must be"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 0") as err:
        get_task("code", source=str(path), sandbox=SANDBOX).rows("train")
    assert message in str(err.value)


def test_rows_without_runnable_tests_are_skipped(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    fixture_only = {"question": "q", "test": "def test_a(tmp_path):\n    pass\n"}
    path.write_text(json.dumps(fixture_only) + "\n" + DATA.read_text().splitlines()[0] + "\n")
    with caplog.at_level(logging.WARNING):
        rows = get_task("code", source=str(path), sandbox=SANDBOX).rows("train")
    assert len(rows) == 1 and "no runnable tests" in caplog.text


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"sandbox\.memory"):
        get_task("code", sandbox={"memory": 1})
    with pytest.raises(ValueError, match="time_limit"):
        get_task("code", time_limit=0)
    with pytest.raises(ValueError, match="extract"):
        get_task("code", extract="last")


# Rewards.


def test_reference_solutions_pass_and_wrong_ones_fail(task, rows):
    right = [f"```python\n{r['solution']}\n```" for r in rows]
    scores = score(task, rows, right)
    assert scores == {"code_all_passed": [1.0] * 6, "code_pass_rate": [1.0] * 6}
    partial = [
        "def add(a, b):\n    return a + b if a < 5 else 0",  # passes 2 of 3
        "```python\ndef total(xs):\n    return 0\n```",  # passes the empty-list test only
        "print(3)",  # right for the first input only
        "print(9)",  # right for the first input only
        "def is_even(n):\n    return n == 4",  # fails TestEdge().test_zero()
        "I don't know.",  # no program: nothing runs
    ]
    scores = score(task, rows, partial)
    assert scores["code_all_passed"] == [0.0] * 6
    assert scores["code_pass_rate"] == pytest.approx([2 / 3, 1 / 2, 1 / 3, 1 / 2, 2 / 3, 0.0])
    assert task.weighted_sum(scores)[0] == pytest.approx(0.5 * 2 / 3)


def test_reward_hacks_score_zero(task, rows):
    add = rows[:1]
    hacks = [
        "exit(0)",
        "import os\nos._exit(0)",
        "import sys\nsys.exit()",
        "print('All tests passed!')",
        "class Any:\n    def __eq__(self, other):\n        raise SystemExit(0)\n"
        "def add(a, b):\n    return Any()",
    ]
    task.judge.sandbox.start()
    if task.judge.sandbox.backend == "bwrap" or os.geteuid() == 0:  # else it could kill us
        hacks.append("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    rates = score(task, add * len(hacks), hacks)["code_pass_rate"]
    assert rates == [0.0] * len(hacks)


def test_batch_runs_once_and_skips_after_a_timeout(rows):
    sandbox = Sandbox(SandboxConfig(**SANDBOX))
    judge = CodeJudge(sandbox)
    runs = []
    real_run = sandbox.run
    sandbox.run = lambda job: runs.append(job) or real_run(job)  # type: ignore[method-assign]
    add = rows[:1]
    columns = columns_of(add, repeat=3)
    completions = ["def add(a, b):\n    return a + b"] * 2 + ["while True:\n    pass"]
    first = judge.code_pass_rate([""] * 3, completions, **columns)
    second = judge.code_all_passed([""] * 3, completions, **columns)
    assert first == [1.0, 1.0, 0.0] and second == [1.0, 1.0, 0.0]
    # Identical programs run once; the endless one runs one test, not three; nothing reruns.
    assert len(runs) == 3 + 1
    sandbox.close()


def test_malformed_columns_give_none(task, rows):
    columns = columns_of(rows[:1])
    columns["test_method"] = ["judge"]
    assert task.score([""], ["x = 1"], columns) == {
        "code_all_passed": [None],
        "code_pass_rate": [None],
    }
    with pytest.raises(ValueError, match="test_method"):
        CodeTests(method="judge", cases=("x",))
