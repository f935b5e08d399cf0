"""Killing a running synthesis (a real subprocess) leaves valid audio holding exactly the finished chunks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_cli import pipeline, service
from chatterbox_cli.audio import join_pause
from chatterbox_cli.batch import MANIFEST_NAME
from chatterbox_cli.cli import run
from chatterbox_cli.jobs import HoldInterrupts

EnvFactory = Callable[..., dict[str, str]]
FAST = ("--device", "cpu", "--max-tokens", "20", "--flow-steps", "2", "--seed", "7")
LONG_TEXT = " ".join(
    f"This is sentence number {i}, which is long enough to be a chunk of its own in this test text."
    for i in range(80)
)


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "chatterbox_cli", "synthesize", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"synthesis ended (exit {proc.returncode}) before the signal: {proc.stderr.read()!r}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no audio appeared in time")
        time.sleep(0.005)


def _frames(path: Path) -> int:
    try:
        return sf.info(str(path)).frames
    except (RuntimeError, OSError):
        return 0


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: str) -> tuple[np.ndarray, list[int]]:
    """What an unbroken run writes for LONG_TEXT (16-bit samples), and the sample count after each chunk."""
    model = service.load(service.LoadRequest(model=tiny_checkpoint, device="cpu"))
    conds = service.voice(model, None, 0.5)
    settings = pipeline.SynthesisSettings(seed=7, max_tokens=20, flow_steps=2)
    chunks, _ = pipeline.prepare_chunks(model.tokenizer, LONG_TEXT)
    pause = join_pause(24_000, settings.pause_seconds)
    pieces = [
        np.concatenate([pause, c.audio]) if c.index else c.audio
        for c in pipeline.synthesize(model, chunks, conds, settings)
    ]
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    return np.rint(np.clip(np.concatenate(pieces), -1, 1) * 32767).astype(np.int16), ends


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_single_output_keeps_the_finished_chunks(
    how: signal.Signals,
    tiny_checkpoint: str,
    tmp_path: Path,
    make_child_env: EnvFactory,
    reference: tuple[np.ndarray, list[int]],
) -> None:
    (tmp_path / "long.txt").write_text(LONG_TEXT)
    out = tmp_path / "out.wav"
    proc = _start(
        ["--input", "long.txt", "-o", "out.wav", "--model", tiny_checkpoint, *FAST],
        tmp_path,
        make_child_env(),
    )
    _wait_for(lambda: _frames(out) > 0, proc)
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=60)
    message = stderr.decode()

    kept, sr = sf.read(str(out), dtype="int16")
    assert sr == 24_000 and kept.ndim == 1 and kept.shape[0] > 0
    if how == signal.SIGINT:
        assert proc.returncode == 130, message
        found = re.search(
            r"interrupted: kept out\.wav with ([\d.]+) s of audio \((\d+) of (\d+) chunks\)", message
        )
        assert found, message
        seconds, done, total = float(found[1]), int(found[2]), int(found[3])
        assert seconds == pytest.approx(kept.shape[0] / 24_000, abs=0.06) and 1 <= done < total
        # the header is exact: no half-written chunk follows the data
        assert out.stat().st_size == 44 + 2 * kept.shape[0]
    else:
        assert proc.returncode == -signal.SIGKILL
    # what was kept ends at a chunk boundary and equals an unbroken run's first chunks
    full, ends = reference
    assert kept.shape[0] in ends[:-1]
    # (±1 LSB: this process and the child may use different thread counts, so float sums can round apart)
    np.testing.assert_allclose(kept.astype(np.int32), full[: kept.shape[0]], rtol=0, atol=1)
    if how == signal.SIGINT:
        assert ends.index(kept.shape[0]) + 1 == done


def test_interrupted_batch_keeps_finished_items_and_a_rerun_continues(
    tiny_checkpoint: str,
    tmp_path: Path,
    make_child_env: EnvFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    book = tmp_path / "book.txt"
    book.write_text("\n".join(f"Line number {i} of the book." for i in range(60)))
    out = tmp_path / "out"
    args = ["--input", str(book), "--output-dir", str(out), "--model", tiny_checkpoint, *FAST]
    proc = _start(args, tmp_path, make_child_env())
    manifest = out / MANIFEST_NAME
    _wait_for(lambda: manifest.exists() and manifest.read_text().count("\n") >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"run the same command again to continue" in stderr
    assert not list(out.glob(".*.part"))  # the unfinished item was removed
    finished = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert 1 <= len(finished) < 60
    for entry in finished:
        assert sf.info(str(out / entry["file"])).frames == entry["frames"]

    capsys.readouterr()
    assert run(["synthesize", *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["items"] == {"total": 60, "made": 60 - len(finished), "skipped": len(finished)}
    assert sorted(p.name for p in out.glob("*.wav")) == [f"{i:04d}.wav" for i in range(1, 61)]


# --------------------------------------------------------------------------------------------------
# Ctrl-C inside a write waits for the write to finish


def _let_the_handler_run() -> None:
    for _ in range(100):  # function calls are where Python runs pending signal handlers
        time.sleep(0)


def test_sigint_inside_a_critical_block_is_raised_when_the_block_ends() -> None:
    holder = HoldInterrupts()
    steps: list[str] = []
    with holder.installed():
        with pytest.raises(KeyboardInterrupt):
            with holder.critical():
                os.kill(os.getpid(), signal.SIGINT)
                _let_the_handler_run()
                steps.append("rest of the block")
            steps.append("after the block")
        assert steps == ["rest of the block"]
        with holder.critical():  # the held interrupt was delivered once, not again
            _let_the_handler_run()
        with pytest.raises(KeyboardInterrupt):  # outside a critical block it is raised at once
            os.kill(os.getpid(), signal.SIGINT)
            _let_the_handler_run()
            steps.append("outside")
    assert steps == ["rest of the block"]


_SIGINT_IN_A_WRITE = """
import io, os, signal, sys
import chatterbox_cli.audio as audio

