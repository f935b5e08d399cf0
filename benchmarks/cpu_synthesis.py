"""CPU synthesis of a 300-word text on a full-size random checkpoint: time to first chunk and RTF, as JSON.

    .venv/bin/python benchmarks/cpu_synthesis.py [--checkpoint DIR] [--words 300] [--threads 2]
                                                 [--tokens-per-word 10] [--flow-steps N]
                                                 [--variants english,turbo]

Each variant's checkpoint (full size, random weights, seed 0) is written once to --checkpoint/VARIANT and
reused. It loads through the service exactly as `chatterbox synthesize --device cpu` does (fp32) and
speaks with the built-in voice and the variant's default sampling and flow steps (--flow-steps overrides
them). With several variants, one after the other in this process, `rtf_ratios` gives each one's RTF
over the first's.

Random weights never choose the stop token, so every chunk would run to --max-tokens. To make the audio
about as long as real speech of the text, each chunk gets max_tokens = tokens_per_word x its words
(10 tokens per word = 2.5 words per second at 25 tokens/s, a normal speaking rate). Chunks are
synthesized one by one through pipeline.synthesize with their index, so seeds are those of a normal run.

Reported: load_s, time_to_first_chunk_s (from the start of synthesis, and from process start),
audio_s, synthesis_s, rtf (synthesis seconds per audio second; below 1 is faster than real time),
T3 tokens/s, S3Gen RTF, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

PROCESS_START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli import pipeline, service  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
from chatterbox_cli.variants import VARIANTS  # noqa: E402

SENTENCES = (
    "The lighthouse keeper climbed the narrow stairs every evening before the sun went down.",
    "He checked the lamp, wiped the salt from the glass, and wrote the weather into his book.",
    "Ships passed far out at sea, and some nights he counted more than twenty of them.",
    "In winter the storms came from the north, and the whole tower hummed like a bell.",
    "His daughter visited on Sundays with bread, letters from town, and news of the harbour.",
    "She asked him once whether he was lonely, and he laughed and pointed at the sea.",
)


def text_of(words: int) -> str:
    out: list[str] = []
    i = 0
    while sum(len(s.split()) for s in out) < words:
        out.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    text = " ".join(out).split()[:words]
    return " ".join(text).rstrip(",") + ("" if text[-1].endswith(".") else ".")


def ensure_checkpoint(folder: Path, variant: str) -> Path:
    if not all((folder / name).exists() for name in VARIANTS[variant].all_files):
        write_random_checkpoint(folder, size="full", seed=0, variant=variant)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "chatterbox-full-random")
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens-per-word", type=float, default=10.0)
    ap.add_argument("--flow-steps", type=int, default=None, help="default: the variant's")
    ap.add_argument("--variants", default="english")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [measure(args, variant) for variant in args.variants.split(",")]
    report: dict[str, object] = {"runs": runs}
    if len(runs) > 1:
        report["rtf_ratios"] = {r["variant"]: round(r["rtf"] / runs[0]["rtf"], 3) for r in runs[1:]}
    print(json.dumps(report, indent=2))


def measure(args: argparse.Namespace, variant: str) -> dict:
    started = time.perf_counter()
    folder = ensure_checkpoint(args.checkpoint / variant, variant)
    write_s = time.perf_counter() - started

    start_load = time.perf_counter()
    model = service.load(service.LoadRequest(model=str(folder), device="cpu", variant=variant))
    settings = pipeline.SynthesisSettings(seed=0, flow_steps=args.flow_steps).for_variant(model.variant)
    conds = service.voice(model, None, float(settings.exaggeration))  # type: ignore[arg-type]
    load_s = time.perf_counter() - start_load

    text = text_of(args.words)
    chunks, _ = pipeline.prepare_chunks(model.tokenizer.for_language(None), text)
    pause = round(settings.pause_seconds * 24_000)

    start = time.perf_counter()
    first_chunk_s = first_from_process_s = None
    audio_frames = tokens = 0
    t3_s = s3gen_s = 0.0
    per_chunk = []
    for i, chunk in enumerate(chunks):
        budget = max(1, round(args.tokens_per_word * len(chunk.split())))
        out = next(
            pipeline.synthesize(model, [chunk], conds, replace(settings, max_tokens=budget), first_index=i)
        )
        if first_chunk_s is None:
            first_chunk_s = time.perf_counter() - start
            first_from_process_s = time.perf_counter() - PROCESS_START
        audio_frames += out.audio.shape[0] + (pause if i else 0)
        tokens += out.speech_tokens
        t3_s += out.t3_s
        s3gen_s += out.s3gen_s
        per_chunk.append(
            {"words": len(chunk.split()), "tokens": out.speech_tokens, "t3_s": round(out.t3_s, 2),
             "s3gen_s": round(out.s3gen_s, 2), "audio_s": round(out.seconds, 2)}
        )  # fmt: skip
    synthesis_s = time.perf_counter() - start
    audio_s = audio_frames / 24_000

    return {
        "benchmark": "cpu_synthesis",
        "variant": variant,
        "words": len(text.split()),
        "chunks": len(chunks),
        "threads": args.threads,
        "torch": torch.__version__,
        "device": str(model.device),
        "preset": model.preset,
        "flow_steps": settings.flow_steps,
        "tokens_per_word": args.tokens_per_word,
        "checkpoint_write_s": round(write_s, 1),
        "load_s": round(load_s, 2),
        "time_to_first_chunk_s": round(first_chunk_s or 0.0, 2),
        "time_to_first_chunk_from_process_start_s": round(first_from_process_s or 0.0, 2),
        "audio_s": round(audio_s, 2),
        "synthesis_s": round(synthesis_s, 2),
        "rtf": round(synthesis_s / audio_s, 3),
        "t3_tokens": tokens,
        "t3_tokens_per_s": round(tokens / t3_s, 2),
        "s3gen_rtf": round(s3gen_s / (audio_frames / 24_000), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "per_chunk": per_chunk,
    }


if __name__ == "__main__":
    main()
