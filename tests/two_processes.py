"""Launching a test file's worker on two CPU processes (gloo) through ``accelerate launch``:
the one way every multi-process test starts, so a port or environment fix lands once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from repo_root import CONFIGS, REPO


def free_port() -> int:
    """A port no one listens on now (the rendezvous of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    """One thread per process (two processes share this machine's cores) and this checkout's
    package first on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def launch(
    worker: str, config: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``worker`` (a test file run as a script) with ``args`` on two processes under the
    accelerate config ``configs/accelerate/<config>``; its output is captured."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "accelerate" / config),
        "--num_processes", "2", "--main_process_port", str(free_port()),
        worker, *args,
    ]  # fmt: skip
    return subprocess.run(
        command, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def launch_ok(worker: str, config: str, out: Path) -> None:
    """:func:`launch` with ``out`` as the worker's argument, failing with its stderr's end."""
    done = launch(worker, config, str(out))
    assert done.returncode == 0, done.stderr[-4000:]
