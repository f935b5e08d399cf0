"""Small cards for real: `chatterbox synthesize` as users run it, beside a process that leaves N GiB free.

For each N a holder process (chatterbox_cli.testing.gpu_holder) takes GPU memory until NVML reports N GiB
free; then the real CLI runs as a subprocess (`python -m chatterbox_cli synthesize ... --json`) on:
  long      the 303-word, 20-sentence text in benchmarks/texts/small_card_long.txt (every N)
  long-b1   the same with --batch 1, so memory after chunk 2 and after the last compare like with like
            (N in --growth-at)
  sentence  one short sentence (N in --extra-at)
  voice     the long text's first three sentences with --voice clip.wav, an 8 s clip (N in --extra-at)
  batch     a 5-line file with --output-dir --split lines (N in --extra-at)
A sampler thread reads the subprocess's NVML memory every 10 ms; the CLI itself appends its memory after
every chunk when CHATTERBOX_MEMORY_TRACE is set (service.trace_memory). Per run it reports: exit code,
preset and device, step-downs, first audio, RTF, peak NVML process memory, memory after chunk 2 and after
the last chunk, whether stderr held a traceback, and stderr's line count.

    python benchmarks/small_card.py --checkpoint DIR [--free 1,1.25,...] [--extra-at 1,1.5,2.5] > out.json

Prints one JSON object on stdout and a table on stderr. A full-size random checkpoint is written to DIR
first if DIR holds none. Before the runs, each quantized preset is loaded once with the card to itself, so
the quantized-weight cache is warm and the table compares steady loads; those runs also give each preset's
first audio with nothing else on the GPU.
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

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatterbox_cli.testing.gpu_holder import HeldGpu  # noqa: E402

LONG_TEXT = (ROOT / "benchmarks" / "texts" / "small_card_long.txt").read_text(encoding="utf-8")
SENTENCE = "The keeper lit the lamp and watched the sea."
FREE_GIB = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)
EXTRA_AT = (1.0, 1.5, 2.5)
PRESETS = ("fp16", "bnb-8bit", "bnb-4bit", "bnb-4bit-swap")


class Sampler(threading.Thread):
    """NVML memory of one process every `period` seconds, until stopped: the peak and the samples."""

    def __init__(self, pid: int, index: int = 0, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        import pynvml

        self.pynvml, self.pid, self.period = pynvml, pid, period
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.peak = 0
        self.samples = 0
        self.stopping = threading.Event()

    def read(self) -> int:
        for p in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if p.pid == self.pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return 0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, self.read())
            self.samples += 1
            time.sleep(self.period)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.pynvml.nvmlShutdown()


def voice_clip(path: Path, seconds: float = 8.0, sr: int = 24_000) -> Path:
    """A speech-like clip: a voiced tone with formant-like harmonics, syllable-rate loudness and pauses."""
    t = np.arange(int(seconds * sr)) / sr
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.25 * t) > -0.6)
    sf.write(path, (0.2 * voiced * syllables).astype(np.float32), sr)
    return path


def synthesize(args: list[str], env: dict[str, str], timeout: float, cwd: Path) -> dict[str, object]:
    trace = cwd / "trace.jsonl"
    trace.unlink(missing_ok=True)
    command = [sys.executable, "-m", "chatterbox_cli", "synthesize", *args, "--json"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**env, "CHATTERBOX_MEMORY_TRACE": str(trace)},
    )
    sampler = Sampler(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = "timeout"
    sampler.stop()
    wall = time.perf_counter() - started
    try:
        summary = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        summary = {"unparsed_stdout": out[-500:]}
    chunks = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    after = {c["chunk"]: c["nvml_process_bytes"] for c in chunks if c.get("nvml_process_bytes")}
    last = max(after) if after else None
    timings = summary.get("timings", {}) if isinstance(summary, dict) else {}
    result: dict[str, object] = {
        "exit_code": code,
        "wall_s": round(wall, 2),
        "preset": summary.get("preset"),
        "device": summary.get("device"),
        "step_downs": summary.get("step_downs"),
        "notes": summary.get("notes"),
        "error": summary.get("error"),
        "audio_s": summary.get("audio_seconds"),
        "first_audio_s": timings.get("first_audio_s"),
        "load_s": timings.get("load_s"),
        "warm_up_s": timings.get("warm_up_s"),
        "rtf": timings.get("rtf"),
        "peak_nvml_gib": round(sampler.peak / 2**30, 3),
        "nvml_samples": sampler.samples,
        "after_chunk_2_gib": round(after[2] / 2**30, 3) if 2 in after else None,
        "after_last_chunk_gib": round(after[last] / 2**30, 3) if last else None,
        "last_chunk": last,
        "growth_pct": round(100 * (after[last] / after[2] - 1), 2) if last and 2 in after else None,
        "torch_reserved_after_chunks_gib": [round(c["reserved_bytes"] / 2**30, 3) for c in chunks],
        # per torch memory pool: [segments, reserved MiB] after chunk 2 and after the last chunk
        "pools_chunk_2_and_last": [
            {k: [v[0], round(v[1] / 2**20, 1)] for k, v in c.get("pools", {}).items()}
            for c in chunks
            if c["chunk"] in (2, last)
        ],
        "traceback": "Traceback (most recent call last)" in err,
        "stderr_lines": len(err.splitlines()),
    }
    if code not in (0,):
        result["stderr_tail"] = err[-1500:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--free", default=",".join(map(str, FREE_GIB)), help="N values, GiB free (NVML)")
    parser.add_argument("--extra-at", default=",".join(map(str, EXTRA_AT)), help="N for sentence/voice/batch")
    parser.add_argument("--extras", default="sentence,voice,batch", help="the scenarios run at --extra-at")
    parser.add_argument("--no-long-at", default="", help="N where the long text is skipped (on the CPU)")
    parser.add_argument("--growth-at", default="", help="N for the long text with --batch 1 (growth)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="presets warmed (first audio alone)")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--options", default="", help="extra synthesize options for every run")
    parser.add_argument("--env", default="", help="extra environment for every run: KEY=VALUE;KEY=VALUE")
    parser.add_argument("--out", help="also write the JSON here, after every run (a cut-off run keeps them)")
    args = parser.parse_args()

    import torch

    from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "t3_cfg.safetensors").exists():
        print(f"writing a full-size random checkpoint to {checkpoint}", file=sys.stderr)
        write_random_checkpoint(checkpoint, "full", seed=0)
    work = Path(tempfile.mkdtemp(prefix="small-card-"))
    (work / "long.txt").write_text(LONG_TEXT, encoding="utf-8")
    (work / "lines.txt").write_text("\n".join(LONG_TEXT.split(". ")[:5]) + "\n", encoding="utf-8")
    clip = str(voice_clip(work / "clip.wav"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    env.update(item.split("=", 1) for item in args.env.split(";") if item)
    common = ["--model", str(checkpoint), "--max-tokens", str(args.max_tokens), "--seed", "1"]
    common += args.options.split()
    scenarios = {
        "long": ["--input", str(work / "long.txt"), "-o", str(work / "long.wav")],
        "long-b1": ["--input", str(work / "long.txt"), "-o", str(work / "long.wav"), "--batch", "1"],
        "sentence": [SENTENCE, "-o", str(work / "sentence.wav")],
        "voice": [
            ". ".join(LONG_TEXT.split(". ")[:3]) + ".",
            "--voice",
            str(clip),
            "-o",
            str(work / "v.wav"),
        ],
        "batch": [
            "--input",
            str(work / "lines.txt"),
            "--output-dir",
            str(work / "batch"),
            "--split",
            "lines",
        ],
    }
    report: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "max_tokens": args.max_tokens,
        "options": args.options,
        "env": args.env,
        "alone": {},
        "runs": [],
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")

    for preset in filter(None, args.presets.split(",")):
        one = ["--preset", preset, SENTENCE, "-o", str(work / f"alone-{preset}.wav")]
        report["alone"][preset] = synthesize([*common, *one], env, args.timeout, work)  # type: ignore[index]
        r = report["alone"][preset]  # type: ignore[index]
        print(f"alone {preset}: exit {r['exit_code']} first audio {r['first_audio_s']}", file=sys.stderr)
        save()
    extra = {float(x) for x in args.extra_at.split(",") if x}
    growth = {float(x) for x in args.growth_at.split(",") if x}
    for free in (float(x) for x in args.free.split(",") if x):
        skip = {float(x) for x in args.no_long_at.split(",") if x}
        names = ([] if free in skip else ["long"]) + (["long-b1"] if free in growth else [])
        names += [n for n in args.extras.split(",") if n] if free in extra else []
        with HeldGpu(free) as held:
            for name in names:
                if name == "batch":
                    subprocess.run(["rm", "-rf", str(work / "batch")], check=True)
                # a fresh voice cache for each voice run, so that the clip is prepared beside the holder
                home = {"HF_HOME": tempfile.mkdtemp(prefix="hf-", dir=work)} if name == "voice" else {}
                run = synthesize([*common, *scenarios[name]], {**env, **home}, args.timeout, work)
                run.update(free_gib=free, nvml_free_gib=round(held.free_bytes / 2**30, 3), text=name)
                report["runs"].append(run)  # type: ignore[union-attr]
                save()
                print(
                    f"N={free:<5} {name:<8} exit {run['exit_code']!s:<7} {run['preset']!s:<18} "
                    f"first {run['first_audio_s']!s:<6} rtf {run['rtf']!s:<7} peak {run['peak_nvml_gib']} "
                    f"growth {run['growth_pct']}% steps {run['step_downs']} tb {run['traceback']}",
                    file=sys.stderr,
                    flush=True,
                )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
