"""benchmarks/serve_load.py end to end on the CPU (tiny checkpoint): it runs on a GPU only in short, scarce
sessions, so this is where a break in it shows first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_serve_load_reports_every_request_from_clients_in_several_processes(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    """Three clients in processes of two (so two processes), one measured request each: the report counts
    the three requests, none failed, each has audio and a time to first byte, and the server's log shows
    rounds for them."""
    command = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--checkpoint", tiny_checkpoint]
    command += ["--clients", "3", "--requests", "1", "--max-tokens", "5", "--clients-per-process", "2"]
    command += ["--server-args", "--device cpu --max-batch 4", "--log", str(tmp_path / "server.log")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (level,) = json.loads(done.stdout)["levels"]
    assert level["client_processes"] == 2 and level["requests"] == 3 and level["errors"] == []
    assert level["ttfb_p95_s"] > 0 and level["audio_s_per_request"] > 0
    assert 1 <= level["largest_group"] <= 3
    rounds = level["server_rounds"]  # from the server's log: every measured request had a round
    assert sum(int(size) * n for size, n in rounds["requests_per_round"].items()) >= 3
    assert rounds["starting_first_audio_p50_s"] > 0
