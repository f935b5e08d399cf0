"""Load on `chatterbox serve` as apps put it: a real server process, real HTTP clients on loopback.

For each number of concurrent clients, every client sends two-sentence requests one after another (a
closed loop, `--requests` each, after one unmeasured request each to warm up), streaming `pcm`; the
clients run in processes of `--clients-per-process`, as independent apps do. Per request it records the
time to the first byte of audio and the audio's length. Reports p50/p95 time to first byte, aggregate
seconds of audio per second of wall time, the busiest client process's CPU share, the server's largest
decoding group, its measured rounds (from its log) and its peak NVML memory. With `--free N` a holder
process first leaves N GiB free on the GPU (testing/gpu_holder.py).

Random weights never choose the stop token, so each request's chunk decodes `--max-tokens` speech tokens:
150 (6 s of audio) stands for the length of two spoken sentences.

    python benchmarks/serve_load.py --checkpoint DIR [--clients 1,8,32] [--requests 4] [--preset auto]
        [--free 1.5] [--max-tokens 150] [--clients-per-process 4] > out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from small_card import Sampler  # noqa: E402

from chatterbox_cli.testing.gpu_holder import HeldGpu  # noqa: E402

BYTES_PER_SECOND = 24_000 * 2  # pcm: 16-bit mono at 24 kHz


def text_of(client: int, request: int) -> str:
    return (
        f"Client {client} sends request number {request} to the speech server. "
        "It asks for two sentences of speech, as a reply in a voice app would."
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


async def one_request(http: httpx.AsyncClient, url: str, client: int, index: int) -> dict[str, object]:
    body = {"model": "tts-1", "voice": "alloy", "input": text_of(client, index), "response_format": "pcm"}
    body["seed"] = client * 1000 + index + 1  # index -1 is the warm-up; a seed must not be negative
    started = time.perf_counter()
    first: float | None = None
    size = 0
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"{response.status_code}: {response.text[:200]}"}
            async for part in response.aiter_raw():
                if first is None and part:
                    first = time.perf_counter() - started
                size += len(part)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ttfb_s": first, "total_s": time.perf_counter() - started, "audio_s": size / BYTES_PER_SECOND}


async def client_loops(base: str, ids: range, requests: int, barrier: Barrier) -> dict[str, object]:
    """One client process: its clients' warm-up requests, then their measured loops, each started together
    with every other process's (the barrier)."""
    url = base + "/v1/audio/speech"
    limits = httpx.Limits(max_connections=len(ids) + 2, max_keepalive_connections=len(ids) + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(http.get(base + "/health") for _ in ids))  # open the connections first
        barrier.wait(600)
        warm_up = await asyncio.gather(*(one_request(http, url, c, -1) for c in ids))
        if failed := [r["error"] for r in warm_up if "error" in r]:  # the shapes measured must be warm
            barrier.abort()
            return {"error": f"{len(failed)} warm-up requests failed, first: {failed[0]}"}
        barrier.wait(600)
        # the first measured round's number (a round starts 20 ms after requests stop arriving at the soonest)
        first_round = (await http.get(base + "/health")).json()["rounds"] + 1 if ids.start == 0 else None

        async def loop(c: int) -> list[dict[str, object]]:
            return [await one_request(http, url, c, i) for i in range(requests)]

        cpu, started = time.process_time(), time.perf_counter()
        results = [r for rs in await asyncio.gather(*(loop(c) for c in ids)) for r in rs]
        ended = time.perf_counter()
    cpu = time.process_time() - cpu
    return {"results": results, "started": started, "ended": ended, "cpu_s": cpu, "first_round": first_round}


def client_process(base: str, ids: range, requests: int, barrier: Barrier, out: Queue) -> None:
    try:
        out.put(asyncio.run(client_loops(base, ids, requests, barrier)))
    except BaseException as e:  # the parent must hear of it, not wait
        barrier.abort()
        out.put({"error": f"{type(e).__name__}: {e}"})


ROUND = re.compile(
    r"round (\d+): (\d+) requests \((\d+) starting, gathered for ([0-9.]+) s\), first audio after ([0-9.]+) s"
)


def rounds_summary(log: Path, first: int) -> dict[str, object]:
    """The server's measured rounds from its log (one line per round, server/engine.py): how many requests
    each had, the longest gather, and the first audio of rounds with starting requests."""
    rounds = [m for m in ROUND.finditer(log.read_text()) if int(m[1]) >= first]
    starting = [float(m[5]) for m in rounds if int(m[3]) > 0]
    return {
        "rounds": len(rounds),
        "requests_per_round": dict(sorted(Counter(int(m[2]) for m in rounds).items())),
        "gathered_max_s": max((float(m[4]) for m in rounds), default=None),
        "starting_first_audio_p50_s": percentile(starting, 0.5),
    }


