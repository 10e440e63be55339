"""Math answer checking with math-verify, in worker processes with a hard per-answer timeout.

math-verify guards its parsing and comparison with ``signal.alarm``, which only works in a
main thread, and a pathological answer (a huge power, a deep expression) can stall sympy. So
every check runs in a small pool of worker processes (``_math_worker.py``), started lazily and
reused. An answer that overruns its timeout scores 0.0, its worker is killed and replaced, and
the other answers of the batch are still checked. The pool is closed at exit, or by
:func:`close`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.rewards.extract import completion_text, last_boxed

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")
MAX_START_FAILURES = 3


def as_latex(answer: str) -> str:
    """Wrap a bare answer in ``$...$``: math-verify parses bare LaTeX to nothing."""
    return f"${answer.strip().strip('$').strip()}$"


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    job: int | None = None
    deadline: float = float("inf")
    buffer: bytes = field(default=b"")


class MathVerifier:
    """A pool of ``workers`` verification processes; each answer gets ``timeout`` seconds.

    ``check`` (``"module:function"``, called as ``f(gold, pred, timeout) -> float | None``)
    replaces math-verify, e.g. to test timeouts; its module must be importable from
    ``sys.path``. Thread-safe; a forked child starts its own workers.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout: float = 5.0,
        check: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if workers < 1 or timeout <= 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {workers} and {timeout}")
        self.workers = workers
        self.timeout = timeout
        self.check = check
        self.start_timeout = start_timeout
        self._pool: list[_Worker] = []
        self._start_failures = 0  # in a row: a broken install fails every time
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        """For each ``(gold, pred)`` LaTeX pair: 1.0 equal, 0.0 not or timed out, None if the
        gold does not parse or the check failed."""
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's pipes are not ours to use
                self._pool, self._pid = [], os.getpid()
            try:
                return self._run(pairs)
            except BaseException:  # no worker may carry a job of this call into the next
                for worker in self._pool:
                    self._kill(worker)
                self._pool, self._start_failures = [], 0
                raise

    def close(self) -> None:
        """Stop all workers (they exit when their stdin closes; stragglers are killed)."""
        with self._lock:
            pool, self._pool = self._pool, []
            if os.getpid() != self._pid:
                return
            for worker in pool:
                if worker.proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        worker.proc.stdin.close()
            for worker in pool:
                try:
                    worker.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._kill(worker)

    def _run(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
        results: list[float | None] = [None] * len(pairs)
        todo = deque(range(len(pairs)))
        while todo or any(w.job is not None for w in self._pool):
            while len(self._pool) < self.workers:
                self._pool.append(self._start())
            for worker in list(self._pool):
                if todo and worker.ready and worker.job is None:
                    index = todo.popleft()
                    if not self._send(worker, index, pairs[index]):
                        todo.appendleft(index)
            self._poll(results)
        return results

    def _start(self) -> _Worker:
        command = [sys.executable, "-P", str(WORKER_SCRIPT)]
        command += ["--timeout", str(max(1, int(self.timeout / 2)))]
        env = None
        if self.check is not None:
            command += ["--check", self.check]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return _Worker(proc=proc, started=time.monotonic())

    def _send(self, worker: _Worker, index: int, pair: tuple[str, str]) -> bool:
        """Hand one job to an idle worker; False (worker dropped) if it died while idle."""
        job = json.dumps({"id": index, "gold": pair[0], "pred": pair[1]}) + "\n"
        assert worker.proc.stdin is not None
        try:
            worker.proc.stdin.write(job.encode())
            worker.proc.stdin.flush()
        except OSError:
            self._drop(worker)
            return False
        worker.job, worker.deadline = index, time.monotonic() + self.timeout
        return True

    def _poll(self, results: list[float | None]) -> None:
        """Wait for the next message or deadline, then handle replies, deaths and overruns."""
        now = time.monotonic()
        waiting = [w for w in self._pool if w.job is not None or not w.ready]
        deadline = min((self._deadline(w) for w in waiting), default=now)
        with selectors.DefaultSelector() as selector:
            for worker in waiting:
                assert worker.proc.stdout is not None
                selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
            events = selector.select(max(0.0, deadline - now)) if waiting else []
        for key, _ in events:
            self._read(key.data, results)
        now = time.monotonic()
        for worker in list(self._pool):
            if worker.job is not None and now > worker.deadline:
                logger.warning(
                    "math verification of answer %d took over %.1f s: scored 0.0, worker restarted",
                    worker.job,
                    self.timeout,
                )
                results[worker.job] = 0.0
                self._drop(worker)
            elif not worker.ready and now > worker.started + self.start_timeout:
                self._drop(worker)
                raise RuntimeError(f"math verification worker not ready in {self.start_timeout} s")

    def _deadline(self, worker: _Worker) -> float:
        """When a busy worker must answer, or a starting one be ready."""
        return worker.deadline if worker.ready else worker.started + self.start_timeout

    def _read(self, worker: _Worker, results: list[float | None]) -> None:
        assert worker.proc.stdout is not None
        chunk = os.read(worker.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            self._lost(worker, results)
            return
        worker.buffer += chunk
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            message: dict[str, Any] = json.loads(line)
            if message.get("ready"):
                worker.ready, self._start_failures = True, 0
                continue
            results[message["id"]] = message["value"]
            if "error" in message:
                logger.debug("math check of answer %d failed: %s", message["id"], message["error"])
            worker.job, worker.deadline = None, float("inf")

    def _lost(self, worker: _Worker, results: list[float | None]) -> None:
        """A worker's stdout closed: it exited or was killed."""
        self._drop(worker)
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                raise RuntimeError(
                    f"math verification workers stopped during start-up {MAX_START_FAILURES} "
                    f"times in a row; is math-verify installed for {sys.executable}?"
                )
            logger.warning("math verification worker stopped during start-up; restarting it")
        elif worker.job is not None:
            logger.warning("math verification worker died on answer %d: scored 0.0", worker.job)
            results[worker.job] = 0.0

    def _drop(self, worker: _Worker) -> None:
        if worker in self._pool:
            self._pool.remove(worker)
        self._kill(worker)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        worker.proc.kill()
        worker.proc.wait()
        for pipe in (worker.proc.stdin, worker.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # unflushed bytes to a dead worker
                    pipe.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def get_verifier() -> MathVerifier:
    """The shared verifier used by the math rewards (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
        return _default


def set_verifier(verifier: MathVerifier | None) -> None:
    """Replace the shared verifier (None: a default one on next use); closes the old one."""
    global _default
    with _default_lock:
        old, _default = _default, verifier
    if old is not None and old is not verifier:
        old.close()


def close() -> None:
    """Stop the shared verifier's workers."""
    set_verifier(None)


atexit.register(close)


def verify_answers(golds: Sequence[Any], preds: Sequence[str | None]) -> list[float | None]:
    """Check bare answers against bare golds: 0.0 where there is no prediction, None where
    there is no gold, else the verifier's verdict."""
    results: list[float | None] = [None] * len(preds)
    pairs: list[tuple[str, str]] = []
    where: list[int] = []
    for i, (gold, pred) in enumerate(zip(golds, preds, strict=True)):
        if gold is None or not str(gold).strip():
            continue
        if pred is None or not pred.strip():
            results[i] = 0.0
            continue
        pairs.append((as_latex(str(gold)), as_latex(pred)))
        where.append(i)
    for i, value in zip(where, get_verifier().verify(pairs), strict=True):
        results[i] = value
    return results


def boxed_format(prompts: list[str], completions: list[Any], **_: Any) -> list[float | None]:
    """1.0 if the completion gives a ``\\boxed{}`` answer (format shaping), else 0.0."""
    return [0.0 if last_boxed(completion_text(c)) is None else 1.0 for c in completions]
