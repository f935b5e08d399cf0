"""Where the time to first audio goes, on the path `chatterbox synthesize` takes.

Runs `jobs.run_synthesize` in this process (what the CLI calls), once per preset, with the card to itself,
and records when each step of the first chunk starts and ends: batch sizing, T3's prefill and graph
capture (`start_batch`), the decode steps up to the early piece, T3 and S3Gen taking turns (bnb-4bit-swap),
S3Gen's early rendering, the WAV write.
Each probe synchronizes the GPU before it reads the clock, so a step's figure is its own work.

    python benchmarks/first_audio.py --checkpoint DIR [--presets fp16,bnb-8bit] [--repeat 2]
        [--early bnb-8bit=16,bnb-4bit-swap=24]   (another early-piece length for a preset, to measure it)
        [--variant turbo]                        (the checkpoint's variant; written there if missing)

Prints one JSON object: per preset and repeat, first_audio_s as the CLI reports it and the steps in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatterbox_cli import jobs, oom, pipeline, presets, service  # noqa: E402
from chatterbox_cli.audio import StreamingWavWriter  # noqa: E402
from chatterbox_cli.models.s3gen.s3gen import S3Gen  # noqa: E402
from chatterbox_cli.models.t3 import T3, Decoding  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
from chatterbox_cli.variants import VARIANTS  # noqa: E402

SENTENCE = "The keeper lit the lamp and watched the sea."
STEPS: list[tuple[str, float, float]] = []


def probe(owner: object, name: str, label: str) -> None:
    """Wrap owner.name so each call appends (label, start, end), GPU synchronized at both ends."""
    original: Callable[..., object] = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: object, **kwargs: object) -> object:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        STEPS.append((label, start, time.perf_counter()))
        return result

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--presets", default="fp16,bnb-8bit,bnb-4bit,bnb-4bit-swap")
    parser.add_argument("--repeat", type=int, default=2, help="runs per preset (the first loads cold)")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--early", default="", help="PRESET=TOKENS,...: another early-piece length")
    parser.add_argument("--variant", default="english", choices=sorted(VARIANTS))
    args = parser.parse_args()
    for item in filter(None, args.early.split(",")):
        name, tokens = item.split("=")
        presets.PRESETS[name] = dataclasses.replace(presets.PRESETS[name], early_tokens=int(tokens))
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / VARIANTS[args.variant].file("t3")).exists():
        write_random_checkpoint(checkpoint, "full", seed=0, variant=args.variant)

    probe(service, "batch_size", "batch size")
    probe(T3, "start_batch", "T3 prefill + graph capture")
    probe(Decoding, "run", "T3 decode steps")
    probe(S3Gen, "synthesize", "S3Gen render")
    probe(StreamingWavWriter, "write", "WAV write")
    probe(service.LoadedModel, "use", "turn on the GPU")  # bnb-4bit-swap's moves between T3 and S3Gen
    probe(service, "warm_up", "warm-up")  # the CLI's first_audio_s counts from its end

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report: dict[str, object] = {"gpu": gpu, "torch": torch.__version__, "variant": args.variant, "runs": []}
    work = Path(tempfile.mkdtemp(prefix="first-audio-"))
    for preset in args.presets.split(","):
        for repeat in range(args.repeat):
            load = service.LoadRequest(
                model=str(checkpoint), preset=preset, max_tokens=args.max_tokens, variant=args.variant
            )
            settings = pipeline.SynthesisSettings(seed=1, max_tokens=args.max_tokens)
            job = jobs.SynthesizeJob(
                SENTENCE, None, str(work / f"{preset}.wav"), None, None, settings, load, quiet=True
            )
            STEPS.clear()
            summary = jobs.run_synthesize(job)
            timings = summary["timings"]
            origin = next((end for label, _, end in STEPS if label == "warm-up"), STEPS[0][1])
            first_write = next(s for s in STEPS if s[0] == "WAV write")
            steps = [
                {"step": label, "at_s": round(start - origin, 4), "took_s": round(end - start, 4)}
                for label, start, end in STEPS
                if start >= origin and end <= first_write[2]
            ]
            run = {
                "preset": summary["preset"],
                "early_tokens": presets.PRESETS[preset].early_tokens,
                "repeat": repeat,
                "first_audio_s": timings["first_audio_s"],  # type: ignore[index]
                "warm_up_s": timings["warm_up_s"],  # type: ignore[index]
                "load_s": timings["load_s"],  # type: ignore[index]
                "first_write_after_warm_up_s": round(first_write[2] - origin, 4),
                "steps": steps,
            }
            report["runs"].append(run)  # type: ignore[union-attr]
            print(json.dumps(run), file=sys.stderr, flush=True)
            oom.release_cuda()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
