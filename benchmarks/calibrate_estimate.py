"""Workspace calibration factors for chatterbox_cli/estimate.py from a benchmarks/memory.py run.

    python benchmarks/calibrate_estimate.py memory.json --checkpoint FOLDER [--preset fp16]

For the chosen preset's uncapped run it divides the measured peak workspaces (T3: peak during decoding
minus weights and KV cache; S3Gen: peak during synthesis minus weights) by what this version's formulas
count before scaling (for the run's token counts and the checkpoint's shapes), and prints the factors.
Put them into T3_WORKSPACE_SCALE and S3GEN_WORKSPACE_SCALE and name the GPU in CALIBRATION. fp16 is the
default source: the bnb presets park the vocoder, which moves its weights between the two phases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_cli import estimate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("memory_json", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the run's checkpoint (headers only)")
    ap.add_argument("--preset", default="fp16")
    args = ap.parse_args()
    data = json.loads(args.memory_json.read_text())
    runs = [r for r in data["runs"] if r.get("preset") == args.preset and r.get("cap_gib") is None]
    if not runs or "stages" not in runs[0]:
        sys.exit(f"no uncapped {args.preset} run with stages in {args.memory_json}")
    run = runs[0]
    stages, details = run["stages"], run["estimate"]["details"]
    weights, kv = run["weights_allocated"], run["estimate"]["kv_cache_bytes"]
    t3 = stages["t3_generate"]["peak_allocated"] - weights - kv
    s3 = stages["s3gen_synthesize"]["peak_allocated"] - weights
    shape = estimate.t3_shape(estimate.read_headers(args.checkpoint)["t3"])
    tokens, batch, cfg, text = details["max_tokens"], details["batch"], details["cfg"], details["text_tokens"]
    t3_counted = estimate.t3_workspace_bytes(shape, tokens, batch, cfg, text) / estimate.T3_WORKSPACE_SCALE
    s3_counted = estimate.s3gen_workspace_bytes(tokens, batch, cfg) / estimate.S3GEN_WORKSPACE_SCALE
    print(
        json.dumps(
            {
                "gpu": run.get("gpu"),
                "date": data.get("date"),
                "t3_workspace_measured": t3,
                "t3_workspace_counted": round(t3_counted),
                "T3_WORKSPACE_SCALE": round(t3 / t3_counted, 2),
                "s3gen_workspace_measured": s3,
                "s3gen_workspace_counted": round(s3_counted),
                "S3GEN_WORKSPACE_SCALE": round(s3 / s3_counted, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
