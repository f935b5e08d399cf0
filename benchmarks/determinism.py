"""Do two identical `synthesize` runs give the same bytes? Runs the command users type twice (seven lines as
a batch folder, `--split lines --batch 3 --seed 1`) and compares every WAV sample by sample. With the
`deterministic` mode it does the same under PyTorch's deterministic algorithms (cuDNN's deterministic
mode, `CUBLAS_WORKSPACE_CONFIG=:4096:8`), to show whether the differences come from kernels whose order of
additions is not fixed, and what fixing it costs in time.

    python benchmarks/determinism.py --checkpoint DIR [--device cuda] [--max-tokens 150]
        [--modes default,deterministic] > out.json

Writes a full-size random checkpoint to DIR first if DIR has none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LINES = [
    "One line.",
    "Two lines here.",
    "The third line is longer than the others.",
    "Four.",
    "Five is here too.",
    "Six, and a comma.",
    "Seven ends it.",
]
SETUP = {
    "default": "",
    "deterministic": "torch.use_deterministic_algorithms(True, warn_only=True); "
    "torch.backends.cudnn.deterministic = True; torch.backends.cudnn.benchmark = False",
}
TIMINGS = ("first_audio_s", "t3_s", "s3gen_s", "synthesis_s")


def synthesize(mode: str, args: argparse.Namespace, text: Path, out: Path) -> dict[str, object]:
    argv = ["chatterbox", "synthesize", "--input", str(text), "--split", "lines", "--batch", "3"]
    argv += ["--model", args.checkpoint, "--device", args.device, "--seed", "1"]
    argv += ["--max-tokens", str(args.max_tokens), "--output-dir", str(out), "--json", "--quiet"]
    run = "runpy.run_module('chatterbox_cli', run_name='__main__')"
    code = f"import runpy, sys, torch\n{SETUP[mode]}\nsys.argv = {argv!r}\n{run}"
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    if mode == "deterministic":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{mode} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    timings = json.loads(done.stdout)["timings"]
    warnings = sorted({line.strip() for line in done.stderr.splitlines() if "determinis" in line.lower()})
    return {"timings": {k: timings[k] for k in TIMINGS}, "warnings": warnings}


def samples(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.int32)


def compare(first: Path, second: Path) -> dict[str, object]:
    total = differing = largest = files_differing = 0
    names = sorted(p.name for p in first.glob("*.wav"))
    for name in names:
        a, b = samples(first / name), samples(second / name)
        if len(a) != len(b):
            return {"files": len(names), "same_lengths": False}
        diff = np.abs(a - b)
        total += len(a)
        differing += int(np.count_nonzero(diff))
        largest = max(largest, int(diff.max(initial=0)))
        files_differing += bool(diff.any())
    return {
        "files": len(names),
        "same_lengths": True,
        "files_differing": files_differing,
        "samples_differing_pct": round(100 * differing / max(total, 1), 2),
        "max_abs_lsb": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--modes", default="default,deterministic")
    args = parser.parse_args()
    if not (Path(args.checkpoint) / "t3_cfg.safetensors").exists():
        sys.path.insert(0, str(ROOT))
        from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

        print(f"writing a full-size random checkpoint to {args.checkpoint}", file=sys.stderr)
        write_random_checkpoint(Path(args.checkpoint), "full", seed=0)
    report: dict[str, object] = {"device": args.device, "max_tokens": args.max_tokens, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "lines.txt"
        text.write_text("\n".join(LINES) + "\n")
        for mode in args.modes.split(","):
            runs = [synthesize(mode, args, text, Path(tmp) / f"{mode}{n}") for n in (1, 2)]
            report["modes"][mode] = {"runs": runs, **compare(Path(tmp) / f"{mode}1", Path(tmp) / f"{mode}2")}
            print(mode, json.dumps(report["modes"][mode]), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
