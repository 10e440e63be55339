"""Run untrusted Python programs, one test per process, under limits and isolation.

A :class:`Sandbox` starts lazily: it asks the interpreter for its install prefixes (the only
host paths bubblewrap shows besides the system directories), picks the backend with a probe
run, and, as root, leases unprivileged uids for its workers. Each :class:`Job` then runs as a
fresh process: the harness (``_harness.py``) reads the job from stdin, drops to the worker's
uid, applies the rlimits and runs the program. The parent enforces the wall clock and the
output cap, kills whatever the run left behind, and decides the result from outside: a
function test passes only if the harness printed the run's one-time token after the test
finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unmask.sandbox.config import SandboxConfig
from unmask.sandbox.isolation import (
    UIDS_PER_WORKER,
    WORKDIR,
    UidLeases,
    bwrap_argv,
    kill_uid,
    user_processes,
    wait_idle,
    world_usable,
)

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("_harness.py")
PROBE = ("import fractions\nx = fractions.Fraction(1, 3)\n", "assert x * 3 == 1\n")
READ_SIZE = 1 << 16
POLL = 0.05  # seconds between checks whether the program has exited


@dataclass(frozen=True)
class Job:
    """One program run: ``stdio`` feeds ``stdin`` to the program as ``__main__``; ``function``
    imports it as module ``solution``, then runs ``setup`` and ``test`` after it.
    ``time_limit`` (seconds) is the CPU time; the wall clock gets ``wall_slack`` more."""

    program: str
    mode: Literal["stdio", "function"] = "stdio"
    stdin: str = ""
    setup: str = ""
    test: str = ""
    time_limit: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("stdio", "function"):
            raise ValueError(f"Job.mode must be 'stdio' or 'function', got {self.mode!r}")
        if not self.time_limit > 0:
            raise ValueError(f"Job.time_limit must be > 0, got {self.time_limit!r}")


@dataclass(frozen=True)
class RunResult:
    """How a run ended. ``status``: ``ok`` (exit 0), ``error`` (non-zero exit, including a
    Python exception or a ``MemoryError`` at the memory limit), ``timeout`` (wall clock),
    ``cpu_time`` (CPU limit), ``killed`` (another signal), ``output_limit`` (stdout plus
    stderr over the cap). ``completed``: a stdio program exited 0; a function test finished
    and the harness, not the program, said so."""

    status: str
    completed: bool
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


class Sandbox:
    """Runs :class:`Job` s in isolated processes; thread-safe; see docs/sandbox.md."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.backend: str | None = None  # "bwrap" or "fallback" once started
        self._kind = "fallback"  # the backend runs use (set while probing, before ``backend``)
        self.network_isolated = False
        self._lock = threading.RLock()
        self._python: list[str] = []
        self._bwrap: list[str] = []
        self._leases: UidLeases | None = None
        self._slots: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._busy = threading.BoundedSemaphore(self.config.workers)
        self._root = os.geteuid() == 0

    # Public API.

    def run(self, job: Job) -> RunResult:
        """Run one job on a free worker (blocks while all ``workers`` are busy)."""
        self.start()
        with self._busy:
            uid = self._slots.get()  # as root, the uid that has rested longest
            try:
                if uid is not None and not wait_idle(uid):
                    logger.warning("sandbox uid %d still has processes from an earlier run", uid)
                return self._run(job, uid)
            finally:
                self._slots.put(uid)

    def run_many(self, jobs: Sequence[Job]) -> list[RunResult]:
        """Run ``jobs`` on at most ``workers`` processes at once; results in job order."""
        self.start()
        if not jobs:
            return []
        with ThreadPoolExecutor(min(self.config.workers, len(jobs))) as pool:
            return list(pool.map(self.run, jobs))

    def start(self) -> None:
        """Find the interpreter and the backend (once); raises if no backend works."""
        with self._lock:
            if self.backend is None:
                self._start()

    def close(self) -> None:
        """Give the leased uids back (the sandbox starts again on the next run)."""
        with self._lock:
            if self._leases is not None:
                self._leases.release()
            self._leases, self.backend = None, None
            self._slots = queue.SimpleQueue()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Start-up.

    def _start(self) -> None:
        cfg = self.config
        python = cfg.python or sys.executable
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ValueError(f"sandbox.python: {python!r} is not an executable file")
        self._python = [python, "-I", "-B", "-X", "utf8"] + ([] if cfg.site_packages else ["-S"])
        self._python += ["-c", HARNESS.read_text()]
        if self._root:
            self._leases = UidLeases(cfg.uid_base, cfg.workers * UIDS_PER_WORKER)
        uids: list[int | None] = list(self._leases.uids) if self._leases else [None] * cfg.workers
        try:
            reason = "sandbox.backend is fallback"
            if cfg.backend != "fallback":
                reason = self._try_bwrap(python, uids[0])
            if reason is not None and cfg.backend == "bwrap":
                raise RuntimeError(f"sandbox.backend is bwrap but bubblewrap cannot run: {reason}")
            if reason is not None:
                self._start_fallback(uids[0], reason)
        except BaseException:
            self.close()
            raise
        self.backend = self._kind
        for uid in uids:
            self._slots.put(uid)

    def _try_bwrap(self, python: str, uid: int | None) -> str | None:
        """None if a probe run under bubblewrap passes, else why not."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        try:
            readonly = _install_paths(python)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise ValueError(f"sandbox.python: cannot run {python!r}: {exc}") from exc
        readonly += [os.path.abspath(p) for p in self.config.readonly_paths]
        self._bwrap = bwrap_argv(bwrap, readonly, self.config.workdir_mb << 20, self._root)
        self._kind, self.network_isolated = "bwrap", True
        result = self._probe(uid)
        if result.completed:
            return None
        return f"the probe run failed ({result.status}, exit {result.returncode}): " + (
            result.stderr.strip()[-500:] or "no message"
        )

    def _start_fallback(self, uid: int | None, reason: str) -> None:
        self._kind = "fallback"
        for isolated in [True, False] if self._root else [False]:
            self.network_isolated = isolated  # as root the harness can unshare the network
            result = self._probe(uid)
            if result.completed:
                break
        else:
            hint = ""
            if self._root and not world_usable(self._python[0]):
                hint = (f"; sandbox.python {self._python[0]} is not usable by other users, as "
                        "the fallback needs when run as root (try /usr/bin/python3)")  # fmt: skip
            raise RuntimeError(
                f"the fallback sandbox cannot run programs ({result.status}): "
                f"{result.stderr.strip()[-500:]}{hint}"
            )
        missing = [] if self.network_isolated else ["the network"]
        if not self._root:
            missing.append("the user's own files and processes (programs run as this user)")
        logger.warning(
            "code sandbox: bubblewrap not used (%s). Falling back to WEAKER isolation: resource "
            "limits and a temporary work directory; programs see the file system with their "
            "uid's permissions; not isolated: %s. See docs/sandbox.md.",
            reason,
            ", ".join(missing) or "nothing more",
        )

    def _probe(self, uid: int | None) -> RunResult:
        return self._run(Job(program=PROBE[0], mode="function", test=PROBE[1], time_limit=5), uid)

    # One run.

    def _run(self, job: Job, uid: int | None) -> RunResult:
        cfg = self.config
        token = secrets.token_hex(16)
        header = json.dumps({
            "mode": job.mode, "program": job.program, "setup": job.setup, "test": job.test,
            "token": token, "uid": uid, "limits": self._limits(job),
            "unshare_net": self._kind == "fallback" and self.network_isolated,
        }).encode()  # fmt: skip
        payload = b"%016d" % len(header) + header + job.stdin.encode()
        bwrap = self._kind == "bwrap"
        workdir = WORKDIR if bwrap else tempfile.mkdtemp(prefix="unmask-sandbox-")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # fmt: skip
        argv = self._bwrap + self._python if bwrap else self._python
        began = time.monotonic()
        deadline = began + job.time_limit + cfg.wall_slack
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=None if bwrap else workdir, env=env, start_new_session=True,
            )  # fmt: skip
            try:
                captured = _communicate(proc, payload, deadline, cfg.max_output_kb << 10)
                seconds = time.monotonic() - began
            finally:
                self._clean_up(proc, uid)
        finally:
            if not bwrap:
                _remove_tree(workdir)
        status = _status(captured, proc.returncode, bwrap)
        stdout, marker = captured.stdout.decode("utf-8", "replace"), f"\n{token}\n"
        completed = status == "ok" and (job.mode == "stdio" or marker in stdout)
        stdout, stderr = stdout.replace(marker, ""), captured.stderr.decode("utf-8", "replace")
        return RunResult(status, completed, proc.returncode, stdout, stderr, seconds)

    def _limits(self, job: Job) -> dict[str, tuple[int, int]]:
        cfg = self.config
        cpu = max(1, math.ceil(job.time_limit))
        processes = cfg.max_processes
        if self._kind == "bwrap" and not self._root:
            processes += 1  # bubblewrap's init process, counted in the new user namespace
        elif not self._root:  # the limit counts every process of the user, not just this run's
            processes += sum(user_processes(os.getuid()).values())
        return {
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (cfg.memory_mb << 20,) * 2,
            "RLIMIT_NPROC": (processes,) * 2,
            "RLIMIT_FSIZE": (cfg.max_file_mb << 20,) * 2,
            "RLIMIT_NOFILE": (cfg.max_open_files,) * 2,
            "RLIMIT_CORE": (0, 0),
        }

    def _clean_up(self, proc: subprocess.Popen[bytes], uid: int | None) -> None:
        """Kill the run and everything it started: its session, and as root every process of
        its uid (that also catches processes that left the session)."""
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if uid is not None and not kill_uid(uid):
            logger.warning("sandbox uid %d still has live processes after a run", uid)


def _install_paths(python: str) -> list[str]:
    """The interpreter's prefixes and the real location of its executable, which bubblewrap
    must show (read-only) for the interpreter to start."""
    script = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix]))"
    answer = subprocess.run(
        [python, "-I", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    paths = [*json.loads(answer.stdout), os.path.dirname(os.path.realpath(python))]
    paths.append(os.path.dirname(os.path.abspath(python)))
    unique = sorted({os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths})
    if "/" in unique:
        raise ValueError("the interpreter is installed at / (nothing would be hidden)")
    return unique


@dataclass
class _Captured:
    """What a run wrote, and why reading stopped: ``exited``, ``output_limit`` or ``timeout``."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    ending: str = "exited"


