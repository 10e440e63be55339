"""Run each benchmark setting in a fresh subprocess, so peak memory is the setting's own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable


def run_settings(script: str, argv: list[str], names: Iterable[str]) -> dict[str, dict]:
    """Re-run ``script`` with ``--one NAME`` for each name; print and return its JSON line."""
    passthrough, skipping = [], False
    for arg in argv:  # drop "--only a b c": each child gets its own --one
        if arg.startswith("--"):
            skipping = arg == "--only"
        if not skipping:
            passthrough.append(arg)
    results = {}
    for name in names:
        cmd = [sys.executable, script, *passthrough, "--one", name]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[name]), flush=True)
    return results
