"""Run each benchmark setting in a fresh subprocess, so peak memory is the setting's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


def run_settings(
    script: str, argv: list[str], names: Iterable[str], code: str | None = None
) -> dict[str, dict]:
    """Re-run ``script`` with ``--one NAME`` for each name; print and return its JSON line.

    ``code``, a checkout of this repository (``git worktree add /tmp/old HEAD``), runs the
    setting against that checkout's ``src`` instead: before and after in one run.
    """
    passthrough, skipping = [], False
    for arg in argv:  # drop "--only a b c" and "--compare-to DIR": each child runs one setting
        if arg.startswith("--"):
            skipping = arg in ("--only", "--compare-to")
        if not skipping:
            passthrough.append(arg)
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code) / "src"), env.get("PYTHONPATH", "")])
    results = {}
    for name in names:
        cmd = [sys.executable, script, *passthrough, "--one", name]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[name]), flush=True)
    return results
