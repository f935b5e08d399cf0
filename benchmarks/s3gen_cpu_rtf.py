"""S3Gen on the CPU: real-time factor of tokens -> waveform with full-size random weights.

    .venv/bin/python benchmarks/s3gen_cpu_rtf.py [--tokens 250] [--prompt-tokens 150] [--threads 2]

Builds the speaking parts (flow + HiFT) at the English sizes with seeded random weights, then, for
10 and 5 flow steps, times one synthesis of `--tokens` speech tokens (25 tokens/s, so 250 = 10 s
of audio) conditioned on a `--prompt-tokens` voice prompt, after a short warm-up. RTF = compute
seconds / audio seconds. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from chatterbox_cli.models.conds import GenCond
from chatterbox_cli.models.s3gen import SPEECH_PARTS, S3Gen, S3GenConfig
from chatterbox_cli.models.s3gen.flow import random_state_dict as flow_random
from chatterbox_cli.models.s3gen.hifigan import random_state_dict as hift_random

TOKEN_RATE = 25


def build(config: S3GenConfig, seed: int) -> S3Gen:
    model = S3Gen(config, parts=SPEECH_PARTS)
    model.flow.load_state_dict(flow_random(config.flow, seed))
    model.mel2wav.load_state_dict(hift_random(config.hift, seed + 1))
    return model.eval()


def timed_synthesis(model: S3Gen, tokens: torch.Tensor, cond: GenCond, steps: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    mel = model.tokens_to_mel(tokens, cond, n_timesteps=steps, generator=generator)
    mid = time.perf_counter()
    wav = model.mel_to_wav(mel, generator=generator)
    end = time.perf_counter()
    audio_s = wav.size(1) / 24000
    return {
        "flow_steps": steps,
        "flow_s": round(mid - start, 3),
        "hift_s": round(end - mid, 3),
        "total_s": round(end - start, 3),
        "audio_s": round(audio_s, 3),
        "rtf": round((end - start) / audio_s, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 5])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = S3GenConfig.english()
    t0 = time.perf_counter()
    model = build(config, seed=0)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    cond = GenCond(
        prompt_token=torch.randint(0, 6561, (1, args.prompt_tokens), generator=g),
        prompt_token_len=torch.tensor([args.prompt_tokens]),
        prompt_feat=torch.randn(1, 2 * args.prompt_tokens, 80, generator=g) * 2.0 - 6.0,
        embedding=torch.randn(1, config.flow.spk_embed_dim, generator=g),
    )
    tokens = torch.randint(0, 6561, (1, args.tokens), generator=g)

    model.synthesize(tokens[:, :10], cond, n_timesteps=1)  # warm-up (allocator, kernels)
    runs = [timed_synthesis(model, tokens, cond, steps) for steps in args.steps]
    print(
        json.dumps(
            {
                "benchmark": "s3gen_cpu_rtf",
                "weights": "random, English sizes, fp32",
                "tokens": args.tokens,
                "prompt_tokens": args.prompt_tokens,
                "audio_s_expected": args.tokens / TOKEN_RATE,
                "threads": args.threads,
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "build_s": round(build_s, 2),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
