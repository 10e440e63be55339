"""Run untrusted Python programs, one test per run, under limits and isolation.

A :class:`Sandbox` starts lazily: it asks the interpreter for its install prefixes (the only
host paths bubblewrap shows besides the system directories), picks the backend with a probe
run, and, as root, leases unprivileged uids for its workers. Each :class:`Job` then runs as
fresh processes of the harness (``_harness.py``), which reads its job from stdin, isolates
itself, drops to its uid and applies the rlimits. A stdio job is one process: the program,
whose output the parent compares. A function job is two: the program's process, which only
answers calls, and a separate test process that calls it over two pipes with plain data and
decides the verdict; the program never holds the test, an expected value or a secret. The
parent enforces the wall clock and the output cap, kills whatever the run left behind, and
reads the verdict from the test process alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unmask.sandbox.config import SandboxConfig
from unmask.sandbox.isolation import (
    PRIVATE_WORKDIR,
    SHARED_DIRS,
    UIDS_PER_WORKER,
    WORKDIR,
    UidLeases,
    bwrap_argv,
    kill_uid,
    remove_owned,
    user_processes,
    wait_idle,
    world_usable,
)
from unmask.sandbox.process import Child, communicate, exit_status, kill, remove_tree, settle

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("_harness.py")
PROBE = (
    "import fractions\ndef f(x):\n    return str(fractions.Fraction(x, 3) * 3)\n",
    "assert f(1) == '1'\n",
)
Uids = tuple[int | None, int | None]  # the program's and the test's


@dataclass(frozen=True)
class Job:
    """One program run: ``stdio`` feeds ``stdin`` to the program as ``__main__``; ``function``
    imports it as module ``solution`` and runs ``setup`` and ``test`` in a separate process
    that calls the program's functions. ``time_limit`` (seconds) is the CPU time of each
    process; the wall clock of the whole run gets ``wall_slack`` more."""

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
    """How a run ended. ``status``: ``ok`` (a stdio program exited 0, or a function test
    passed), ``error`` (a non-zero exit, an exception, a failed test, a ``MemoryError`` at the
    memory limit), ``timeout`` (wall clock), ``cpu_time`` (CPU limit), ``killed`` (another
    signal), ``output_limit`` (stdout plus stderr over the cap). ``completed``: a stdio
    program exited 0; a function test passed, as the test process (never the program) said.
    ``stdout`` and ``stderr`` are the program's (a function test's traceback is appended to
    ``stderr``); ``reason`` says why a function test failed."""

    status: str
    completed: bool
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str = ""


class Sandbox:
    """Runs :class:`Job` s in isolated processes; thread-safe; see docs/sandbox.md."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.backend: str | None = None  # "bwrap" or "fallback" once started
        self._kind = "fallback"  # the backend runs use (set while probing, before ``backend``)
        self.network_isolated = False
        self.private_mounts = False  # the fallback as root: fresh tmpfs on shared folders
        self._lock = threading.RLock()
        self._python: list[str] = []
        self._bwrap: list[str] = []
        self._leases: UidLeases | None = None
        self._slots: queue.SimpleQueue[Uids] = queue.SimpleQueue()
        self._busy = threading.BoundedSemaphore(self.config.workers)
        self._root = os.geteuid() == 0

    # Public API.

    def run(self, job: Job) -> RunResult:
        """Run one job on a free worker (blocks while all ``workers`` are busy)."""
        self.start()
        with self._busy:
            uids = self._slots.get()  # as root, the uids that have rested longest
            try:
                for uid in uids:
                    if uid is not None and not wait_idle(uid):
                        logger.warning("sandbox uid %d still has processes from a run", uid)
                return self._run(job, uids)
            finally:
                self._slots.put(uids)

    def run_many(self, jobs: Sequence[Job]) -> list[RunResult]:
        """Run ``jobs`` on at most ``workers`` workers at once; results in job order."""
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
        slots: list[Uids] = [(None, None)] * cfg.workers
        if self._root:
            self._leases = UidLeases(cfg.uid_base, cfg.workers * UIDS_PER_WORKER)
            pairs = iter(self._leases.uids)
            slots = list(zip(pairs, pairs, strict=True))
        try:
            reason = "sandbox.backend is fallback"
            if cfg.backend != "fallback":
                reason = self._try_bwrap(python, slots[0])
            if reason is not None and cfg.backend == "bwrap":
                raise RuntimeError(f"sandbox.backend is bwrap but bubblewrap cannot run: {reason}")
            if reason is not None:
                self._start_fallback(slots[0], reason)
        except BaseException:
            self.close()
            raise
        self.backend = self._kind
        for pair in slots:
            self._slots.put(pair)

    def _try_bwrap(self, python: str, uids: Uids) -> str | None:
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
        result = self._probe(uids)
        if result.completed:
            return None
        return f"the probe run failed ({result.status}, exit {result.returncode}): " + (
            result.stderr.strip()[-500:] or result.reason or "no message"
        )

    def _start_fallback(self, uids: Uids, reason: str) -> None:
        """The strongest fallback the kernel allows. As root: private network, mounts and IPC,
        else the network alone, else neither; not as root: none of them."""
        self._kind = "fallback"
        options = [(True, True), (True, False), (False, False)] if self._root else [(False, False)]
        for isolated, private in options:
            self.network_isolated, self.private_mounts = isolated, private
            result = self._probe(uids)
            if result.completed:
                break
        else:
            hint = ""
            if self._root and not world_usable(self._python[0]):
                hint = (f"; sandbox.python {self._python[0]} is not usable by other users, as "
                        "the fallback needs when run as root (try /usr/bin/python3)")  # fmt: skip
            raise RuntimeError(
                f"the fallback sandbox cannot run programs ({result.status}): "
                f"{result.stderr.strip()[-500:] or result.reason}{hint}"
            )
        missing = [] if self.network_isolated else ["the network"]
        if self._root and not self.private_mounts:
            missing.append("/tmp, /var/tmp, /dev/shm while a program runs (cleaned after it)")
        if not self._root:
            missing.append("the user's own files and processes (programs run as this user)")
        logger.warning(
            "code sandbox: bubblewrap not used (%s). Falling back to WEAKER isolation: resource "
            "limits and a temporary work directory; programs see the file system with their "
            "uid's permissions; not isolated: %s. See docs/sandbox.md.",
            reason,
            ", ".join(missing) or "nothing more",
        )

    def _probe(self, uids: Uids) -> RunResult:
        job = Job(program=PROBE[0], mode="function", test=PROBE[1], time_limit=5)
        return self._run(job, uids)

    # One run.

    def _run(self, job: Job, uids: Uids) -> RunResult:
        began = time.monotonic()
        deadline = began + job.time_limit + self.config.wall_slack
        if job.mode == "stdio":
            roles = [({"mode": "stdio", "program": job.program}, uids[0], job.stdin.encode())]
            pipes: list[int] = []
        else:
            requests, answers = os.pipe(), os.pipe()
            pipes = [*requests, *answers]
            roles = [
                ({"mode": "program", "program": job.program,
                  "channel": [requests[0], answers[1]]}, uids[0], b""),
                ({"mode": "test", "setup": job.setup, "test": job.test,
                  "channel": [requests[1], answers[0]]}, uids[1], b""),
            ]  # fmt: skip
        children: list[Child] = []
        workdirs: list[str] = []
        try:
            for role, uid, stdin in roles:
                children.append(self._spawn(job, role, uid, stdin, workdirs))
            for fd in pipes:  # the children hold their ends now
                os.close(fd)
            pipes = []
            ending = communicate(children, children[-1], deadline, self.config.max_output_kb << 10)
            if job.mode == "function" and _program_gone(children[1]):
                settle(children[0], deadline)
        finally:
            for fd in pipes:
                os.close(fd)
            self._clean_up(children, uids)
            for workdir in workdirs:
                remove_tree(workdir)
        return self._result(job, children, ending, time.monotonic() - began)

    def _spawn(
        self, job: Job, role: dict[str, Any], uid: int | None, stdin: bytes, workdirs: list[str]
    ) -> Child:
        """Start one harness process for ``role``, passing it only its own ends of the pipes;
        a work directory to remove after the run is added to ``workdirs``."""
        bwrap = self._kind == "bwrap"
        private = not bwrap and self.private_mounts
        if bwrap or private:
            workdir = WORKDIR if bwrap else PRIVATE_WORKDIR
        else:
            workdir = tempfile.mkdtemp(prefix="unmask-sandbox-")
            workdirs.append(workdir)
        header = json.dumps({
            **role, "uid": uid, "limits": self._limits(job),
            "unshare_net": not bwrap and self.network_isolated, "private_mounts": private,
            "private_dirs": SHARED_DIRS, "workdir": workdir,
            "workdir_bytes": self.config.workdir_mb << 20,
        }).encode()  # fmt: skip
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # fmt: skip
        popen = subprocess.Popen(
            self._bwrap + self._python if bwrap else self._python,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=None if bwrap else "/" if private else workdir, env=env,
            start_new_session=True, pass_fds=role.get("channel", ()),
        )  # fmt: skip
        return Child(popen, b"%016d" % len(header) + header + stdin)

    def _result(self, job: Job, children: list[Child], ending: str, seconds: float) -> RunResult:
        """The run's status, and for a function test the verdict of the test process."""
        bwrap = self._kind == "bwrap"
        program = children[0]
        stdout, stderr = program.text("stdout"), "".join(c.text("stderr") for c in children)
        if job.mode == "stdio":
            status = ending if ending != "exited" else exit_status(program.code, bwrap)
            return RunResult(status, status == "ok", program.code, stdout, stderr, seconds)
        test = children[1]
        verdict = _verdict(test.text("stdout")) if test.code == 0 else None
        if ending == "exited" and verdict is not None and verdict.get("passed") is True:
            return RunResult("ok", True, program.code, stdout, stderr, seconds)
        reason = str(verdict.get("reason")) if verdict else "the test process gave no verdict"
        candidates = (ending, exit_status(program.code, bwrap), exit_status(test.code, bwrap))
        status = next((s for s in candidates if s not in ("exited", "ok", "error")), "error")
        return RunResult(status, False, program.code, stdout, stderr, seconds, reason)

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

    def _clean_up(self, children: list[Child], uids: Uids) -> None:
        """Kill the run and everything it started: each child's session, and as root every
        process of the run's uids (that also catches processes that left the session). As
        root without private mounts, delete what the uids left in the shared folders."""
        for child in children:
            kill(child)
        for uid in uids:
            if uid is None:
                continue
            if not kill_uid(uid):
                logger.warning("sandbox uid %d still has live processes after a run", uid)
            if self._kind == "fallback" and not self.private_mounts:
                for path in remove_owned(uid):
                    logger.debug("removed %s, left by a sandboxed program", path)


def _program_gone(test: Child) -> bool:
    """The test process reports that the program's process ended under it."""
    verdict = _verdict(test.text("stdout")) if test.code == 0 else None
    return bool(verdict) and str(verdict.get("reason", "")).startswith("ProgramGone")


def _verdict(stdout: str) -> dict[str, Any] | None:
    """The test process's verdict: the JSON object on the last line of its stdout."""
    lines = stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) else None


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
