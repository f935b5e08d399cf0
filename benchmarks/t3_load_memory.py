"""Peak anonymous memory of loading a full-size T3 on the CPU at fp16. Prints JSON.

    .venv/bin/python benchmarks/t3_load_memory.py [--checkpoint DIR]

DIR holds (or receives) a full-size random `t3_cfg.safetensors` (fp32, ~2.1 GB, like the official one);
default: $TMPDIR/chatterbox-t3-full-random, written once and then reused.

How it is measured. The load runs in a child process. safetensors memory-maps the checkpoint, so the
child's RSS also counts page-cache pages of the mapped file (RssFile) — those are the file, not copies,
and the kernel can drop them at will. What the load really costs is anonymous memory (RssAnon in
/proc/PID/status: heap, malloc'd and mmap'd tensor storage). The kernel keeps no peak of RssAnon (VmHWM
is the peak of the total), so the parent samples the child's RssAnon every ~0.5 ms while it loads. The
baseline is the child's RssAnon after importing torch and chatterbox_cli, right before the load. The
target: peak - baseline <= 1.3 x the fp16 bytes of T3's weights. The child also reports VmHWM and
/proc/self/smaps_rollup's Anonymous line after the load for context.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1.3


def status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def smaps_anonymous_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise KeyError("Anonymous")


def child(path: Path) -> None:
    import torch

    from chatterbox_cli.checkpoint import safetensors_header
    from chatterbox_cli.models.loading import load_t3

    torch.set_num_threads(1)
    header = safetensors_header(path)
    weights_fp16 = sum(info.numel for info in header.values()) * 2
    print(f"READY {status_kib('self', 'RssAnon')}", flush=True)
    sys.stdin.readline()  # the parent's sampler is running
    start = time.perf_counter()
    model = load_t3(path, "cpu", torch.float16)
    seconds = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.float16
    result = {
        "load_seconds": round(seconds, 2),
        "fp16_weight_bytes": weights_fp16,
        "after_rss_anon_kib": status_kib("self", "RssAnon"),
        "after_rss_file_kib": status_kib("self", "RssFile"),
        "after_smaps_anonymous_kib": smaps_anonymous_kib(),
        "vm_hwm_kib": status_kib("self", "VmHWM"),
    }
    print("DONE " + json.dumps(result), flush=True)


def ensure_checkpoint(folder: Path) -> Path:
    path = folder / "t3_cfg.safetensors"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys; from pathlib import Path; import torch; torch.set_num_threads(1);"
            "from chatterbox_cli.testing.checkpoint_writer import write_t3, t3_config_for;"
            "write_t3(Path(sys.argv[1]), t3_config_for('full'), 0)"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=ROOT)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "chatterbox-t3-full-random"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    path = ensure_checkpoint(args.checkpoint)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.wait()
        raise SystemExit(f"child failed before loading: {line!r}")
    baseline = int(line.split()[1])

    peak = baseline
    samples = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            try:
                peak = max(peak, status_kib(proc.pid, "RssAnon"))
            except (OSError, KeyError):
                return
            samples += 1
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    stop.set()
    sampler.join()
    proc.wait()
    if not line.startswith("DONE"):
        raise SystemExit(f"child failed while loading: {line!r}")
    result = json.loads(line[5:])

    weights = result["fp16_weight_bytes"]
    peak_above = (peak - baseline) * 1024
    print(
        json.dumps(
            {
                "benchmark": "t3_load_memory",
                "checkpoint": str(path),
                "checkpoint_bytes": path.stat().st_size,
                "dtype": "float16",
                "device": "cpu",
                "baseline_rss_anon_bytes": baseline * 1024,
                "peak_rss_anon_bytes": peak * 1024,
                "peak_anon_above_baseline_bytes": peak_above,
                "fp16_weight_bytes": weights,
                "ratio_to_fp16_weights": round(peak_above / weights, 3),
                "limit_ratio": LIMIT,
                "within_limit": peak_above <= LIMIT * weights,
                "rss_samples": samples,
                **{k: v for k, v in result.items() if k != "fp16_weight_bytes"},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
