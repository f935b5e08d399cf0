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

from chatterbox_cli import oom, service  # noqa: E402
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


def _kernel_table(fn, per: float) -> dict[str, object]:  # noqa: ANN001
    """Run fn() under torch.profiler: GPU kernels, their busy time and the 15 costliest kernel names,
    each divided by `per` (tokens, calls, ...). Returns fn()'s result under "result"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:70], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time  # us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "result": result,
        "kernels": round(len(kernels) / per, 1),
        "gpu_busy_ms": round(sum(e.device_time for e in kernels) / 1e3 / per, 3),
        "top_by_time": {name: {"count": round(c / per, 1), "us": round(t / per, 1)} for name, (c, t) in top},
    }


def _profile(run) -> dict[str, object]:  # noqa: ANN001
    """GPU kernels per decoded token, their busy time and the costliest kernels, over run(n)."""
    n = 32
    table = _kernel_table(lambda: run(n), n)
    wall = table.pop("result")
    return {**table, "wall_ms_per_token_under_profiler": round(wall * 1e3 / n, 3)}


def _host_enqueue(model, conds, text, sampling, n: int = 300) -> dict[str, float]:  # noqa: ANN001
    """How long the host takes to queue n graphed decode steps (no stop checks, so no syncs) against the
    wall time until the GPU has run them: equal means the host is the bound, far apart the GPU."""
    gen = torch.Generator(device=model.device).manual_seed(0)
    options = {"max_new_tokens": n + 1, "sampling": sampling, "generators": [gen], "ignore_stop": True}
    decoding = model.t3.start_batch([text], conds.t3, **options)
    decoding.run(until=16)  # capture
    _sync()
    t = time.perf_counter()
    decoding.run(until=16 + n)
    queued = time.perf_counter() - t
    _sync()
    wall = time.perf_counter() - t
    return {
        "steps": n,
        "host_queue_ms_per_step": round(queued * 1e3 / n, 3),
        "wall_ms_per_step": round(wall * 1e3 / n, 3),
    }


def ours_t3(
    folder: Path, preset: str, tokens: int, device: str, modes: list[str], batches: list[int]
) -> dict[str, object]:
    request = service.LoadRequest(model=str(folder), preset=preset, device=device, max_tokens=tokens)
    model = service.load(request)
    conds = service.voice(model, None, 0.5)
    text = model.tokenizer.text_to_tokens(SENTENCE)[None].to(model.device)
    sampling = SamplingSettings()

    def run(n: int, mode: str = "cuda-graph", batch: int = 1) -> float:
        gens = [torch.Generator(device=model.device).manual_seed(i) for i in range(batch)]
        _sync()
        t = time.perf_counter()
        out = model.t3.generate_batch(
            [text] * batch,
            conds.t3,
            max_new_tokens=n,
            cfg_weight=0.5,
            sampling=sampling,
            generators=gens,
            ignore_stop=True,
            cuda_graph=mode != "eager",
            compiled=mode == "compile-reduce-overhead",
        )
        _sync()
        assert all(o.numel() == n for o in out), [o.numel() for o in out]
        return time.perf_counter() - t

    result: dict[str, object] = {"preset": model.preset, "dtype": str(model.dtype), "tokens": tokens}
    per_mode: dict[str, object] = {}
    for mode in modes:
        n = min(tokens, 200) if mode == "eager" else tokens
        t = time.perf_counter()
        run(32, mode)  # warm-up: kernels, allocator, graph capture, compilation
        warmup = time.perf_counter() - t
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds = run(n, mode)
        per_mode[mode] = {
            "decode_mode": model.t3.last_decode_mode,
            "tokens": n,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(n / seconds, 1),
            "first_call_s": round(warmup, 2),
        }
        if torch.cuda.is_available():
            per_mode[mode]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()  # type: ignore[index]
            if mode in ("eager", "cuda-graph"):
                per_mode[mode]["profile"] = _profile(lambda k, m=mode: run(k, m))  # type: ignore[index]
        print(json.dumps({preset: {mode: per_mode[mode]}}), file=sys.stderr)
    result["modes"] = per_mode
    if torch.cuda.is_available() and "cuda-graph" in per_mode:
        result["host_bound_check"] = _host_enqueue(model, conds, text, sampling)
    if "cuda-graph" in per_mode:
        result["tokens_per_s"] = per_mode["cuda-graph"]["tokens_per_s"]  # type: ignore[index]

    # Several texts decoded together: total tokens/s over the batch (rows = batch x 2 with CFG).
    n = min(tokens, 500)
    by_batch = {}
    for batch in batches:
        run(16, batch=batch)
        seconds = run(n, batch=batch)
        by_batch[str(batch)] = {"tokens_per_s": round(batch * n / seconds, 1), "tokens_each": n}
    result["batched"] = by_batch

    # S3Gen: tokens -> 10 s of 24 kHz audio (250 tokens), per flow-step count.
    speech = torch.randint(0, 6561, (1, 250), generator=torch.Generator().manual_seed(1)).to(model.device)
    rtf = {}
    for steps in (10, 6, 4):
        model.s3gen.synthesize(speech, conds.gen, n_timesteps=steps)  # warm-up at the measured length
        _sync()
        t = time.perf_counter()
        wav = model.s3gen.synthesize(speech, conds.gen, n_timesteps=steps)
        _sync()
        rtf[str(steps)] = round((time.perf_counter() - t) / (wav.shape[-1] / 24_000), 4)
    result["s3gen_rtf_by_flow_steps"] = rtf
    return result


PASSAGE = (
    "Every morning the old lighthouse keeper climbed the narrow stairs, counted the ships on the grey "
    "horizon, and wrote their names in a book that nobody else would ever read. "
    "When the storms came in winter, he kept the lamp burning through the night and listened to the "
    "wind as it searched the stones for a way inside. "
)
TOKENS_PER_WORD = 10  # 150 words a minute at 25 speech tokens a second


def text_of(words: int) -> str:
    passage = PASSAGE.split()
    return " ".join(passage[i % len(passage)] for i in range(words))


def end_to_end(
    folder: Path, device: str, flow_steps: int, sizes: dict[str, int], forced_batch: dict[str, int]
) -> dict[str, object]:
    """Text in, audio chunks out, through the service and the pipeline as `synthesize` runs them.

    Random weights never sample the stop token, so each chunk decodes TOKENS_PER_WORD speech tokens per
    word (the length real speech would have). RTF = wall time / audio seconds; time to first audio counts
    from the call until the first audio is in hand (model and voice loaded and warmed up before, as in
    `synthesize`).
    """
    from chatterbox_cli import pipeline

    request = service.LoadRequest(model=str(folder), device=device, batch=0)
    model = service.load(request)
    conds = service.voice(model, None, 0.5)
    settings = pipeline.SynthesisSettings(seed=0, flow_steps=flow_steps)
    out: dict[str, object] = {"preset": model.preset, "flow_steps": flow_steps}

    def length(chunk: str) -> int:
        return max(1, len(chunk.split()) * TOKENS_PER_WORD)

    first, _ = pipeline.prepare_chunks(model.tokenizer, text_of(next(iter(sizes.values()))))
    out["warm_up_s"] = round(service.warm_up(model, conds, first[0], settings), 3)  # as `synthesize` does
    for name, words in sizes.items():
        chunks, _ = pipeline.prepare_chunks(model.tokenizer, text_of(words))
        batch, why = service.batch_size(model, request, len(chunks))
        if name in forced_batch:
            batch, why = forced_batch[name], f"batch {forced_batch[name]} forced by the benchmark"
        _sync()
        start = time.perf_counter()
        first = None
        first_piece: dict[str, object] = {}
        audio = t3_s = s3gen_s = 0.0
        early = model.early_tokens  # as service.ModelHolder.speak does
        for chunk in pipeline.synthesize(
            model, chunks, conds, settings, batch_size=batch, fixed_length=length, early_tokens=early
        ):
            if first is None:
                first = time.perf_counter() - start
                first_piece = {
                    "early": not chunk.final,
                    "t3_s": round(chunk.t3_s, 3),
                    "s3gen_s": round(chunk.s3gen_s, 3),
                }
            audio += chunk.seconds
            t3_s += chunk.t3_s
            s3gen_s += chunk.s3gen_s
        wall = time.perf_counter() - start
        out[name] = {
            "words": words,
            "chunks": len(chunks),
            "batch": batch,
            "audio_s": round(audio, 1),
            "wall_s": round(wall, 2),
            "rtf": round(wall / audio, 4),
            "t3_s": round(t3_s, 2),
            "s3gen_s": round(s3gen_s, 2),
            "first_audio_s": round(first or 0.0, 3),
            "first_piece": first_piece,
        }
        print(json.dumps({name: out[name], "why": why}), file=sys.stderr)
    return out


def _timed(fn):  # noqa: ANN001, ANN202
    _sync()
    t = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - t, result


def _s3gen_breakdown(s3, cond, rows: int, tokens: int) -> dict[str, object]:  # noqa: ANN001
    device = s3.flow.encoder_proj.weight.device
    g = torch.Generator().manual_seed(rows)
    speech = [torch.randint(0, 6561, (tokens,), generator=g).to(device) for _ in range(rows)]
    batch, lens = torch.stack(speech), torch.full((rows,), tokens)

    def gens() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(i) for i in range(rows)]

    def call() -> object:
        if rows == 1:
            return s3.synthesize(batch, cond, generator=gens()[0])
        return s3.synthesize_rows(speech, cond, gens())

    call()  # warm-up at this shape
    total, _ = _timed(call)
    mel_1, _ = _timed(lambda: s3.tokens_to_mel(batch, cond, lens, n_timesteps=1, generator=gens()))
    mel_10, mel = _timed(lambda: s3.tokens_to_mel(batch, cond, lens, n_timesteps=10, generator=gens()))
    hift, _ = _timed(lambda: s3.mel_to_wav(mel, gens(), lens.to(device) * 2))
    step = (mel_10 - mel_1) / 9
    audio = rows * tokens / 25
    table = _kernel_table(call, 1)
    table.pop("result")
    return {
        "audio_s": audio,
        "wall_s": round(total, 3),
        "rtf": round(total / audio, 4),
        "encoder_and_setup_s": round(mel_1 - step, 3),
        "estimator_step_s": round(step, 4),
        "hift_s": round(hift, 3),
        "profile": table,
    }


def s3gen_profile(folder: Path, device: str, shapes: list[tuple[int, int]]) -> dict[str, object]:
    """Where S3Gen's time goes for `rows` chunks of `tokens` speech tokens each (one batched call, as the
    pipeline makes it): flow encoder, one estimator step, HiFT, and the costliest kernels of a call."""
    model = service.load(service.LoadRequest(model=str(folder), device=device, preset="fp16"))
    cond = service.voice(model, None, 0.5).gen.to(model.device, model.dtype)
    out: dict[str, object] = {}
    for rows, tokens in shapes:
        out[f"{rows}x{tokens}"] = _s3gen_breakdown(model.s3gen, cond, rows, tokens)
        print(json.dumps({"s3gen_profile": {f"{rows}x{tokens}": out[f"{rows}x{tokens}"]}}), file=sys.stderr)
    return out


def _stft_mag(wav: torch.Tensor) -> torch.Tensor:
    window = torch.hann_window(1024, device=wav.device)
    return torch.stft(wav.float(), 1024, 256, window=window, return_complex=True).abs()


def s3gen_checks(folder: Path, device: str) -> dict[str, object]:
    """S3Gen in fp16 and bf16 against fp32 on the same noise (flow: mel; HiFT: waveform and STFT
    magnitude from the fp32 mel), and torch.compile of the flow estimator."""
    from chatterbox_cli.models.s3gen import S3Gen

    speech = torch.randint(0, 6561, (1, 250), generator=torch.Generator().manual_seed(1)).to(device)
    model = service.load(service.LoadRequest(model=str(folder), device=device, preset="fp16"))
    conds = service.voice(model, None, 0.5)
    n_frames = 2 * (conds.gen.prompt_token.shape[1] + speech.shape[1])
    noise = torch.randn(1, 80, n_frames, generator=torch.Generator().manual_seed(2)).to(device)
    ref = S3Gen.load(folder / "s3gen.safetensors", device, torch.float32)
    mel32 = ref.tokens_to_mel(speech, conds.gen.to(device, torch.float32), noise=noise)
    wav32 = ref.mel_to_wav(mel32, torch.Generator(device).manual_seed(3))
    del ref
    result: dict[str, object] = {"preset_dtype": str(model.dtype)}
    for dtype in (torch.float16, torch.bfloat16):
        s3 = S3Gen.load(folder / "s3gen.safetensors", device, dtype)
        s3.mel2wav.to_inference_dtype(dtype)
        mel = s3.tokens_to_mel(speech, conds.gen.to(device, dtype), noise=noise).float()
        wav = s3.mel_to_wav(mel32.to(dtype), torch.Generator(device).manual_seed(3)).float()
        mag, mag32 = _stft_mag(wav), _stft_mag(wav32)
        result[str(dtype).removeprefix("torch.")] = {
            "mel_rel_err": round(float((mel - mel32).norm() / mel32.norm()), 5),
            "mel_max_abs_err": round(float((mel - mel32).abs().max()), 4),
            "hift_wav_rel_err": round(float((wav - wav32).norm() / wav32.norm()), 5),
            "hift_stft_mag_rel_err": round(float((mag - mag32).norm() / mag32.norm()), 5),
            "finite": bool(torch.isfinite(mel).all() and torch.isfinite(wav).all()),
        }
        del s3

    def rtf() -> float:
        model.s3gen.synthesize(speech, conds.gen)  # warm-up at the measured length
        _sync()
        t = time.perf_counter()
        wav = model.s3gen.synthesize(speech, conds.gen)
        _sync()
        return round((time.perf_counter() - t) / (wav.shape[-1] / 24_000), 4)

    result["rtf_eager"] = rtf()
    decoder = model.s3gen.flow.decoder
    eager = decoder.estimator
    decoder.estimator = torch.compile(eager, dynamic=True)
    t = time.perf_counter()
    try:
        result["rtf_compiled_estimator"] = rtf()
    except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
        result["rtf_compiled_estimator"] = f"failed: {type(e).__name__}: {e}"[:300]
    result["compile_and_first_runs_s"] = round(time.perf_counter() - t, 1)
    decoder.estimator = eager
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
    ap.add_argument("--modes", default="eager,cuda-graph,compile-reduce-overhead", help="fp16 decode modes")
    ap.add_argument("--batches", default="1,4,8,16", help="texts decoded together (fp16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--e2e", default="sentence:15,paragraph:300,book:6000", help="name:words[:batch],... ('' skips)"
    )
    ap.add_argument("--flow-steps", default="10,6", help="flow-step counts for the end-to-end runs")
    ap.add_argument("--s3gen-checks", action="store_true", help="16-bit parity and compiled estimator")
    ap.add_argument(
        "--s3gen-profile", default="", help="rows x tokens S3Gen breakdowns, e.g. 1x150,32x290 ('' skips)"
    )
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

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "speed.json").write_text(json.dumps(out, indent=2))

    if args.reference_site:
        sys.path.insert(0, args.reference_site)
        out["reference"] = reference_t3(folder, args.tokens, args.device)
        out["ratios_vs_reference_fp32"] = {}
        oom.release_cuda()
        save()
    ours: dict[str, dict] = out["ours"]  # type: ignore[assignment]
    for preset in filter(None, args.presets.split(",")):
        fp16 = preset == "fp16"
        modes = args.modes.split(",") if fp16 else ["cuda-graph"]
        batches = [int(b) for b in args.batches.split(",")] if fp16 and args.batches else []
        ours[preset] = ours_t3(folder, preset, args.tokens, args.device, modes, batches)
        oom.release_cuda()
        if args.reference_site:
            ratio = ours[preset]["tokens_per_s"] / out["reference"]["tokens_per_s"]  # type: ignore[index]
            out["ratios_vs_reference_fp32"][preset] = round(ratio, 2)  # type: ignore[index]
        if "fp16" in ours and "bnb-4bit" in ours:
            out["bnb4_vs_fp16"] = round(ours["bnb-4bit"]["tokens_per_s"] / ours["fp16"]["tokens_per_s"], 2)
        print(json.dumps({preset: ours[preset]}), file=sys.stderr)
        save()
    if args.s3gen_profile:
        shapes = [tuple(int(v) for v in p.split("x")) for p in args.s3gen_profile.split(",")]
        out["s3gen_profile"] = s3gen_profile(folder, args.device, shapes)  # type: ignore[arg-type]
        oom.release_cuda()
        save()
    if args.e2e:
        specs = [p.split(":") for p in args.e2e.split(",")]  # name:words or name:words:batch
        sizes = {spec[0]: int(spec[1]) for spec in specs}
        forced = {spec[0]: int(spec[2]) for spec in specs if len(spec) > 2}
        out["end_to_end"] = {}
        for n in args.flow_steps.split(","):
            out["end_to_end"][f"flow_steps_{n}"] = end_to_end(folder, args.device, int(n), sizes, forced)  # type: ignore[index]
            oom.release_cuda()
            save()
    if args.s3gen_checks:
        out["s3gen"] = s3gen_checks(folder, args.device)
        oom.release_cuda()
    save()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
