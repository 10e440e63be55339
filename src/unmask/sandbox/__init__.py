"""Running model-written programs: isolated processes with limits (see ``docs/sandbox.md``)."""

from unmask.sandbox.config import SandboxConfig
from unmask.sandbox.sandbox import Job, RunResult, Sandbox

__all__ = ["Job", "RunResult", "Sandbox", "SandboxConfig"]
