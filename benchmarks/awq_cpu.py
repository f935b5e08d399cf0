"""AWQ 4-bit T3 on the CPU against fp32: decode speed and weight bytes, printed as JSON.

    .venv/bin/python benchmarks/awq_cpu.py [--threads 2] [--repeats 15] [--decode-steps 60] [--tokens 30]

A full-size English T3 (T3Config.english(), 30 layers, 210 backbone Linears) with seeded random weights
(std 0.02). Its backbone Linears are quantized to 4 bits, group 128, in the AWQ GEMM layout and run by
AwqLinear's `int4pack-cpu` kernel (core torch's `_weight_int4pack_mm_for_cpu`, bf16 activations). The
weights are round-to-nearest, not AWQ-searched: speed and bytes do not depend on the values, and the
search on a 520 M model takes long on a small CPU.

Two timings, both batch 2 (the conditional and the unconditional CFG row, one speech token per step):
  linears  the 210 backbone matmuls of one decode step in a row (7 per layer, rows of 2), fp32 nn.Linear
           vs AwqLinear (and bf16 nn.Linear for reference); 2 GB of fp32 weights, far beyond the caches.
  decode   steps of T3's decoding loop (T3.start_batch, greedy, stop ignored; prefill not timed): fp32
           with fused q/k/v and gate/up (as the service loads it) vs the same model with AwqLinears.
fp32, AwqLinear (and bf16) calls or decode steps are taken in turn and medians and minima reported: on
a shared CPU, load that comes and goes then falls on all alike (the 1-minute load average is printed).
Bytes: the packed AWQ tensors (qweight, qzeros, scales) of the 210 Linears against bitsandbytes nf4's
(estimate.quantized_linear_nbytes) for the same shapes. The issue's targets: AWQ bytes <= 1.1x nf4's,
AWQ decoding >= 2x fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli.estimate import quantized_linear_nbytes  # noqa: E402
from chatterbox_cli.models.conds import T3Cond  # noqa: E402
from chatterbox_cli.models.sampling import SamplingSettings  # noqa: E402
from chatterbox_cli.models.t3 import T3, Decoding, T3Config, iter_random_state_dict  # noqa: E402
from chatterbox_cli.models.tokenizer import EnTokenizer  # noqa: E402
from chatterbox_cli.quant import awq  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import TOKENIZER_JSON, random_conds  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and then it takes a well deserved nap."
GROUP = 128


def interleaved_times(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """What each function returns (seconds it measured), `repeats` times, the calls taken in turn
    (a, b, a, b, ...) so that a change in the machine's load (a shared CPU) falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def summary(times: dict[str, list[float]], per_second: str) -> dict[str, float]:
    """Medians and minima (the least disturbed call) in ms, rates from the medians, and speedups."""
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    out: dict[str, float] = {}
    for k in times:
        out[f"{k}_ms_median"] = round(med[k] * 1e3, 2)
        out[f"{k}_ms_min"] = round(low[k] * 1e3, 2)
        out[f"{k}_{per_second}"] = round(1 / med[k], 2)
    out["speedup_median"] = round(med["fp32"] / med["awq"], 2)
    out["speedup_min"] = round(low["fp32"] / low["awq"], 2)
    return out


def step_of(linears: list[nn.Module], rows: int, dtype: torch.dtype) -> Callable[[], float]:
    """Seconds for the backbone's matmuls of one decode step: each Linear once on `rows` rows."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {lin.in_features for lin in linears}}

    @torch.inference_mode()
    def step() -> float:
        start = time.perf_counter()
        for linear in linears:
            linear(inputs[linear.in_features])
        return time.perf_counter() - start

    return step


def decode_step(model: T3, text: torch.Tensor, cond: T3Cond, tokens: int) -> Callable[[], float]:
    """Seconds of one step of T3's decoding loop (both CFG rows, sampling included): each call advances
    a decoding started with T3.start_batch by one token, starting a new one (prefill not timed) when
    `tokens` were made."""
    greedy = SamplingSettings(temperature=0.0)
    decoding: Decoding | None = None

    def step() -> float:
        nonlocal decoding
        if decoding is None or decoding.steps >= tokens:
            decoding = model.start_batch(
                [text], cond, max_new_tokens=tokens, sampling=greedy, ignore_stop=True, cuda_graph=False
            )
        start = time.perf_counter()
        decoding.run(until=decoding.steps + 1)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--decode-steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = T3Config.english()
    with torch.device("meta"):
        model = T3(config)
    model.load_state_dict(dict(iter_random_state_dict(config, seed=0)), assign=True)
    model.tfmr.init_non_persistent_buffers("cpu")
    model.eval()
    names = [
        f"tfmr.layers.{i}.{part}"
        for i in range(config.n_layers)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]

    quantize_start = time.perf_counter()
    packed = {
        name: awq.pack_gemm(*awq.quantize_groups(model.get_submodule(name).weight, GROUP)) for name in names
    }
    quantize_seconds = time.perf_counter() - quantize_start
    awq_bytes = awq.packed_nbytes(packed)
    nf4_bytes = sum(quantized_linear_nbytes("nf4", *model.get_submodule(n).weight.shape) for n in names)
    fp32_linear_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in names)

    fp32_linears = [model.get_submodule(n) for n in names]
    awq_linears = [awq.AwqLinear.from_packed(packed[n]) for n in names]
    bf16_linears = [copy.deepcopy(lin).to(torch.bfloat16) for lin in fp32_linears]
    kernels = sorted({lin.kernel for lin in awq_linears})
    load_before = os.getloadavg()[0]
    step = interleaved_times(
        {
            "fp32": step_of(fp32_linears, 2, torch.float32),
            "awq": step_of(awq_linears, 2, torch.float32),
            "bf16": step_of(bf16_linears, 2, torch.bfloat16),
        },
        args.repeats,
    )
    del awq_linears, bf16_linears

    conds = random_conds(0)["t3"]
    cond = T3Cond(conds["speaker_emb"], conds["cond_prompt_speech_tokens"], conds["emotion_adv"])
    text = EnTokenizer(TOKENIZER_JSON).text_to_tokens(TEXT)
    quantized = copy.deepcopy(model)
    awq.apply_awq(quantized, packed)
    model.tfmr.fuse_projections()
    per_token = interleaved_times(
        {
            "fp32": decode_step(model, text, cond, args.tokens),
            "awq": decode_step(quantized, text, cond, args.tokens),
        },
        args.decode_steps,
    )
    load_after = os.getloadavg()[0]
    decode = summary(per_token, "tokens_per_s")

    print(
        json.dumps(
            {
                "benchmark": "awq_cpu",
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": args.threads,
                "kernels": kernels,
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
                "linears_step": {
                    "rows": 2,
                    "repeats": args.repeats,
                    **summary(step, "tokens_per_s_equivalent"),
                },
                "decode": {
                    "steps": args.decode_steps,
                    "tokens_per_decoding": args.tokens,
                    "cfg_rows": 2,
                    **decode,
                },
                "weights": {
                    "layers": len(names),
                    "awq_bytes": awq_bytes,
                    "nf4_bytes": nf4_bytes,
                    "fp32_bytes": fp32_linear_bytes,
                    "awq_over_nf4": round(awq_bytes / nf4_bytes, 4),
                },
                "quantize_rtn_seconds": round(quantize_seconds, 1),
                "targets_met": {
                    "bytes_le_1.1x_nf4": awq_bytes <= 1.1 * nf4_bytes,
                    "decode_ge_2x_fp32": decode["speedup_median"] >= 2,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
