"""`chatterbox synthesize` end to end on a tiny random checkpoint: outputs, voices, bad input, exit codes."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import FAST
from rich.console import Console

from chatterbox_cli.cli import run
from chatterbox_cli.progress import Progress

EnvFactory = Callable[..., dict[str, str]]
# Each sentence is long enough (> 30 text tokens) that the chunker does not pack the two together.
TWO_SENTENCES = (
    "The first sentence is right here, with quite a few words that keep going on and on for a while. "
    "The second one follows it closely, also with many words that make it too long to share a chunk."
)


def sine_clip(
    path: Path, seconds: float, sr: int = 16_000, channels: int = 1, subtype: str = "PCM_16"
) -> Path:
    """A voiced-sounding test clip: a 140 Hz tone with harmonics, amplitude-modulated at 4 Hz."""
    t = np.arange(round(seconds * sr)) / sr
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    wav = (0.25 * tone * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    data = np.stack([wav] * channels, axis=1) if channels > 1 else wav
    sf.write(path, data, sr, subtype=subtype)
    return path


# --------------------------------------------------------------------------------------------------
# Outputs


def test_one_off_text_to_file(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    code, stdout, stderr = synth(TWO_SENTENCES, "-o", str(out), "--seed", "1")
    assert code == 0, stderr
    assert stdout == "" and stderr == ""  # not a terminal: nothing but errors
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    assert info.frames > 0


def test_json_summary_shape(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    code, stdout, _ = synth(TWO_SENTENCES, "-o", str(out), "--seed", "5", "--json", "--subtype", "FLOAT")
    assert code == 0
    doc = json.loads(stdout)
    assert set(doc) >= {
        "files",
        "audio_seconds",
        "preset",
        "device",
        "dtype",
        "voice",
        "seed",
        "settings",
        "dropped_chars",
        "warnings",
        "notes",
        "timings",
    }
    assert set(doc["timings"]) == {
        "load_s",
        "voice_s",
        "warm_up_s",
        "first_chunk_s",
        "first_audio_s",
        "t3_s",
        "s3gen_s",
        "synthesis_s",
        "total_s",
        "rtf",
    }
    assert (doc["preset"], doc["device"], doc["dtype"], doc["voice"], doc["seed"]) == (
        "fp32",
        "cpu",
        "float32",
        "builtin",
        5,
    )
    [entry] = doc["files"]
    data, sr = sf.read(str(out), dtype="float32")
    assert entry["path"] == str(out) and entry["frames"] == data.shape[0] and sr == 24_000
    assert entry["chunks"] == entry["chunks_total"] == 2  # two long sentences: two chunks
    assert doc["audio_seconds"] == pytest.approx(data.shape[0] / 24_000, abs=1e-3)
    assert sf.info(str(out)).subtype == "FLOAT"
    assert doc["settings"]["flow_steps"] == 2 and doc["settings"]["max_tokens"] == 20


def test_same_seed_same_audio(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    for path, seed in ((a, "7"), (b, "7"), (c, "8")):
        assert synth("Repeatable words.", "-o", str(path), "--seed", seed)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_batch_size_does_not_change_the_audio(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    text = " ".join([TWO_SENTENCES] * 2)  # four chunks: the first alone, then a batch of three
    one, three = tmp_path / "one.wav", tmp_path / "three.wav"
    assert synth(text, "-o", str(one), "--seed", "4", "--batch", "1")[0] == 0
    assert synth(text, "-o", str(three), "--seed", "4", "--batch", "3")[0] == 0
    a, b = sf.read(str(one))[0], sf.read(str(three))[0]
    assert a.shape == b.shape and np.abs(a - b).max() <= 2 / 32768  # 16-bit PCM, fp32 rounding


def test_chunks_are_joined_with_the_pause(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    synth(TWO_SENTENCES, "-o", str(short), "--seed", "2", "--pause", "0")
    synth(TWO_SENTENCES, "-o", str(long), "--seed", "2", "--pause", "0.5")
    assert sf.info(str(long)).frames - sf.info(str(short)).frames == 12_000


def test_stdin_to_stdout(tiny_checkpoint: str, make_child_env: EnvFactory) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatterbox_cli",
            "synthesize",
            "-",
            "-o",
            "-",
            "--model",
            tiny_checkpoint,
            *FAST,
        ],
        input="Words from a pipe.\r\nAnd a second line.".encode("utf-8-sig"),
        capture_output=True,
        env=make_child_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"RIFF" and proc.stderr == b""
    data, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    assert sr == 24_000 and data.ndim == 1 and data.shape[0] > 0
    assert data.shape[0] * 2 + 44 == len(proc.stdout)  # nothing but the WAV on stdout


def test_stdout_that_is_a_terminal_is_refused(tiny_checkpoint: str, make_child_env: EnvFactory) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatterbox_cli",
                "synthesize",
                "Hi.",
                "-o",
                "-",
                "--model",
                tiny_checkpoint,
            ],
            stdout=follower,
            stderr=subprocess.PIPE,
            env=make_child_env(),
            timeout=120,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2
    assert b"terminal" in proc.stderr and b"| play -" in proc.stderr


def test_json_and_stdout_audio_conflict(synth: Callable[..., tuple[int, str, str]]) -> None:
    code, stdout, _ = synth("Hi.", "-o", "-", "--json")
    assert code == 2 and json.loads(stdout)["exit_code"] == 2


# --------------------------------------------------------------------------------------------------
# Voices


def test_voice_clip_and_saved_voice_round_trip(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    clip = sine_clip(tmp_path / "me.wav", 4.0)
    saved = tmp_path / "me.voice"
    first, second, third = tmp_path / "1.wav", tmp_path / "2.wav", tmp_path / "3.wav"
    code, stdout, stderr = synth(
        "A cloned voice.",
        "-o",
        str(first),
        "--voice",
        str(clip),
        "--save-voice",
        str(saved),
        "--seed",
        "4",
        "--json",
    )
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["voice"] == str(clip) and doc["saved_voice"] == str(saved) and saved.is_file()
    assert any("preparing the voice" in n for n in doc["notes"])
    # second run with the clip: served from the cache, same audio
    code, stdout, _ = synth(
        "A cloned voice.", "-o", str(second), "--voice", str(clip), "--seed", "4", "--json"
    )
    assert code == 0 and not any("preparing the voice" in n for n in json.loads(stdout)["notes"])
    # the saved voice file speaks exactly like the clip
    assert synth("A cloned voice.", "-o", str(third), "--voice", str(saved), "--seed", "4")[0] == 0
    assert first.read_bytes() == second.read_bytes() == third.read_bytes()
    builtin = tmp_path / "builtin.wav"
    assert synth("A cloned voice.", "-o", str(builtin), "--seed", "4")[0] == 0
    assert builtin.read_bytes() != first.read_bytes()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("short", "give at least 3 s of speech"),
        ("silent", "is silent"),
        ("corrupt", "cannot be read"),
        ("missing", "does not exist"),
    ],
)
def test_unusable_voice_clips(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path, kind: str, message: str
) -> None:
    clip = tmp_path / f"{kind}.wav"
    if kind == "short":
        sine_clip(clip, 1.0)
    elif kind == "silent":
        sf.write(clip, np.zeros(16_000 * 5, dtype=np.float32), 16_000)
    elif kind == "corrupt":
        clip.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(2000))
    code, stdout, stderr = synth("Hello.", "-o", str(tmp_path / "x.wav"), "--voice", str(clip))
    assert code == 2, stderr
    assert message in stderr and str(clip) in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.wav").exists()  # nothing is written when the voice is unusable


@pytest.mark.parametrize(
    ("kind", "note"),
    [("8bit", None), ("stereo44k", None), ("five_minutes", "using 20 s of it")],
)
def test_usable_voice_clips_of_any_shape(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path, kind: str, note: str | None
) -> None:
    clip = tmp_path / f"{kind}.wav"
    if kind == "8bit":
        sine_clip(clip, 4.0, sr=16_000, subtype="PCM_U8")
        assert sf.info(str(clip)).subtype == "PCM_U8"
    elif kind == "stereo44k":
        sine_clip(clip, 4.0, sr=44_100, channels=2)
    else:
        sine_clip(clip, 300.0, sr=16_000)
    code, stdout, stderr = synth("Hello.", "-o", str(tmp_path / "x.wav"), "--voice", str(clip), "--json")
    assert code == 0, stderr
    notes = json.loads(stdout)["notes"]
    if note:
        assert any(note in n for n in notes), notes
    assert sf.info(str(tmp_path / "x.wav")).frames > 0


# --------------------------------------------------------------------------------------------------
# Bad text and bad outputs


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_text_is_a_usage_error(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path, text: str
) -> None:
    code, _, stderr = synth(text, "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "no text to speak" in stderr
    assert not (tmp_path / "x.wav").exists()


def test_a_5000_character_word_is_cut_into_chunks(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    word = ("supercalifragilistic" * 250)[:5000]
    path = tmp_path / "word.txt"
    path.write_text(word)
    code, stdout, stderr = synth(
        "--input", str(path), "-o", str(tmp_path / "x.wav"), "--json", "--max-tokens", "4"
    )
    assert code == 0, stderr
    [entry] = json.loads(stdout)["files"]
    assert entry["chunks"] == entry["chunks_total"] > 10


def test_emoji_and_other_scripts_are_dropped_and_named(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    code, stdout, stderr = synth("Hello 😀 world, Привет 世界.", "-o", str(tmp_path / "x.wav"), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert {"😀", "П", "世"} <= set(doc["dropped_chars"])
    assert "warning: dropped" in stderr and "😀 (U+1F600)" in stderr
    code, _, stderr = synth("😀 Привет 世界", "-o", str(tmp_path / "y.wav"))
    assert code == 2 and "no tokens for any of its letters" in stderr and "U+1F600" in stderr
    code, _, stderr = synth("😀 Привет", "-o", str(tmp_path / "y.wav"), "--quiet", "--seed", "1")
    assert code == 2  # --quiet silences warnings, never errors


def test_binary_input_file(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    blob = tmp_path / "data.bin"
    blob.write_bytes(bytes(range(256)) * 10)
    code, _, stderr = synth("--input", str(blob), "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "not a text file" in stderr
    code, _, stderr = synth("--input", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "does not exist" in stderr


def test_a_plan_on_the_cpu_needs_a_preset(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    """The CPU runs the checkpoint's fp32 unless a preset is named: a --plan alone would change nothing, so
    it is refused (it was once dropped without a word); with the preset it runs that preset's plan."""
    code, _, stderr = synth("Hello.", "--plan", "t3=nf4", "-o", str(tmp_path / "x.wav"))
    assert code == 2 and "Name the preset to change: --preset bnb-4bit --plan t3=nf4" in stderr
    for plan, flow_quantized in ((), True), (("--plan", "flow=16bit"), False):  # bnb-4bit's flow is int8
        code, out, _ = synth("Hello.", "--preset", "bnb-4bit", *plan, "-o", str(tmp_path / "y.wav"), "--json")
        assert code == 0 and ("flow" in json.loads(out)["quant_cache"]) is flow_quantized