def _communicate(
    proc: subprocess.Popen[bytes], payload: bytes, deadline: float, cap: int
) -> _Captured:
    """Feed stdin and read stdout/stderr until the process exits, the output passes ``cap``
    bytes or the ``deadline`` passes."""
    assert proc.stdin and proc.stdout and proc.stderr
    captured = _Captured()
    buffers = {proc.stdout.fileno(): captured.stdout, proc.stderr.fileno(): captured.stderr}
    stdin, view, total, exited = proc.stdin.fileno(), memoryview(payload), 0, False
    os.set_blocking(stdin, False)
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        selector.register(stdin, selectors.EVENT_WRITE)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                captured.ending = "timeout"
                return captured
            events = selector.select(0 if exited else min(POLL, deadline - now))
            if exited and not events:
                break  # drained; whatever still holds a pipe open is a straggler
            for key, _ in events:
                fd = key.fd
                if fd == stdin:
                    try:
                        view = view[os.write(stdin, view[:READ_SIZE]) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its stdin
                        view = view[:0]
                    if not view:
                        selector.unregister(stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    selector.unregister(fd)
                buffers[fd] += chunk
                total += len(chunk)
                if total > cap:
                    captured.ending = "output_limit"
                    return captured
            exited = exited or proc.poll() is not None
    try:  # both pipes are closed, but the program may still run
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        captured.ending = "timeout"
    return captured


def _remove_tree(path: str) -> None:
    """Delete a fallback work directory, even one whose subfolders the program made
    unreadable (never following its symlinks out of the directory)."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _status(captured: _Captured, code: int | None, bwrap: bool) -> str:
    if captured.ending != "exited":
        return captured.ending
    if code == 0:
        return "ok"
    signum = -code if code is not None and code < 0 else None
    if bwrap and code is not None and code > 128:  # bubblewrap reports a signal as 128 + n
        signum = code - 128
    if signum == signal.SIGXCPU:
        return "cpu_time"
    return "error" if signum is None else "killed"
