"""The sandbox: both backends run programs correctly, and hostile programs fail safely.

Every hostile program here is bounded before it runs: the fork bomb by the process limit
(``max_processes=8``), the memory bomb by ``RLIMIT_AS`` (256 MiB), loops by the CPU limit and
the wall clock, output by the cap. Tests of things the fallback cannot isolate (network
without root, the user's own files) are skipped for it, as docs/sandbox.md says.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unmask.sandbox import Job, Sandbox, SandboxConfig
from unmask.sandbox import sandbox as sandbox_module
from unmask.sandbox.isolation import user_processes, world_usable

ROOT = os.geteuid() == 0
# As root the fallback runs programs as another uid, which must be able to run the interpreter.
FALLBACK_PYTHON = (
    sys.executable
    if not ROOT or world_usable(sys.executable)
    else next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if world_usable(p)), None)
)
LIMITS = dict(max_processes=8, memory_mb=256, max_output_kb=64, max_file_mb=1, wall_slack=1.0)


def make_config(backend: str, **overrides) -> SandboxConfig:
    python = FALLBACK_PYTHON if backend == "fallback" else None
    return SandboxConfig(
        **{"backend": backend, "python": python, "workers": 2, **LIMITS, **overrides}
    )


@pytest.fixture(scope="module", params=["bwrap", "fallback"])
def sandbox(request):
    if request.param == "fallback" and FALLBACK_PYTHON is None:
        pytest.skip("running as root and no interpreter usable by other users for the fallback")
    box = Sandbox(make_config(request.param))
    try:
        box.start()
    except RuntimeError as exc:
        pytest.skip(f"bubblewrap cannot run here: {exc}")
    yield box
    box.close()


def skip_if_same_user(sandbox: Sandbox) -> None:
    """The non-root fallback runs programs as this user: its files are theirs (documented)."""
    if sandbox.backend == "fallback" and not ROOT:
        pytest.skip("the non-root fallback does not isolate the user's files (docs/sandbox.md)")


def function_job(program: str, test: str = "assert f(1) == 2", **kw) -> Job:
    return Job(program, "function", test=test, time_limit=kw.pop("time_limit", 1.0), **kw)


# Ordinary programs.


def test_stdio_sees_exactly_its_input(sandbox):
    jobs = [
        Job("a, b = map(int, input().split())\nprint(a + b)", stdin="2 40\n"),
        Job("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="x\ny\n"),
        Job("print(sum(map(int, open(0).read().split())))", stdin="1\n2\n3\n"),
    ]
    results = sandbox.run_many(jobs)
    assert [r.stdout for r in results] == ["42\n", "X\nY\n", "6\n"]
    assert all(r.status == "ok" and r.completed for r in results)


def test_function_tests_pass_only_when_the_test_passes(sandbox):
    program = "def f(x):\n    return x + 1\n"
    passing, failing, broken, setup = sandbox.run_many([
        function_job(program),
        function_job(program, "assert f(1) == 3"),
        function_job("def f(x) return x"),
        Job(program, "function", setup="from solution import f as g\nK = 2", test="assert g(1)==K"),
    ])  # fmt: skip
    assert passing.completed and passing.status == "ok"
    assert not failing.completed and "AssertionError" in failing.stderr
    assert not broken.completed and "SyntaxError" in broken.stderr
    assert setup.completed


def test_environment_is_minimal_and_the_work_dir_fresh(sandbox):
    show = (
        "import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))\nopen('mine', 'w').write('x')"
    )
    first, second = sandbox.run(Job(show)), sandbox.run(Job(show))
    assert first.completed and second.completed
    keys = eval(first.stdout.splitlines()[0])
    assert set(keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "PWD"}
    assert second.stdout.splitlines()[1] == "[]"  # nothing left over from the first run


def test_run_many_keeps_job_order(sandbox):
    results = sandbox.run_many([Job(f"print({i})") for i in range(5)])
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(5)]


# Hostile programs.


def test_leaving_early_or_faking_success_does_not_pass(sandbox):
    good_f = "def f(x):\n    return 0\n"  # wrong, so only a hack could pass
    hacks = [
        f"{good_f}exit(0)",
        f"{good_f}import sys\nsys.exit(0)",
        f"{good_f}import os\nos._exit(0)",
        f"{good_f}raise SystemExit",
        f"{good_f}import atexit, os\natexit.register(lambda: os._exit(0))",
        f"{good_f}print('ok')\nprint('PASSED')\nprint('\\n' + '0' * 32)",
        f"{good_f}import sys\nprint(sys.stdin.read())",  # the token is not on stdin any more
    ]
    results = sandbox.run_many([function_job(p) for p in hacks])
    assert [r.completed for r in results] == [False] * len(hacks)


def test_killing_the_parent_or_everything_does_not_pass(sandbox):
    if sandbox.backend == "fallback" and not ROOT:
        pytest.skip("the non-root fallback can signal this process (docs/sandbox.md)")
    program = (
        "import os, signal\ndef f(x):\n    return 0\n"
        "for target in (os.getppid(), -1):\n"
        "    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    result = sandbox.run(function_job(program))
    assert not result.completed
    assert subprocess.run(["true"]).returncode == 0  # this process and its forks are fine
    assert sandbox.run(function_job("def f(x):\n    return x + 1")).completed


def test_infinite_loops_are_stopped(sandbox):
    spin, sleep = sandbox.run_many([
        Job("while True:\n    pass", time_limit=0.5),
        Job("import time\ntime.sleep(60)", time_limit=0.5),
    ])  # fmt: skip
    assert spin.status in ("cpu_time", "timeout") and not spin.completed
    assert sleep.status == "timeout" and not sleep.completed
    assert max(spin.seconds, sleep.seconds) < 0.5 + sandbox.config.wall_slack + 1.0


def test_fork_bomb_is_bounded(sandbox):
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    began = time.monotonic()
    result = sandbox.run(Job(bomb, time_limit=0.5))
    assert not result.completed
    assert time.monotonic() - began < 10
    if ROOT:  # no process of the run's uids lives on (zombies wait for init to reap them)
        for uid in sandbox._leases.uids:
            assert not user_processes(uid, live=True)
    counted = sandbox.run(Job(
        "import os\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        import time\n"
        "        time.sleep(5)\n        os._exit(0)\n    n += 1\nprint(n)"
    ))  # fmt: skip
    assert counted.completed and int(counted.stdout) < sandbox.config.max_processes


def test_memory_bomb_fails_inside_its_limit(sandbox):
    once, grow = sandbox.run_many([
        Job("x = bytearray(1 << 34)"),
        Job("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))"),
    ])  # fmt: skip
    for result in (once, grow):
        assert not result.completed and "MemoryError" in result.stderr


def test_huge_output_is_cut_off(sandbox):
    result = sandbox.run(Job("while True:\n    print('x' * 1000)", time_limit=5))
    assert result.status == "output_limit" and not result.completed
    assert len(result.stdout) <= (sandbox.config.max_output_kb + 64) << 10
    assert result.seconds < 5


def test_writes_stay_inside_the_work_dir(sandbox, tmp_path):
    skip_if_same_user(sandbox)
    target = tmp_path / "written"
    program = (
        f"import os\nfor path in ({str(target)!r}, '/usr/written', os.path.expanduser('~/../x')):\n"
        "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
        "    except OSError as exc:\n        print('refused', type(exc).__name__)\n"
        "open('big', 'wb').write(b'x' * (2 << 20))\n"
    )
    result = sandbox.run(Job(program))
    assert "wrote /" not in result.stdout
    assert not target.exists() and not Path("/usr/written").exists()
    assert not result.completed  # the 2 MiB file is over max_file_mb
    assert "File too large" in result.stderr


def test_trainer_files_are_not_readable(sandbox, tmp_path):
    skip_if_same_user(sandbox)
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    readable = Path(__file__).resolve()  # world-readable: hidden only by bubblewrap
    paths = [str(secret)] + ([str(readable)] if sandbox.backend == "bwrap" else [])
    program = (
        f"for path in {paths!r}:\n    try:\n        print(open(path).read()[:40])\n"
        "    except OSError as exc:\n        print('refused', type(exc).__name__)\n"
    )
    result = sandbox.run(Job(program))
    assert result.completed
    assert "hunter2" not in result.stdout and "refused" in result.stdout
    assert result.stdout.count("refused") == len(paths)


def test_network_is_unreachable(sandbox):
    if not sandbox.network_isolated:
        pytest.skip("this fallback cannot isolate the network (docs/sandbox.md)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\n"
            "except OSError as exc:\n    print('refused', type(exc).__name__)\n"
        )
        result = sandbox.run(Job(program))
    assert result.completed and result.stdout.startswith("refused")


# Start-up and configuration.


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"sandbox\.memory_mb"):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError, match=r"sandbox\.backend"):
        SandboxConfig(backend="docker")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sandbox\.python"):
        Sandbox(SandboxConfig(python="/no/such/python")).start()


@pytest.mark.skipif(FALLBACK_PYTHON is None, reason="no interpreter for the fallback")
def test_missing_or_broken_bwrap(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="bwrap is not installed"):
        Sandbox(make_config("bwrap")).start()
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: "/bin/false")
    with (
        caplog.at_level(logging.WARNING),
        Sandbox(make_config("auto", python=FALLBACK_PYTHON)) as box,
    ):
        assert box.run(Job("print(1)")).stdout == "1\n"
        assert box.backend == "fallback"
    assert "probe run failed" in caplog.text and "WEAKER isolation" in caplog.text
