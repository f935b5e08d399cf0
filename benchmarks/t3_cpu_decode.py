"""Decode speech tokens with a full-size random T3 on the CPU and print tokens/s as JSON.

    .venv/bin/python benchmarks/t3_cpu_decode.py [--checkpoint DIR] [--tokens 200] [--threads 1]
                                                 [--dtype float32] [--cfg-weight 0.5]

Uses (or writes) the same full-size random `t3_cfg.safetensors` as t3_load_memory.py. Decoding is greedy
(temperature 0, repetition penalty 1.2) with the stop token ignored, so exactly --tokens tokens are made;
with cfg_weight > 0 each step runs two rows (conditional + unconditional) like real synthesis. Prefill
(conditioning + text) is timed separately from the per-token loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli.models.conds import T3Cond  # noqa: E402
from chatterbox_cli.models.loading import load_t3  # noqa: E402
from chatterbox_cli.models.sampling import SamplingSettings  # noqa: E402
from chatterbox_cli.models.tokenizer import EnTokenizer  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import (  # noqa: E402
    TOKENIZER_JSON,
    random_conds,
    t3_config_for,
    write_t3,
)

TEXT = "The quick brown fox jumps over the lazy dog, and then it takes a well deserved nap."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "chatterbox-t3-full-random"
    )
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--cfg-weight", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = args.checkpoint / "t3_cfg.safetensors"
    if not path.exists():
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        write_t3(path, t3_config_for("full"), 0)
    dtype = getattr(torch, args.dtype)
    model = load_t3(path, "cpu", dtype)
    conds = random_conds(0)["t3"]
    cond = T3Cond(conds["speaker_emb"], conds["cond_prompt_speech_tokens"], conds["emotion_adv"])
    text = EnTokenizer(TOKENIZER_JSON).text_to_tokens(TEXT)
    greedy = SamplingSettings(temperature=0.0)

    # Prefill alone (one new token), then the full run; the difference is the per-token loop.
    start = time.perf_counter()
    model.generate(
        text, cond, max_new_tokens=1, cfg_weight=args.cfg_weight, sampling=greedy, ignore_stop=True
    )
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens = model.generate(
        text, cond, max_new_tokens=args.tokens, cfg_weight=args.cfg_weight, sampling=greedy, ignore_stop=True
    )
    total = time.perf_counter() - start
    loop = total - prefill
    print(
        json.dumps(
            {
                "benchmark": "t3_cpu_decode",
                "device": "cpu",
                "dtype": args.dtype,
                "threads": args.threads,
                "cfg_weight": args.cfg_weight,
                "rows": 2 if args.cfg_weight > 0 else 1,
                "text_tokens": int(text.numel()),
                "new_tokens": int(tokens.numel()),
                "prefill_seconds": round(prefill, 3),
                "total_seconds": round(total, 3),
                "tokens_per_second": round(tokens.numel() / total, 2),
                "decode_tokens_per_second": round((tokens.numel() - 1) / loop, 2),
                "distinct_tokens": int(tokens.unique().numel()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
