"""Where a T3 decode step's GPU time goes, English against Turbo, and what candidate changes buy.

For each variant (fp16, full-size random weights, loaded through the service as `synthesize` loads it, with
its own generation defaults): the kernels of one eager decode step from the torch profiler (count and GPU
microseconds per step, by kernel name, and their sum), the sampling alone (one captured graph of
choose_next_token on one row of logits, and the same over the whole vocabulary without the top_k
shortcut), and tokens/s with CUDA graphs at batch 1. Then, for Turbo, the
same tokens/s with each candidate in --candidates applied (the candidates are defined here, as patches, so
one process compares them side by side; a winner moves into the model code):

- unfused: GPT-2's blocks on the torch path (t3.FUSED_GPT2_DECODE off), not the fused Triton kernels
- sdpa-math / sdpa-efficient / sdpa-cudnn: one attention backend forced for the whole decode step
- compiled: torch.compile(mode="reduce-overhead") of the decode body instead of our graph

    python benchmarks/decode_profile.py --folder /tmp/ck-variants [--tokens 400]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli import service  # noqa: E402
from chatterbox_cli.models import t3 as t3_module  # noqa: E402
from chatterbox_cli.models.sampling import (  # noqa: E402
    choose_next_token,
    process_logits,
    sample_from_logits,
)
from chatterbox_cli.pipeline import SynthesisSettings, text_tokens  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
from chatterbox_cli.variants import VARIANTS  # noqa: E402

SENTENCE = "The keeper lit the lamp and watched the sea until the ships came home."
STEPS = 32


@contextlib.contextmanager
def candidate(name: str) -> Iterator[dict[str, object]]:
    """Apply a candidate ("a+b": several) for the duration of the block; yields decode options to pass."""
    with contextlib.ExitStack() as stack:
        options: dict[str, object] = {}
        for part in name.split("+"):
            options |= stack.enter_context(_one_candidate(part))
        yield options


@contextlib.contextmanager
def _one_candidate(name: str) -> Iterator[dict[str, object]]:
    if name == "baseline":
        yield {}
    elif name == "unfused":
        t3_module.FUSED_GPT2_DECODE = False
        try:
            yield {}
        finally:
            t3_module.FUSED_GPT2_DECODE = True
    elif name.startswith("sdpa-"):
        backend = {
            "math": SDPBackend.MATH,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
        }[name.removeprefix("sdpa-")]
        with sdpa_kernel([backend]):
            yield {}
    elif name == "compiled":
        yield {"compiled": True}
    else:
        raise SystemExit(f"unknown candidate {name}")


def _kernels(step: Callable[[], None]) -> dict[str, object]:
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name[:90]]
            entry[0] += 1
            entry[1] += event.device_time
    table = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for v in per_kernel.values()) / STEPS
    count = sum(v[0] for v in per_kernel.values()) / STEPS
    return {
        "kernels_per_step": round(count, 1),
        "kernel_us_per_step": round(total, 1),
        "top": [
            {"kernel": k, "per_step": round(c / STEPS, 2), "us_per_step": round(us / STEPS, 1)}
            for k, (c, us) in table[:30]
        ],
    }


def _whole_vocabulary(logits: torch.Tensor, seen: torch.Tensor, sampling: object, gens: object) -> object:
    """choose_next_token without its top_k shortcut: every processor over the whole vocabulary."""
    return sample_from_logits(process_logits(logits, seen, sampling), gens)  # type: ignore[arg-type]


def _sampling_us(model: service.LoadedModel, sampling: object, choose: Callable[..., object]) -> float:
    vocab = model.t3.config.speech_vocab_size
    logits = torch.randn(1, vocab, device="cuda") * 3
    seen = torch.zeros(1, vocab, dtype=torch.bool, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        choose(logits, seen, sampling, [gen])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        choose(logits, seen, sampling, [gen])
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(500):
        graph.replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t) / 500 * 1e6, 1)


@torch.inference_mode()
def measure(folder: Path, variant: str, tokens: int, candidates: list[str]) -> dict[str, object]:
    request = service.LoadRequest(model=str(folder), preset="fp16", variant=variant, max_tokens=tokens)
    model = service.load(request)
    text, _ = text_tokens(model.tokenizer.for_language("en"), SENTENCE, 0, model.t3.config)
    settings = SynthesisSettings().for_variant(model.variant)
    conds = service.voice(model, None, float(settings.exaggeration))  # type: ignore[arg-type]
    cond = conds.t3.to(model.device)
    sampling = settings.sampling(model.variant)
    options = {
        "max_new_tokens": tokens,
        "cfg_weight": float(settings.cfg_weight),  # type: ignore[arg-type]
        "sampling": sampling,
        "ignore_stop": True,
    }

    def tokens_per_s(**extra: object) -> float:
        speeds = []
        for i in range(3):  # the first captures (or compiles) and warms up
            gen = torch.Generator("cuda").manual_seed(i)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.t3.generate(text, cond, generator=gen, **options, **extra)  # type: ignore[arg-type]
            torch.cuda.synchronize()
            if i:
                speeds.append(out.numel() / (time.perf_counter() - start))
        return round(statistics.median(speeds), 1)

    gen = torch.Generator("cuda").manual_seed(0)
    decoding = model.t3.start_batch([text], cond, generators=[gen], cuda_graph=False, **options)  # type: ignore[arg-type]
    result: dict[str, object] = {
        "variant": variant,
        "layers": model.t3.config.n_layers,
        "eager_step": _kernels(decoding.step.advance),
        "sampling_graph_us": {
            "ours": _sampling_us(model, sampling, choose_next_token),
            "whole_vocabulary": _sampling_us(model, sampling, _whole_vocabulary),
        },
        "tokens_per_s": {},
    }
    if variant == "turbo":
        with candidate("unfused"):
            result["eager_step_unfused"] = _kernels(decoding.step.advance)
    for name in candidates if variant == "turbo" else ["baseline"]:
        try:
            with candidate(name) as extra:
                result["tokens_per_s"][name] = tokens_per_s(**extra)  # type: ignore[index]
        except Exception as e:  # a candidate that fails is a finding, not the end of the run
            result["tokens_per_s"][name] = f"failed: {type(e).__name__}: {e}"[:300]  # type: ignore[index]
        print(json.dumps({variant: {name: result["tokens_per_s"][name]}}), file=sys.stderr, flush=True)  # type: ignore[index]
    if variant == "turbo":
        x = torch.randn(1, 1, model.t3.config.hidden_size, device="cuda", dtype=model.dtype)
        mlp = model.t3.tfmr.h[0].mlp
        reference = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
        result["gelu_epilogue_max_abs_diff"] = float((mlp(x) - reference).abs().max())  # the model's MLP
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/ck-variants"))
    ap.add_argument("--tokens", type=int, default=400)
    every = "baseline,unfused,sdpa-math,sdpa-efficient,sdpa-cudnn,compiled"
    ap.add_argument("--candidates", default=every)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_profile.py needs a CUDA GPU")
    runs = []
    for name in ("english", "turbo"):
        folder = args.folder / name
        if not (folder / VARIANTS[name].file("t3")).exists():
            write_random_checkpoint(folder, "full", seed=0, variant=name)
        runs.append(measure(folder, name, args.tokens, args.candidates.split(",")))
        torch.cuda.empty_cache()
    en, turbo = (r["tokens_per_s"] for r in runs)
    ratios = {k: round(v / en["baseline"], 3) for k, v in turbo.items() if isinstance(v, float)}  # type: ignore[union-attr,index]
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens}
    print(json.dumps({**report, "turbo_over_english": ratios, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
