"""Load on `chatterbox serve` as apps put it: a real server process, real HTTP clients on loopback.

For each number of concurrent clients, every client sends two-sentence requests one after another (a
closed loop, `--requests` each, after one unmeasured request each to warm up), streaming `pcm`; per request
it records the time to the first byte of audio and the audio's length. Reports p50/p95 time to first byte,
aggregate seconds of audio per second of wall time, the server's largest decoding group and its peak
NVML memory. With `--free N` a holder process first leaves N GiB free on the GPU (testing/gpu_holder.py).

Random weights never choose the stop token, so each request's chunk decodes `--max-tokens` speech tokens:
150 (6 s of audio) stands for the length of two spoken sentences.

    python benchmarks/serve_load.py --checkpoint DIR [--clients 1,8,32] [--requests 4] [--preset auto]
        [--free 1.5] [--max-tokens 150] > out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from small_card import Sampler  # noqa: E402

from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
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


async def level(base: str, clients: int, requests: int) -> dict[str, object]:
    url = base + "/v1/audio/speech"
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        warm_up = await asyncio.gather(*(one_request(http, url, c, -1) for c in range(clients)))
        if failed := [r["error"] for r in warm_up if "error" in r]:  # the shapes measured must be warm
            raise SystemExit(f"{len(failed)} warm-up requests failed, first: {failed[0]}")

        async def loop(c: int) -> list[dict[str, object]]:
            return [await one_request(http, url, c, i) for i in range(requests)]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(loop(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - started
        health = (await http.get(base + "/health")).json()
    good = [r for r in results if "error" not in r]
    ttfb = [float(r["ttfb_s"]) for r in good if r["ttfb_s"] is not None]  # type: ignore[arg-type]
    audio = sum(float(r["audio_s"]) for r in good)  # type: ignore[arg-type]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": [r["error"] for r in results if "error" in r][:5],
        "ttfb_p50_s": percentile(ttfb, 0.5),
        "ttfb_p95_s": percentile(ttfb, 0.95),
        "total_p50_s": percentile([float(r["total_s"]) for r in good], 0.5),  # type: ignore[arg-type]
        "audio_s_per_request": round(statistics.mean(float(r["audio_s"]) for r in good), 3) if good else None,
        "audio_s_per_s": round(audio / wall, 2),
        "wall_s": round(wall, 2),
        "largest_group": health["largest_group"],
        "preset": health["preset"],
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
            result = asyncio.run(level(base, clients, args.requests))
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
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--free", type=float, help="leave this many GiB free on the GPU first")
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--log", default="/tmp/serve_load_server.log")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "t3_cfg.safetensors").exists():
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
