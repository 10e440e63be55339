"""Math verification in worker processes: verdicts, timeouts, crashes, and the math rewards."""

import os
import textwrap
import time
from pathlib import Path

import pytest

from unmask.rewards.math import MathVerifier, as_latex, boxed_format, set_verifier, verify_answers
from unmask.tasks.gsm8k import gsm8k_correct
from unmask.tasks.math500 import math_correct

# A stand-in for math-verify: instant unless the answer asks to be slow, crash or fail.
CHECK_MODULE = """
import os
import time


def check(gold, pred, timeout):
    if "slow" in pred:
        time.sleep(60)
    if "crash" in pred:
        os._exit(3)
    if "boom" in pred:
        raise RuntimeError("boom")
    return 1.0 if gold == pred else 0.0
"""


@pytest.fixture
def fake_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "unmask_fake_check.py").write_text(textwrap.dedent(CHECK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "unmask_fake_check:check"


@pytest.fixture
def verifier(fake_check: str):
    pool = MathVerifier(workers=2, timeout=1.0, check=fake_check)
    yield pool
    pool.close()


def test_slow_answer_times_out_and_others_survive(verifier: MathVerifier) -> None:
    verifier.verify([("a", "a")])  # start the workers outside the timed part
    pids = {w.proc.pid for w in verifier._pool}
    start = time.monotonic()
    results = verifier.verify([("a", "a"), ("a", "slow"), ("b", "b"), ("a", "b"), ("c", "c")])
    elapsed = time.monotonic() - start
    assert results == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert elapsed < 3.0
    assert verifier.verify([("a", "a")]) == [1.0]  # the pool still works
    assert pids - {w.proc.pid for w in verifier._pool}  # the stuck worker was replaced


def test_crash_scores_zero_and_error_scores_none(verifier: MathVerifier) -> None:
    assert verifier.verify([("a", "crash"), ("a", "boom"), ("a", "a")]) == [0.0, None, 1.0]
    assert verifier.verify([("x", "x")]) == [1.0]


def test_worker_that_died_while_idle_is_replaced(verifier: MathVerifier) -> None:
    deadline = time.monotonic() + 30
    while not (verifier._pool and all(w.ready for w in verifier._pool)):
        assert time.monotonic() < deadline
        verifier.verify([("a", "a")] * 4)
    for worker in verifier._pool:
        worker.proc.kill()
        worker.proc.wait()
    assert verifier.verify([("a", "a"), ("b", "c")]) == [1.0, 0.0]


def test_close_stops_workers(verifier: MathVerifier) -> None:
    verifier.verify([("a", "a")])
    procs = [w.proc for w in verifier._pool]
    verifier.close()
    assert all(p.poll() is not None for p in procs)
    assert verifier.verify([("a", "a")]) == [1.0]  # restarts lazily


def test_worker_that_cannot_start_is_a_clear_error() -> None:
    pool = MathVerifier(workers=1, timeout=1.0, check="no_such_module_xyz:check")
    with pytest.raises(RuntimeError, match="start-up"):
        pool.verify([("a", "a")])
    pool.close()


def test_reward_times_out_through_the_shared_verifier(fake_check: str) -> None:
    set_verifier(MathVerifier(workers=1, timeout=1.0, check=fake_check))
    try:
        start = time.monotonic()
        scores = math_correct(["q", "q"], ["\\boxed{slow}", "\\boxed{5}"], answer=["5", "5"])
        assert scores == [0.0, 1.0]
        assert time.monotonic() - start < 5.0
    finally:
        set_verifier(None)


def test_as_latex() -> None:
    assert as_latex(" 18 ") == "$18$"
    assert as_latex("$\\frac{1}{2}$") == "$\\frac{1}{2}$"


def test_verify_answers_with_math_verify() -> None:
    golds = ["18", "\\frac{1}{2}", "3", "", "7", "\\frac{\\sqrt{2}}{2}"]
    preds = ["18.00", "0.5", "4", "1", None, "\\frac{1}{\\sqrt{2}}"]
    assert verify_answers(golds, preds) == [1.0, 1.0, 0.0, None, 0.0, 1.0]


def test_pathological_answer_returns_within_timeout() -> None:
    start = time.monotonic()
    assert verify_answers(["1"], ["9^{9^{9^{9}}}"]) == [0.0]
    assert time.monotonic() - start < 10.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("So she makes 9*2 = 18 dollars. \\boxed{18}", 1.0),
        ("<reasoning>9*2</reasoning>\n<answer>\n\\boxed{18}\n</answer>", 1.0),
        ("<answer>18</answer>", 1.0),
        ("<answer>The answer is $18.00</answer>", 1.0),
        ("16-3-4 = 9 and 9*2 = 18", 1.0),  # last-number fallback
        ("\\boxed{17}", 0.0),
        ("\\boxed{18} no wait \\boxed{20}", 0.0),
        ("", 0.0),
        ("no number at all", 0.0),
        ("١٨", 0.0),
    ],
)
def test_gsm8k_correct(completion: str, expected: float) -> None:
    assert gsm8k_correct(["q"], [completion], answer=["18"]) == [expected]


def test_gsm8k_correct_thousands_and_messages() -> None:
    completions = ["\\boxed{1,000}", [{"role": "assistant", "content": "\\boxed{1000}"}]]
    assert gsm8k_correct(["q", "q"], completions, answer=["1000", "1000"]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("thus \\boxed{\\frac{14}{3}}", "\\frac{14}{3}", 1.0),
        ("<answer>\\boxed{4.67}</answer>", "\\frac{14}{3}", 0.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
        ("the answer is 5", "5", 0.0),  # MATH needs a box or an answer tag
        ("", "5", 0.0),
    ],
)
def test_math_correct(completion: str, gold: str, expected: float) -> None:
    assert math_correct(["q"], [completion], answer=[gold]) == [expected]


def test_boxed_format() -> None:
    assert boxed_format(["q"] * 3, ["\\boxed{1}", "1", "\\boxed{"]) == [1.0, 0.0, 0.0]


def test_forked_child_does_not_reuse_parent_workers(verifier: MathVerifier) -> None:
    verifier.verify([("a", "a")])
    pid = os.fork()
    if pid == 0:  # child: must start its own workers, not write to the parent's pipes
        code = 1
        try:
            code = 0 if verifier.verify([("b", "b")]) == [1.0] else 1
            verifier.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert verifier.verify([("a", "a")]) == [1.0]
