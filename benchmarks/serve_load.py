"""Load on ``unmask serve``: requests/s and latency percentiles, with and without batching.

Starts the real command (``python -m unmask.cli serve``) on a loopback port for each setting,
then keeps ``--concurrency`` clients busy with completions until ``--requests`` are done or
``--max-seconds`` pass (loopback only; bounded in requests and time). Prints one JSON line per
setting; 503 answers (the queue bound at work) are counted, not retried.

``--dropped-streams N`` measures something else: the latency of one request after N clients
each read the first event of a stream and hung up (their jobs should stop, not run on).

    python benchmarks/serve_load.py                       # tiny-block, 64 requests a setting
    python benchmarks/serve_load.py --model nano-block --requests 16 --max-seconds 20
    python benchmarks/serve_load.py --dropped-streams 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

SETTINGS = {
    # name: (server overrides, concurrency multiplier)
    "no batching": ({"max_batch_size": 1}, 1),
    "dynamic batching": ({}, 1),
    "overload (queue bound 4)": ({"max_queue": 4}, 4),
}
DROPPED = "dropped streams"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: argparse.Namespace, overrides: dict, port: int, log) -> subprocess.Popen:
    settings = {
        "port": port,
        "device": "cpu",
        "log_level": "warning",
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "sampler.gen_length": args.max_tokens,
        "sampler.stop_at_eos": "false",  # an untrained model: always the full length
        **overrides,
    }
    command = [sys.executable, "-m", "unmask.cli", "serve", args.model]
    command += [f"{k}={v}" for k, v in settings.items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


async def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError("the server exited before answering")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def _load(args: argparse.Namespace, url: str, concurrency: int) -> dict:
    rng = random.Random(0)
    latencies: list[float] = []
    refusals: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    deadline = time.monotonic() + args.max_seconds

    def body() -> dict:
        prompt = "".join(rng.choice("0123456789+-*= ") for _ in range(args.prompt_length))
        return {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens}

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < args.requests and time.monotonic() < deadline:
            sent += 1
            start = time.perf_counter()
            reply = await client.post(f"{url}/v1/completions", json=body())
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            elapsed = time.perf_counter() - start
            if reply.status_code == 200:
                latencies.append(elapsed)
            elif reply.status_code == 503:
                refusals.append(elapsed)

    timeout = httpx.Timeout(args.max_seconds + 60)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for _ in range(2):  # warm-up, not counted
            await client.post(f"{url}/v1/completions", json=body())
        before = (await client.get(f"{url}/v1/stats")).json()["batch_sizes"]
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = (await client.get(f"{url}/v1/stats")).json()["batch_sizes"]
    batches = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    n_batches = sum(batches.values())
    rows = sum(int(k) * v for k, v in batches.items())
    ok = len(latencies)
    cuts = statistics.quantiles(latencies, n=100) if ok >= 2 else [float("nan")] * 99
    return {
        "requests": sum(statuses.values()),
        "ok": ok,
        "rejected_503": statuses.get(503, 0),
        "other_errors": sum(v for k, v in statuses.items() if k not in (200, 503)),
        "wall_s": round(wall, 2),
        "requests_per_s": round(ok / wall, 2),
        "tokens_per_s": round(ok * args.max_tokens / wall, 1),
        "latency_p50_s": round(cuts[49], 3),
        "latency_p90_s": round(cuts[89], 3),
        "latency_p99_s": round(cuts[98], 3),
        "rejected_p50_s": round(statistics.median(refusals), 4) if refusals else None,
        "mean_batch_rows": round(rows / n_batches, 2) if n_batches else 0.0,
    }


async def _dropped(args: argparse.Namespace, url: str, _: int) -> dict:
    """One request's latency when idle, then after ``--dropped-streams`` streams were left."""
    body = {"model": args.model, "prompt": "1" * args.prompt_length, "max_tokens": args.max_tokens}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.max_seconds + 60)) as client:

        async def timed() -> float:
            start = time.perf_counter()
            (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
            return time.perf_counter() - start

        for _ in range(2):  # warm-up, not counted
            await timed()
        idle = await timed()

        async def leave() -> None:  # the first event comes once the job is running
            stream = {**body, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=stream) as reply:
                async for _ in reply.aiter_lines():
                    break

        await asyncio.gather(*(leave() for _ in range(args.dropped_streams)))
        after = await timed()
        stats = (await client.get(f"{url}/v1/stats")).json()
    return {
        "dropped_streams": args.dropped_streams,
        "idle_request_s": round(idle, 3),
        "next_request_s": round(after, 3),
        "batch_sizes": stats["batch_sizes"],
        "cancelled": stats.get("cancelled"),
    }


async def _run(args: argparse.Namespace, name: str) -> dict:
    overrides, multiplier = SETTINGS.get(name, ({}, 1))
    measure = _dropped if name == DROPPED else _load
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = _start(args, overrides, port, log)
        try:
            await _wait_ready(url, process)
            result = await measure(args, url, args.concurrency * multiplier)
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read())
            raise
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {
        "setting": name,
        "model": args.model,
        "concurrency": args.concurrency * multiplier,
        "max_tokens": args.max_tokens,
        "prompt_length": args.prompt_length,
        **overrides,
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-block")
    parser.add_argument("--requests", type=int, default=64, help="per setting")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per setting")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument(
        "--dropped-streams",
        type=int,
        default=0,
        help="instead of the load settings: time a request after N clients left their streams",
    )
    args = parser.parse_args()
    for name in [DROPPED] if args.dropped_streams else args.only:
        print(json.dumps(asyncio.run(_run(args, name))), flush=True)


if __name__ == "__main__":
    main()
