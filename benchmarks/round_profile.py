"""Where one server round's time goes: `pipeline.speak_group` on N first chunks at once, as the server's
engine runs it at N concurrent requests (the built-in voice, one set of settings, an early piece).

Loads the model through the service (the server's path), warms it up as the server does, then runs the
round `--repeat` times and records each step with the GPU synchronized at both ends: T3's prefill and
graph capture, its decode steps (up to the early piece, then the rest), S3Gen's flow (tokens to mel) and
vocoder (mel to wave), early piece and whole chunk apart; the CUDA-graph captures inside them are listed
too (indented). The last repeat also runs under torch.profiler:
the GPU kernels that took the most time.

`--prompt-tokens N` replaces the voice's S3Gen prompt with N random tokens (and 2N mel frames): the
random checkpoint's built-in voice has 100, a voice prepared from a 10 s clip has 250.

    python benchmarks/round_profile.py --checkpoint DIR [--rows 1,32] [--tokens 150] [--prompt-tokens 250]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatterbox_cli import pipeline, service  # noqa: E402
from chatterbox_cli.models.cuda_graphs import GraphedCall  # noqa: E402
from chatterbox_cli.models.s3gen.s3gen import S3Gen  # noqa: E402
from chatterbox_cli.models.t3 import T3, DecodeStep, Decoding  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402

STEPS: list[tuple[str, float, float]] = []


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def probe(owner: object, name: str, label: Callable[..., str]) -> None:
    """Wrap owner.name so each call appends (label, start, end), GPU synchronized at both ends."""
    original: Callable[..., object] = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: object, **kwargs: object) -> object:
        sync()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        sync()
        STEPS.append((label(*args, **kwargs), start, time.perf_counter()))
        return result

    setattr(owner, name, timed)


def rows_of(tokens: torch.Tensor) -> str:
    return f"{torch.atleast_2d(tokens).size(0)} rows x {torch.atleast_2d(tokens).size(1)} tokens"


def longer_prompt(gen: object, n: int) -> object:
    """The voice's S3Gen conditionals with an n-token prompt (random tokens and mel, as the checkpoint's)."""
    g = torch.Generator().manual_seed(n)
    device = gen.prompt_token.device  # type: ignore[attr-defined]
    return dataclasses.replace(
        gen,  # type: ignore[type-var]
        prompt_token=torch.randint(0, 6561, (1, n), generator=g).to(device),
        prompt_token_len=torch.tensor([n], device=device),
        prompt_feat=(torch.randn(1, 2 * n, 80, generator=g) * 2.0 - 6.0).to(device),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--preset", default="fp16")
    parser.add_argument("--rows", default="1,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tokens", type=int, default=150, help="speech tokens per chunk")
    parser.add_argument("--prompt-tokens", type=int, help="S3Gen prompt tokens (the voice's if not given)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="kernels listed from the profile")
    args = parser.parse_args()

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "t3_cfg.safetensors").exists():
        write_random_checkpoint(checkpoint, "full", seed=0)
    model = service.load(
        service.LoadRequest(model=str(checkpoint), preset=args.preset, max_tokens=args.tokens)
    )
    conds = model.builtin_voice
    assert conds is not None
    if args.prompt_tokens:
        conds = dataclasses.replace(conds, gen=longer_prompt(conds.gen, args.prompt_tokens))
    settings = pipeline.SynthesisSettings(seed=1, max_tokens=args.tokens)
    text = "Client {} sends a request to the speech server. It asks for two sentences of speech."
    service.warm_up(model, conds, text.format(0), settings)

    probe(T3, "start_batch", lambda *a, **k: "T3 prefill + graph capture")
    probe(DecodeStep, "_capture", lambda self: f"  T3 decode-graph capture, {self.texts} texts")
    probe(Decoding, "run", lambda self, until=None: f"T3 steps to {until or 'the end'}")
    probe(GraphedCall, "__init__", lambda self, fn, *a, **k: f"  flow graph capture, {a[0].size(0)} rows")
    probe(S3Gen, "tokens_to_mel", lambda self, tokens, *a, **k: f"S3Gen flow, {rows_of(tokens)}")
    probe(
        S3Gen,
        "mel_to_wav",
        lambda self, mel, *a, **k: f"S3Gen vocoder, {mel.size(0)} rows x {mel.size(2)} frames",
    )

    report: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "preset": model.preset,
        "tokens": args.tokens,
        "early_tokens": model.early_tokens,
        "s3gen_prompt_tokens": int(conds.gen.prompt_token.size(1)),
        "rounds": [],
    }
    for n in args.rows:
        rows = [pipeline.ChunkRow(text.format(i), 0, i) for i in range(n)]
        for repeat in range(args.repeat):
            STEPS.clear()
            profiler = None
            if repeat == args.repeat - 1 and torch.cuda.is_available():
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                profiler.__enter__()
            sync()
            origin = time.perf_counter()
            first_audio = None
            early = model.early_tokens
            pieces = pipeline.speak_group(
                model, rows, conds, settings, fixed_length=lambda _: args.tokens, early_tokens=early
            )
            for _ in pieces:
                first_audio = first_audio or time.perf_counter() - origin
            sync()
            total = time.perf_counter() - origin
            kernels = None
            if profiler is not None:
                profiler.__exit__(None, None, None)
                table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=args.top)
                print(f"--- {n} rows: kernels\n{table}", file=sys.stderr, flush=True)
                kernels = [
                    {"name": e.key[:120], "calls": e.count, "gpu_ms": round(e.device_time_total / 1000, 2)}
                    for e in sorted(profiler.key_averages(), key=lambda e: -e.device_time_total)[: args.top]
                ]
            run = {
                "rows": n,
                "repeat": repeat,
                "profiled": profiler is not None,
                "first_audio_s": round(first_audio or 0.0, 4),
                "round_s": round(total, 4),
                "steps": [
                    {"step": label, "at_s": round(s - origin, 4), "took_s": round(e - s, 4)}
                    for label, s, e in STEPS
                ],
                "kernels": kernels,
            }
            report["rounds"].append(run)  # type: ignore[union-attr]
            print(json.dumps({k: v for k, v in run.items() if k != "kernels"}), file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
