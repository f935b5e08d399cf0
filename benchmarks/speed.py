"""T3 decoding speed and S3Gen real-time factor: ours per preset vs the reference, one process, one GPU.

Both sides decode the same full-size random weights (written by our checkpoint writer) with CFG at batch 1
and ignore the stop token, so both generate exactly --tokens tokens. The reference (chatterbox-tts 0.1.7)
runs its own decode loop in fp32, its default; it must be importable (see --reference-site).

    python benchmarks/speed.py --checkpoint /tmp/ckpt-full --tokens 1000 --reference-site /tmp/refsite

Prints one JSON object (and writes it to $OUT/speed.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli import service  # noqa: E402
from chatterbox_cli.models.sampling import SamplingSettings  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the hills."


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ensure_checkpoint(folder: Path) -> Path:
    if not (folder / "t3_cfg.safetensors").exists():
        t = time.perf_counter()
        write_random_checkpoint(folder, size="full", seed=0)
        print(f"wrote full-size random checkpoint in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return folder


def ours_t3(folder: Path, preset: str, tokens: int, device: str) -> dict[str, object]:
    request = service.LoadRequest(model=str(folder), preset=preset, device=device, max_tokens=tokens)
    model = service.load(request)
    conds = service.voice(model, None, 0.5)
    text = model.tokenizer.text_to_tokens(SENTENCE)[None].to(model.device)
    g = torch.Generator(device=model.device).manual_seed(0)
    sampling = SamplingSettings()

    def run(n: int, graph: bool = True) -> float:
        _sync()
        t = time.perf_counter()
        out = model.t3.generate(
            text,
            conds.t3,
            max_new_tokens=n,
            cfg_weight=0.5,
            sampling=sampling,
            generator=g,
            ignore_stop=True,
            cuda_graph=graph,
        )
        _sync()
        assert out.numel() == n, out.numel()
        return time.perf_counter() - t

    run(32)  # warm-up: kernels, allocator, graph capture where used
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    seconds = run(tokens)
    result: dict[str, object] = {
        "preset": model.preset,
        "decode_mode": model.t3.last_decode_mode,
        "dtype": str(model.dtype),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }
    if torch.cuda.is_available():
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        eager_n = min(tokens, 200)
        result["eager_tokens_per_s"] = round(eager_n / run(eager_n, graph=False), 1)

    # S3Gen: tokens -> 10 s of 24 kHz audio (250 tokens), per flow-step count.
    speech = torch.randint(0, 6561, (1, 250), generator=torch.Generator().manual_seed(1)).to(model.device)
    rtf = {}
    for steps in (10, 6, 4):
        model.s3gen.synthesize(speech[:, :50], conds.gen, n_timesteps=steps)  # warm-up
        _sync()
        t = time.perf_counter()
        wav = model.s3gen.synthesize(speech, conds.gen, n_timesteps=steps)
        _sync()
        rtf[str(steps)] = round((time.perf_counter() - t) / (wav.shape[-1] / 24_000), 4)
    result["s3gen_rtf_by_flow_steps"] = rtf
    return result


def reference_t3(folder: Path, tokens: int, device: str) -> dict[str, object]:
    """The reference's T3 (fp32, HF Llama, its own loop) on the same weights and the same built-in voice."""
    sys.modules.setdefault("perth", types.ModuleType("perth"))  # watermarker stand-in: not used here
    from chatterbox.models.s3gen import S3Gen as RefS3Gen
    from chatterbox.models.t3 import T3 as RefT3
    from chatterbox.models.t3.modules.cond_enc import T3Cond as RefCond
    from safetensors.torch import load_file

    t3 = RefT3()
    t3.load_state_dict(load_file(str(folder / "t3_cfg.safetensors")))
    t3.to(device).eval()
    t3.hp.stop_speech_token = -1  # never stop: decode exactly `tokens` tokens, as ours does
    conds = torch.load(folder / "conds.pt", map_location=device, weights_only=True)
    cond = RefCond(**{k: v for k, v in conds["t3"].items()}).to(device=device)
    from chatterbox_cli.models.tokenizer import EnTokenizer

    text = EnTokenizer(folder / "tokenizer.json").text_to_tokens(SENTENCE).to(device)
    text = torch.stack([text, text])  # CFG rows, as the reference's generate() builds them

    def run(n: int) -> float:
        _sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = t3.inference(t3_cond=cond, text_tokens=text, max_new_tokens=n, cfg_weight=0.5)
        _sync()
        assert out.shape[-1] >= n, out.shape
        return time.perf_counter() - t

    run(16)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    seconds = run(tokens)
    result: dict[str, object] = {
        "dtype": "torch.float32",
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }
    if torch.cuda.is_available():
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    t3.cpu()

    s3 = RefS3Gen()
    s3.load_state_dict(load_file(str(folder / "s3gen.safetensors")), strict=False)
    s3.to(device).eval()
    speech = torch.randint(0, 6561, (250,), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        s3.inference(speech_tokens=speech[:50], ref_dict=conds["gen"])
        _sync()
        t = time.perf_counter()
        wav, _ = s3.inference(speech_tokens=speech, ref_dict=conds["gen"])
        _sync()
    result["s3gen_rtf_10_steps"] = round((time.perf_counter() - t) / (wav.shape[-1] / 24_000), 4)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/chatterbox-full"))
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--presets", default="fp16,bnb-8bit,bnb-4bit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reference-site", default=None, help="folder holding chatterbox-tts and its deps")
    args = ap.parse_args()
    folder = ensure_checkpoint(args.checkpoint)

    out: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "tokens": args.tokens,
        "ours": {},
    }
    for preset in args.presets.split(","):
        out["ours"][preset] = ours_t3(folder, preset, args.tokens, args.device)  # type: ignore[index]
        service._free_cuda()
        print(json.dumps({preset: out["ours"][preset]}), file=sys.stderr)  # type: ignore[index]
    if args.reference_site:
        sys.path.insert(0, args.reference_site)
        out["reference"] = reference_t3(folder, args.tokens, args.device)
        ref = out["reference"]["tokens_per_s"]  # type: ignore[index]
        out["ratios_vs_reference_fp32"] = {
            p: round(r["tokens_per_s"] / ref, 2)
            for p, r in out["ours"].items()  # type: ignore[union-attr]
        }
    ours = out["ours"]
    if "fp16" in ours and "bnb-4bit" in ours:  # type: ignore[operator]
        out["bnb4_vs_fp16"] = round(ours["bnb-4bit"]["tokens_per_s"] / ours["fp16"]["tokens_per_s"], 2)  # type: ignore[index]
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "speed.json").write_text(text)


if __name__ == "__main__":
    main()