def level(base: str, clients: int, requests: int, per_process: int, log: Path) -> dict[str, object]:
    """`clients` closed-loop clients in processes of `per_process` each, as independent apps are: one
    Python process's HTTP work for 32 clients (about 2.5 ms of CPU a request with httpx) spreads their
    requests over tens of milliseconds and delays reading their audio, which is the client's cost, not the
    server's."""
    context = multiprocessing.get_context("spawn")
    groups = [range(i, min(i + per_process, clients)) for i in range(0, clients, per_process)]
    barrier, out = context.Barrier(len(groups)), context.Queue()
    processes = [
        context.Process(target=client_process, args=(base, ids, requests, barrier, out)) for ids in groups
    ]
    for process in processes:
        process.start()
    parts = [out.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
    if failed := [str(p["error"]) for p in parts if "error" in p]:
        raise SystemExit(f"a client process failed: {failed[0]}")
    results = [r for p in parts for r in p["results"]]  # type: ignore[attr-defined]
    wall = max(float(p["ended"]) for p in parts) - min(float(p["started"]) for p in parts)  # type: ignore[arg-type]
    health = httpx.get(base + "/health").json()
    time.sleep(0.1)  # the last round's log line follows its last delivery
    first_round = next(int(p["first_round"]) for p in parts if p["first_round"] is not None)
    good = [r for r in results if "error" not in r]
    ttfb = [float(r["ttfb_s"]) for r in good if r["ttfb_s"] is not None]
    audio = sum(float(r["audio_s"]) for r in good)
    return {
        "clients": clients,
        "client_processes": len(groups),
        "requests": len(results),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "ttfb_p50_s": percentile(ttfb, 0.5),
        "ttfb_p95_s": percentile(ttfb, 0.95),
        "total_p50_s": percentile([float(r["total_s"]) for r in good], 0.5),
        "audio_s_per_request": round(statistics.mean(float(r["audio_s"]) for r in good), 3) if good else None,
        "audio_s_per_s": round(audio / wall, 2),
        "wall_s": round(wall, 2),
        # near 1.0, a client process was busy all the time: the figures above are then partly the client's
        "busiest_client_cpu_share": round(max(float(p["cpu_s"]) for p in parts) / wall, 3),  # type: ignore[arg-type]
        "largest_group": health["largest_group"],
        "preset": health["preset"],
        "server_rounds": rounds_summary(log, first_round),
    }


def run(args: argparse.Namespace, checkpoint: Path) -> dict[str, object]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "chatterbox_cli",
        "serve",
        "--model",
        str(checkpoint),
        "--port",
        str(port),
    ]
    command += ["--max-tokens", str(args.max_tokens), "--preset", args.preset, "--max-concurrent", "256"]
    command += shlex.split(args.server_args)
    log = open(args.log, "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    sampler = None
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {args.log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        health = httpx.get(base + "/health").json()
        print(f"server up: {health['preset']} on {health['device']}: {health['reason']}", file=sys.stderr)
        with contextlib.suppress(Exception):
            sampler = Sampler(server.pid)
            sampler.start()
        levels = []
        for clients in args.clients:
            result = level(base, clients, args.requests, args.clients_per_process, Path(args.log))
            print(json.dumps(result), file=sys.stderr)
            levels.append(result)
        return {
            "free_gib": args.free,
            "max_tokens": args.max_tokens,
            "health": health,
            "peak_nvml_gib": round(sampler.peak / 2**30, 3) if sampler else None,
            "levels": levels,
        }
    finally:
        if sampler is not None:
            sampler.stop()
        server.terminate()
        server.wait(120)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=4, help="measured requests per client")
    parser.add_argument("--clients-per-process", type=int, default=4)
    parser.add_argument("--server-args", default="", help='more for `chatterbox serve`: "--device cpu"')
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--free", type=float, help="leave this many GiB free on the GPU first")
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--log", default="/tmp/serve_load_server.log")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "t3_cfg.safetensors").exists():
        from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # imports torch

        print(f"writing a full-size random checkpoint to {checkpoint}", file=sys.stderr)
        write_random_checkpoint(checkpoint, "full", seed=0)
    if args.free is None:
        report = run(args, checkpoint)
    else:
        with HeldGpu(args.free) as held:
            print(f"holder: NVML reports {held.free_bytes / 2**30:.2f} GiB free", file=sys.stderr)
            report = run(args, checkpoint)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
