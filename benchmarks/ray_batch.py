"""Batch conversion with the local engine against `--engine ray` (1, 2, ... workers) on the same items.

Each run is the real command in a subprocess, as users run it, into a fresh folder:

    chatterbox synthesize --input book.txt --output-dir OUT --model CKPT --device D --seed 1 --json
        [--engine ray --workers N]

so a Ray run pays for starting a local Ray and for its workers loading the model, as it does for a user.
Random weights never choose the stop token, so every item decodes exactly --max-tokens speech tokens:
the same work per item in every run.

    python benchmarks/ray_batch.py [--device cpu|cuda] [--folder DIR] [--size tiny|full] [--items 96]
        [--max-tokens 40] [--flow-steps N] [--workers 1,2] [--repeat 1]

Defaults: CPU, tiny checkpoint, workers 1,2; with --device cuda: full size, workers 1 (one GPU worker).
The checkpoint is written once to --folder/SIZE. Prints one JSON object: per run the wall time and items/s
of the whole command (Ray's start and the workers' model loading included), synthesis items/s (from the
run's own --json summary: for Ray this includes the workers loading the model), steady items/s (finished
files from the first to the last, by their modification times: the rate once every worker is speaking),
whether every file is byte-identical to the local run's, and each Ray run's ratios to the local run and
its overhead in percent (items/s local / items/s Ray - 1), for the whole command and steady.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint  # noqa: E402
from chatterbox_cli.variants import VARIANTS  # noqa: E402

SENTENCES = (
    "The lighthouse keeper climbed the narrow stairs every evening.",
    "He checked the lamp and wrote the weather into his book.",
    "Ships passed far out at sea, more than twenty on some nights.",
    "In winter the storms came from the north.",
    "His daughter visited on Sundays with bread and letters.",
    "She asked him once whether he was lonely.",
)


def ensure_checkpoint(folder: Path, size: str) -> Path:
    if not all((folder / name).exists() for name in VARIANTS["english"].all_files):
        write_random_checkpoint(folder, size, seed=0)
    return folder


def run_once(args: argparse.Namespace, book: Path, out: Path, workers: int | None) -> dict[str, object]:
    command = [sys.executable, "-m", "chatterbox_cli", "synthesize", "--input", str(book)]
    command += ["--output-dir", str(out), "--model", str(args.checkpoint), "--device", args.device]
    command += ["--seed", "1", "--max-tokens", str(args.max_tokens), "--json", "--quiet"]
    if args.flow_steps is not None:
        command += ["--flow-steps", str(args.flow_steps)]
    if workers is not None:
        command += ["--engine", "ray", "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each Ray run starts its own
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    name = "local" if workers is None else f"ray_{workers}"
    if proc.returncode != 0:
        return {"run": name, "error": proc.stdout.strip() or proc.stderr.strip()[-2000:]}
    summary = json.loads(proc.stdout)
    items = summary["items"]["made"]
    synthesis = summary["timings"]["synthesis_s"]
    finished = sorted(p.stat().st_mtime for p in out.glob("*.wav"))
    return {
        "run": name,
        "workers": workers,
        "items": items,
        "audio_s": summary["audio_seconds"],
        "wall_s": round(wall, 2),
        "start_s": summary["timings"].get(
            "start_s", summary["timings"].get("load_s")
        ),  # Ray up / model loaded
        "items_per_s": round(items / wall, 3),
        "synthesis_s": synthesis,
        "synthesis_items_per_s": round(items / synthesis, 3) if synthesis else None,
        "steady_items_per_s": round((len(finished) - 1) / (finished[-1] - finished[0]), 3),
        "notes": summary["notes"],
    }


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.wav"))
    return names == sorted(p.name for p in b.glob("*.wav")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each Ray worker gets one GPU)")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "chatterbox-ray-batch")
    ap.add_argument("--size", choices=("tiny", "full"), default=None, help="default: tiny on CPU, else full")
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=40, help="speech tokens per item (25 per second)")
    ap.add_argument("--flow-steps", type=int, default=None, help="default: the model's (10)")
    ap.add_argument("--workers", default=None, help="Ray worker counts to run; default 1,2 on CPU, 1 on GPU")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (local, ray_1, ...), in that order")
    args = ap.parse_args()
    size = args.size or ("tiny" if args.device == "cpu" else "full")
    args.checkpoint = ensure_checkpoint(args.folder / size, size)
    counts = [int(n) for n in (args.workers or ("1,2" if args.device == "cpu" else "1")).split(",")]

    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews every figure
    work = Path(tempfile.mkdtemp(prefix="ray-batch-"))
    book = work / "book.txt"
    book.write_text("\n".join(SENTENCES[i % len(SENTENCES)] for i in range(args.items)) + "\n")
    runs: list[dict[str, object]] = []
    for round_ in range(args.repeat):
        local = work / f"local-{round_}"
        plain = run_once(args, book, local, None)
        runs.append(plain)
        print(json.dumps(plain), file=sys.stderr, flush=True)
        for n in counts:
            out = work / f"ray-{n}-{round_}"
            result = run_once(args, book, out, n)
            if "error" not in result and "error" not in plain:
                result["same_files_as_local"] = same_files(local, out)
                for key in ("items_per_s", "steady_items_per_s"):
                    ratio = result[key] / plain[key]  # type: ignore[operator]
                    result[f"{key}_ratio"] = round(ratio, 3)
                    result[f"{key}_overhead_pct"] = round((1 / ratio - 1) * 100, 1)
            runs.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)

    import ray
    import torch

    device = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    )
    report = {
        "device": device,
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "checkpoint": size,
        "items": args.items,
        "max_tokens": args.max_tokens,
        "flow_steps": args.flow_steps,
        "runs": runs,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