class SignalledMidWrite(io.FileIO):
    # SIGINT arrives halfway through the second chunk's samples (the OS took half of them so far).
    payloads = 0

    def write(self, data):
        if len(data) > 64:  # samples, not the header or a size field
            SignalledMidWrite.payloads += 1
            if SignalledMidWrite.payloads == 2:
                written = super().write(bytes(data)[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGINT)
                return written
        return super().write(data)

audio.open = lambda file, mode="r", buffering=-1: SignalledMidWrite(file, mode.replace("b", ""))
from chatterbox_cli.cli import main
main()
"""


def test_sigint_during_a_chunk_write_keeps_that_chunk_whole(
    tiny_checkpoint: str,
    tmp_path: Path,
    make_child_env: EnvFactory,
    reference: tuple[np.ndarray, list[int]],
) -> None:
    (tmp_path / "long.txt").write_text(LONG_TEXT)
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_IN_A_WRITE, "synthesize", "--input", "long.txt", "-o", "out.wav"]
        + ["--model", tiny_checkpoint, *FAST],
        cwd=tmp_path,
        env=make_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    out = tmp_path / "out.wav"
    kept, _ = sf.read(str(out), dtype="int16")
    full, ends = reference
    assert kept.shape[0] == ends[1]  # both chunks, the second one whole
    assert out.stat().st_size == 44 + 2 * ends[1]  # and the header counts all of it
    np.testing.assert_allclose(kept.astype(np.int32), full[: ends[1]], rtol=0, atol=1)
    found = re.search(
        r"interrupted: kept out\.wav with [\d.]+ s of audio \((\d+) of \d+ chunks\)", proc.stderr
    )
    assert found, proc.stderr
    assert found[1] == "2"  # the message counts what the file holds