def test_a_folder_or_a_device_given_as_the_voice(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    code, _, stderr = synth("Hello.", "--voice", str(tmp_path), "-o", str(tmp_path / "x.wav"))
    assert code == 2 and f"{tmp_path} is a folder; give an audio clip or a .voice file to --voice" in stderr
    code, _, stderr = synth("Hello.", "--voice", os.devnull, "-o", str(tmp_path / "x.wav"))
    assert code == 2 and f"{os.devnull} is not a regular file (a device or a pipe)" in stderr


def test_output_folder_that_cannot_exist(synth: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    # A path below a regular file can never be created, even by root (CI runs as root: chmod won't block).
    blocker = tmp_path / "out.txt"
    blocker.write_text("a file")
    code, _, stderr = synth("Hello.", "-o", str(blocker / "sub" / "x.wav"))
    assert code == 2 and "create the folder or choose another path" in stderr
    code, _, stderr = synth("Hello.", "--output-dir", str(blocker / "sub"))
    assert code == 2 and "cannot create the folder" in stderr
    code, _, stderr = synth("Hello.", "-o", str(tmp_path))
    assert code == 2 and "is a folder" in stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full(synth: Callable[..., tuple[int, str, str]]) -> None:
    code, _, stderr = synth("Hello there.", "-o", "/dev/full")
    assert code == 1 and "the disk is full" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Hi.",), "say where the audio goes"),
        (("-o", "x.wav"), "give the text to speak"),
        (("Hi.", "--input", "f.txt", "-o", "x.wav"), "not both"),
        (("Hi.", "-o", "x.wav", "--output-dir", "d"), "give one of them"),
        (("Hi.", "-o", "x.wav", "--split", "lines"), "--split needs --output-dir"),
        (("Hi.", "-o", "x.wav", "--save-voice", "v.wav"), "ending in .voice"),
        (("Hi.", "-o", "x.wav", "--temperature", "-1"), "temperature"),
        (("Hi.", "-o", "x.wav", "--temperature", "inf"), "temperature must be a finite number"),
        (("Hi.", "-o", "x.wav", "--cfg-weight", "inf"), "cfg_weight must be a finite number"),
        (("Hi.", "-o", "x.wav", "--split", "words"), "Invalid value"),
        (("Hi.", "-o", "x.wav", "--batch", "0"), "--batch must be auto or a whole number >= 1"),
        (("Hi.", "-o", "x.wav", "--batch", "many"), "--batch must be auto or a whole number >= 1"),
    ],
)
def test_usage_errors(
    synth: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = synth(*args)
    assert code == 2 and message in stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run(
        ["synthesize", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "nothing-here")]
    )
    assert code == 3 and "does not exist" in capsys.readouterr().err
    code = run(
        ["synthesize", "Hi.", "-o", str(tmp_path / "x.wav"), "--json", "--model", str(tmp_path / "nope")]
    )
    assert code == 3 and json.loads(capsys.readouterr().out)["exit_code"] == 3


