"""When a CUDA graph pays for S3Gen's flow: the flow (tokens to mel, 10 steps with guidance) at several
batch sizes and chunk lengths, each with its estimator steps replayed from a graph captured for the call
and with eager steps, in one process (the model loaded through the service, fp16 flow).

Each call is timed from the host with the GPU synchronized at both ends; per point the best of
`--repeat` calls (the first call at a shape also pays for cuBLAS/cuDNN plans, so both modes run it once
unmeasured). Prints one JSON object: per (rows, tokens) the estimator frames (rows x 2 x mel frames), both
times and eager / graph. On an H100 (2026-12-07) the graph captured for the call was 1.6-3.4x faster at
every point from 1 row of 48 tokens to 32 rows of 150 (eager steps stayed launch-bound, about 0.53 s a
call), so the flow captures one whenever a call takes 3 steps or more.

    python benchmarks/flow_graph.py --checkpoint DIR [--rows 1,2,4,8,16,32] [--tokens 48,150]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatterbox_cli import service  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402


def timed(call: object, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat + 1):  # the first is unmeasured
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()  # type: ignore[operator]
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rows", default="1,2,4,8,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", default="48,150", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "t3_cfg.safetensors").exists():
        write_random_checkpoint(checkpoint, "full", seed=0)
    model = service.load(service.LoadRequest(model=str(checkpoint), preset="fp16"))
    conds = model.builtin_voice
    assert conds is not None
    s3gen, gen = model.s3gen, conds.gen.to(model.device, model.flow_dtype)
    decoder = s3gen.flow.decoder
    g = torch.Generator().manual_seed(0)
    points = []
    for n in args.tokens:
        for rows in args.rows:
            tokens = torch.randint(0, 6561, (rows, n), generator=g)
            gens = [torch.Generator(model.device).manual_seed(r) for r in range(rows)]
            lens = torch.full((rows,), n, dtype=torch.long)
            frames = rows * 2 * 2 * (n + int(gen.prompt_token.size(1)))

            def call(tokens: torch.Tensor = tokens, lens: torch.Tensor = lens, gens: list = gens) -> None:
                s3gen.tokens_to_mel(tokens, gen, lens, generator=gens)

            graph_s = timed(call, args.repeat)
            decoder.cuda_graph = False
            eager_s = timed(call, args.repeat)
            decoder.cuda_graph = True
            point = {
                "rows": rows,
                "tokens": n,
                "estimator_frames": frames,
                "graph_s": round(graph_s, 4),
                "eager_s": round(eager_s, 4),
                "eager_over_graph": round(eager_s / graph_s, 3),
            }
            points.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "points": points}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
