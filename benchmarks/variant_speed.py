"""T3 decoding speed and GPU memory of the other variants (multilingual: alignment guard on; Turbo: GPT-2,
no CFG) against English.

For each preset, each variant is loaded through the service as `synthesize` loads it (full-size random
weights in the official layout, written here if missing) and decodes one sentence at batch 1 with its own
generation defaults (English and multilingual with CFG, Turbo without), --tokens tokens with the stop
token ignored (random weights never stop on their own; the guard's work per step is the same either way),
then S3Gen renders them (with the variant's flow steps and trailing silence): the whole pipeline of one
utterance. Per variant and preset: T3 tokens/s (median of --repeat runs, CUDA graphs), peak
torch-allocated memory from before loading to the end of the rendering, and the ratios variant /
English, side by side from one process on one GPU.

    python benchmarks/variant_speed.py --folder /tmp/ck-variants [--variants english,turbo]
        [--presets fp16,bnb-4bit] [--tokens 500]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli import oom, service  # noqa: E402
from chatterbox_cli.models.conds import S3GEN_SILENCE_TOKEN  # noqa: E402
from chatterbox_cli.pipeline import SynthesisSettings, text_tokens  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
from chatterbox_cli.variants import VARIANTS  # noqa: E402

TEXTS = {
    "english": ("en", "The keeper lit the lamp and watched the sea until the ships came home."),
    "multilingual": ("fr", "Le gardien alluma la lampe et regarda la mer jusqu'au retour des bateaux."),
    "turbo": ("en", "The keeper lit the lamp [sigh] and watched the sea until the ships came home."),
}


def measure(folder: Path, variant: str, preset: str, tokens: int, repeat: int) -> dict[str, object]:
    oom.release_cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    request = service.LoadRequest(model=str(folder), preset=preset, variant=variant, max_tokens=tokens)
    model = service.load(request)
    language, sentence = TEXTS[variant]
    text, _ = text_tokens(model.tokenizer.for_language(language), sentence, 0, model.t3.config)
    settings = SynthesisSettings().for_variant(model.variant)
    conds = service.voice(model, None, float(settings.exaggeration))  # type: ignore[arg-type]
    cond = conds.t3.to(model.device)
    speeds = []
    for i in range(repeat + 1):  # the first run captures the graph and warms up
        generator = torch.Generator(model.device).manual_seed(i)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.t3.generate(
            text,
            cond,
            max_new_tokens=tokens,
            cfg_weight=float(settings.cfg_weight),  # type: ignore[arg-type]
            sampling=settings.sampling(model.variant),
            generator=generator,
            ignore_stop=True,
        )
        torch.cuda.synchronize()
        if i:
            speeds.append(out.numel() / (time.perf_counter() - start))
    silence = torch.full((model.variant.generation.trailing_silence,), S3GEN_SILENCE_TOKEN, device=out.device)
    speech = torch.cat((out.clamp(max=6560), silence))[None]
    gen = conds.gen.to(model.device, model.flow_dtype)
    model.use("s3gen")
    model.s3gen.synthesize(speech, gen, n_timesteps=settings.flow_steps)
    torch.cuda.synchronize()
    result = {
        "variant": variant,
        "preset": model.preset,
        "alignment_heads": [list(h) for h in model.t3.alignment_heads],
        "text_tokens": text.numel(),
        "decode_mode": model.t3.last_decode_mode,
        "tokens_per_s": round(statistics.median(speeds), 1),
        "flow_steps": settings.flow_steps,
        "peak_allocated_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 4),
    }
    del model, conds, cond
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/ck-variants"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="English and the others to compare")
    ap.add_argument("--presets", default="fp16,bnb-4bit")
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("variant_speed.py needs a CUDA GPU")
    names = ["english", *[n for n in args.variants.split(",") if n != "english"]]
    folders = {}
    for name in names:
        folders[name] = args.folder / name
        if not (folders[name] / VARIANTS[name].file("t3")).exists():
            write_random_checkpoint(folders[name], "full", seed=0, variant=name)
    runs = []
    for preset in args.presets.split(","):
        measured = {name: measure(folders[name], name, preset, args.tokens, args.repeat) for name in names}
        for run in measured.values():
            print(json.dumps(run), file=sys.stderr, flush=True)
        en = measured["english"]
        row: dict[str, object] = {"preset": preset, **measured}
        for name in names[1:]:
            other = measured[name]
            row[f"{name}_speed_ratio"] = round(other["tokens_per_s"] / en["tokens_per_s"], 3)  # type: ignore[operator]
            row[f"{name}_peak_ratio"] = round(other["peak_allocated_gib"] / en["peak_allocated_gib"], 4)  # type: ignore[operator]
        runs.append(row)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": args.tokens}
    print(json.dumps({**report, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