def test_readme_first_command_offline_exits_3(tmp_path: Path, make_child_env: EnvFactory) -> None:
    """The README's first command on a machine without the checkpoint and without network."""
    proc = subprocess.run(
        [sys.executable, "-m", "chatterbox_cli", "synthesize", "Hello from Chatterbox.", "-o", "hello.wav"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=make_child_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=""),
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "hf download ResembleAI/chatterbox" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "hello.wav").exists()


# --------------------------------------------------------------------------------------------------
# Progress


def test_progress_draws_on_a_terminal_only() -> None:
    screen = io.StringIO()
    with Progress(enabled=True, console=Console(file=screen, force_terminal=True, width=120)) as bar:
        bar.start(items=1, chunks=2, characters=100)
        bar.message("a note")
        bar.audio_done(2.0, 50)
        bar.audio_done(2.0, 50)
        bar.item_done()
    drawn = screen.getvalue()
    assert "a note" in drawn and "chunk 2/2" in drawn and "4.0 s audio" in drawn and "RTF" in drawn
    silent = io.StringIO()
    with Progress(enabled=False, console=Console(file=silent, force_terminal=True)) as bar:
        bar.start(items=1, chunks=1, characters=10)
        bar.message("a note")
        bar.audio_done(1.0, 10)
    assert silent.getvalue() == ""
