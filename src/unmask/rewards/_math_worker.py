"""Math verification worker: JSON jobs on stdin, one JSON result per line on stdout.

:class:`unmask.rewards.math.MathVerifier` runs this file as a script (``python -P <file>``)
rather than through ``multiprocessing``: a spawned child would import the ``unmask`` package
and the parent's main module (torch and transformers: seconds and hundreds of MiB per worker),
while this imports math-verify alone. Being the main thread of its own process, math-verify's
``signal.alarm`` timeouts work here; the parent still kills a worker that overruns.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

Check = Callable[[str, str, int], float | None]


def verify_pair(gold: str, pred: str, timeout: int) -> float | None:
    """1.0 if ``pred`` equals ``gold`` by math-verify, 0.0 if not, None if the gold won't parse."""
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed:
        return None
    pred_parsed = parse(pred, parsing_timeout=timeout)
    if not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0


def load_check(spec: str | None) -> Check:
    """``module:function`` to a check callable; the math-verify check when ``spec`` is None."""
    if spec is None:
        import math_verify  # noqa: F401  (import before announcing readiness)

        return verify_pair
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=int, default=1, help="math-verify's own timeouts (s)")
    parser.add_argument("--check", default=None, help="module:function replacing math-verify")
    args = parser.parse_args()
    # Keep the protocol on the real stdout; stray prints from libraries go to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    check = load_check(args.check)
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            value = check(job["gold"], job["pred"], args.timeout)
            reply = {"id": job["id"], "value": None if value is None else float(value)}
        except Exception as exc:  # a bad answer must cost one result, not the worker
            reply = {"id": job["id"], "value": None, "error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
