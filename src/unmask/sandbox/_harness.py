"""Runs inside the sandbox: read one job, drop privileges, apply the limits, run the program.

The sandbox starts this file's source as ``python -I -c <source>``, so it must stay
self-contained (standard library only, nothing from ``unmask``). Protocol on stdin: 16 ASCII
digits giving the length of a JSON job, the job, then the program's own input, left unread
so that ``input()``, ``sys.stdin`` and ``open(0)`` all see exactly the test's input.

Modes:

- ``stdio``: run the program as ``__main__``; the outside compares its stdout.
- ``function``: run the program as module ``solution``, then the test's setup code and the
  test in a copy of its namespace. Only when both finish without raising does the harness
  write the job's one-time token to stdout and leave with ``os._exit(0)``. The outside counts
  a pass only if it reads that token, so ``exit(0)`` before the asserts, a killed harness or a
  printed fake success line all fail.
- ``probe``: report what the setup could do (used once when a sandbox starts).
"""

import contextlib
import json
import os
import resource
import sys
import traceback
import types

SETUP_FAILED = 97  # exit status when isolation could not be set up
CLONE_NEWNET = 0x40000000


def _read_exact(size):
    chunks = []
    while size:
        chunk = os.read(0, size)
        if not chunk:
            raise EOFError("stdin ended inside the job header")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _unshare_network():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")


def _isolate(job):
    """Steps that need root (new network namespace, ownership of the work dir, the switch to
    the job's uid), then the resource limits, which the program can only lower."""
    if job["unshare_net"]:
        _unshare_network()
    uid = job["uid"]
    if uid is not None:
        os.chown(".", uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    for name, (soft, hard) in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))


def _as_main(program):
    """Run ``program`` as the ``__main__`` module, as ``python solution.py`` would."""
    module = types.ModuleType("__main__")
    module.__file__ = os.path.abspath("solution.py")
    sys.modules["__main__"] = module
    sys.argv = ["solution.py"]
    exec(compile(program, "solution.py", "exec"), module.__dict__)


def _function_test(job):
    """Program as module ``solution`` (so ``from solution import f`` works), then setup and
    test in a copy of its namespace (so bare ``assert f(1) == 2`` works too)."""
    module = types.ModuleType("solution")
    module.__file__ = os.path.abspath("solution.py")
    sys.modules["solution"] = module
    sys.argv = ["solution.py"]
    exec(compile(job["program"], "solution.py", "exec"), module.__dict__)
    namespace = dict(module.__dict__, __name__="__test__")
    if job["setup"]:
        exec(compile(job["setup"], "test_setup.py", "exec"), namespace)
    exec(compile(job["test"], "test.py", "exec"), namespace)


def main():
    job = json.loads(_read_exact(int(_read_exact(16))))
    try:
        _isolate(job)
    except Exception as exc:  # reported, and the run fails
        sys.stderr.write(f"sandbox setup failed: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    mode = job["mode"]
    if mode == "probe":
        print(json.dumps({"uid": os.getuid(), "cwd": os.getcwd()}))
        return
    if mode == "stdio":
        _as_main(job["program"])
        return
    token = job.pop("token").encode()
    try:
        _function_test(job)
    except BaseException:  # SystemExit and KeyboardInterrupt included: the test did not pass
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    with contextlib.suppress(BaseException):  # a broken sys.stdout: the raw write decides
        sys.stdout.flush()
    os.write(1, b"\n" + token + b"\n")
    os._exit(0)


if __name__ == "__main__":
    main()
