"""The GPU check (benchmarks/gpu/rollouts.py) runs end to end at toy size on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repo_root import REPO


@pytest.mark.slow
def test_gpu_check_runs_at_toy_size():
    script = REPO / "benchmarks" / "gpu" / "rollouts.py"
    args = ["--toy", "--blocks", "4", "--batches", "1", "--gen-length", "8", "--train-batch", "1"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
        check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]["anchors"] and rows[0]["toy"]
    sampled = {(r["model"], r["cache"]) for r in rows if r.get("check") == "sample"}
    assert sampled == {
        ("sdar-4b", "none"), ("sdar-4b", "kv"),
        ("llada-8b", "none"), ("llada-8b", "prefix"), ("llada-8b", "dual"),
    }  # fmt: skip
    trained = {(r["model"], r["objective"]) for r in rows if r.get("check") == "train_step"}
    assert trained == {(m, o) for m in ("sdar-4b", "llada-8b") for o in ("tracerl", "agrpo")}
    assert all(r["tokens_per_s"] > 0 for r in rows if r.get("check") == "sample")
