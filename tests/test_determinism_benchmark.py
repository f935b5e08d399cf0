"""benchmarks/determinism.py on the CPU (tiny checkpoint): on a GPU it runs only in short, scarce sessions,
so a break in it shows here first. On the CPU two identical runs must give the same bytes (README, `--seed`):
the same process setup, thread count and kernels sum in the same order every time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_identical_cpu_runs_give_the_same_samples(tiny_checkpoint: str) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "determinism.py"), "--checkpoint", tiny_checkpoint]
    command += ["--device", "cpu", "--max-tokens", "5", "--modes", "default"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    mode = json.loads(done.stdout)["modes"]["default"]
    assert mode["files"] == 7 and mode["same_lengths"]
    assert mode["files_differing"] == 0 and mode["max_abs_lsb"] == 0
    assert all(run["timings"]["synthesis_s"] > 0 for run in mode["runs"])
