"""The sandboxed interpreters of one run, as the parent sees them: feed, read, bound, judge.

A run has one interpreter (a stdio program) or two (the program and the test that calls it).
The parent feeds each its job on stdin, reads their stdout and stderr under one output cap
and one wall-clock deadline, and turns how each ended into a status.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

READ_SIZE = 1 << 16
POLL = 0.05  # seconds between checks whether a watched process has exited
SETTLE = 0.5  # seconds a program the test saw end may take to report how it ended


@dataclass
class Child:
    """One interpreter of a run: its process, the stdin still to write, and its output."""

    popen: subprocess.Popen[bytes]
    payload: bytes
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    code: int | None = None  # the exit status when the run's reading ended; None: still running

    def text(self, stream: str) -> str:
        """A captured stream (``stdout`` or ``stderr``) as text, undecodable bytes replaced."""
        return bytes(getattr(self, stream)).decode("utf-8", "replace")


def communicate(children: Sequence[Child], watch: Child, deadline: float, cap: int) -> str:
    """Feed every child its stdin and read its output until ``watch`` has exited and its pipes
    are drained, the output of all children passes ``cap`` bytes, or the ``deadline`` passes.
    Returns ``exited``, ``output_limit`` or ``timeout``; each child's ``code`` is recorded."""
    try:
        return _pump(children, watch, deadline, cap)
    finally:
        for child in children:
            child.code = child.popen.poll()


def settle(child: Child, deadline: float) -> None:
    """Wait (at most ``SETTLE`` seconds, never past ``deadline``) for a child known to be
    ending, and record how it ended: a program killed by its CPU limit while the test process
    was reporting it gone must read ``cpu_time``, not "still running"."""
    if child.code is None:
        grace = min(SETTLE, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.code = child.popen.wait(grace)


def _pump(children: Sequence[Child], watch: Child, deadline: float, cap: int) -> str:
    buffers: dict[int, bytearray] = {}
    stdins: dict[int, tuple[Child, memoryview]] = {}
    total = 0
    with selectors.DefaultSelector() as selector:
        for child in children:
            assert child.popen.stdin and child.popen.stdout and child.popen.stderr
            buffers[child.popen.stdout.fileno()] = child.stdout
            buffers[child.popen.stderr.fileno()] = child.stderr
            stdin = child.popen.stdin.fileno()
            os.set_blocking(stdin, False)
            stdins[stdin] = (child, memoryview(child.payload))
            selector.register(stdin, selectors.EVENT_WRITE)
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            exited = watch.popen.poll() is not None
            events = selector.select(0 if exited else min(POLL, deadline - now))
            if exited and not events:
                break  # drained; whatever still holds a pipe open is a straggler
            for key, _ in events:
                fd = key.fd
                if fd in stdins:
                    _feed(selector, fd, stdins)
                    continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    selector.unregister(fd)
                buffers[fd] += chunk
                total += len(chunk)
                if total > cap:
                    return "output_limit"
    try:  # the watched child closed its pipes, but it may still run
        watch.popen.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "timeout"
    return "exited"


def _feed(
    selector: selectors.BaseSelector, fd: int, stdins: dict[int, tuple[Child, memoryview]]
) -> None:
    child, view = stdins[fd]
    try:
        view = view[os.write(fd, view[:READ_SIZE]) :]
    except BlockingIOError:
        return
    except OSError:  # the child closed its stdin
        view = view[:0]
    stdins[fd] = (child, view)
    if not view:
        selector.unregister(fd)
        assert child.popen.stdin is not None
        child.popen.stdin.close()


def kill(child: Child) -> None:
    """Kill a child and everything in its session, and close its pipes."""
    with contextlib.suppress(OSError):
        os.killpg(child.popen.pid, signal.SIGKILL)
    child.popen.kill()
    child.popen.wait()
    for pipe in (child.popen.stdin, child.popen.stdout, child.popen.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def exit_status(code: int | None, bwrap: bool) -> str:
    """``ok``, ``error`` (non-zero exit), ``cpu_time`` (SIGXCPU) or ``killed`` (another signal);
    ``ok`` for a child still running when its run ended (it was not the one watched)."""
    if code is None or code == 0:
        return "ok"
    signum = -code if code < 0 else None
    if bwrap and code > 128:  # bubblewrap reports a signal as 128 + n
        signum = code - 128
    if signum == signal.SIGXCPU:
        return "cpu_time"
    return "error" if signum is None else "killed"


def remove_tree(path: str) -> None:
    """Delete a fallback work directory, even one whose subfolders the program made
    unreadable (never following its symlinks out of the directory)."""
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
