"""Sandbox settings: which isolation to use and the limits every program runs under."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKENDS = ("auto", "bwrap", "fallback")


@dataclass
class SandboxConfig:
    """``sandbox:`` of a code task (docs/sandbox.md).

    ``backend``: ``auto`` uses bubblewrap when ``bwrap`` is installed and works here (a probe
    runs once), else the fallback with a warning; ``bwrap`` insists (an error if it cannot
    run); ``fallback`` forces the weaker rlimit-only isolation. ``python``: the interpreter
    programs run under (null: the trainer's own); ``site_packages: false`` runs it with
    ``-S`` (standard library only, 3x faster start). Limits apply per program run (one test):
    the CPU time comes from the test's time limit, and the wall clock allows ``wall_slack``
    more seconds for the interpreter to start on a loaded machine.
    """

    backend: Literal["auto", "bwrap", "fallback"] = "auto"
    python: str | None = None
    site_packages: bool = True
    memory_mb: int = 1024
    max_processes: int = 16
    max_output_kb: int = 1024
    max_file_mb: int = 16
    workdir_mb: int = 64
    max_open_files: int = 256
    wall_slack: float = 2.0
    workers: int = 4
    uid_base: int = 1_500_000_000
    readonly_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"sandbox.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("memory_mb", "max_processes", "max_output_kb", "max_file_mb", "workdir_mb",
                     "max_open_files", "workers"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sandbox.{name} must be a positive integer, got {value!r}")
        if self.wall_slack < 0:
            raise ValueError(f"sandbox.wall_slack must be >= 0, got {self.wall_slack!r}")
        if not 0 < self.uid_base < 2**32 - 2**20:
            raise ValueError(f"sandbox.uid_base must be in 1..{2**32 - 2**20}, got {self.uid_base}")
