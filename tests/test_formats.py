"""Output formats: each encoder's bytes decode to the audio given (exactly for the lossless ones, within
stated bounds for MP3 and Opus), streaming in parts makes the same file, and `synthesize --format`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import FAST

from chatterbox_cli import cli, formats
from chatterbox_cli.audio import to_pcm16
from chatterbox_cli.errors import UsageError
from chatterbox_cli.formats import FORMATS, ChunkEncoder, encode, format_for_path, get_format, open_writer

SR = 24_000
N = round(1.5 * SR)
EnvFactory = Callable[..., dict[str, str]]

# How many samples a decoder may give beyond the N written, by where they come from:
# - MP3 (MPEG-2 Layer III at 24 kHz: 576-sample frames): LAME codes ENCDELAY = 576 samples of delay before
#   the audio, and its flush adds POSTDELAY = 1152 so the last granule's 50 % MDCT overlap decodes, then
#   rounds up to a whole frame (< 576). Without the LAME header (a stream) a decoder plays all of it; with
#   it (a file) the decoder trims it away. 576 + 1152 + 575 = 2303.
# - Opus (Ogg): libsndfile codes 20 ms packets (480 samples at 24 kHz). A decoder honouring the end
#   granule position and the pre-skip gives N exactly; one ignoring both gets at most a packet of end
#   padding plus the pre-skip (libopus's 6.5 ms look-ahead, under a packet): 2 * 480.
EXTRA = {"mp3": 576 + 1152 + 575, "opus": 2 * 480}
LOSSLESS = ("wav", "flac", "pcm")
LOSSY = ("mp3", "opus")
# A lossy codec at 42-64 kbit/s spends nearly all its bits on a lone 440 Hz tone (measured: MP3 26 dB, Opus
# 21 dB). 10 dB (an error a third of the signal's amplitude) still fails a wrong rate, a lost or
# misplaced stretch, or garbage, which all give 0 dB or less (a 24 kHz MP3 resampled by LAME gave -3 dB).
MIN_SNR_DB = 10.0


def tone(n: int = N) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)).astype(np.float32)


def decode(data: bytes, name: str, dtype: str = "float32") -> tuple[np.ndarray, int]:
    if name == "pcm":
        pcm = np.frombuffer(data, "<i2")
        return (pcm if dtype == "int16" else pcm.astype(np.float32) / 32767.0), SR
    audio, rate = sf.read(io.BytesIO(data), dtype=dtype)
    return audio, rate


def snr_db(reference: np.ndarray, decoded: np.ndarray, max_lag: int) -> float:
    """SNR of `decoded` against `reference` at the delay (0..max_lag) that fits best, judged away from the
    first and last 0.1 s, where codecs ramp in and out."""
    edge = SR // 10
    ref = reference[edge:-edge]
    window = decoded[edge : edge + ref.shape[0] + max_lag]
    lag = int(np.argmax(np.correlate(window, ref, mode="valid")))
    error = window[lag : lag + ref.shape[0]] - ref
    return float(10 * np.log10(np.sum(ref**2) / np.sum(error**2)))


def check_decodes_to(data: bytes, name: str, samples: np.ndarray) -> None:
    if name in LOSSLESS:
        decoded, rate = decode(data, name, "int16")
        assert rate == SR
        np.testing.assert_array_equal(decoded, to_pcm16(samples))  # what the WAV writer stores
        return
    decoded, rate = decode(data, name)
    assert rate == SR
    assert samples.shape[0] <= decoded.shape[0] <= samples.shape[0] + EXTRA[name]
    assert snr_db(samples, decoded, EXTRA[name]) > MIN_SNR_DB


def stream(name: str, samples: np.ndarray, parts: int) -> list[bytes]:
    encoder = ChunkEncoder(FORMATS[name], SR)
    return [encoder.write(part) for part in np.array_split(samples, parts)] + [encoder.close()]


# --------------------------------------------------------------------------------------------------
# The table


def test_the_formats() -> None:
    assert {n: (f.extension, f.media_type, f.streamable) for n, f in FORMATS.items()} == {
        "wav": (".wav", "audio/wav", True),
        "mp3": (".mp3", "audio/mpeg", True),
        "flac": (".flac", "audio/flac", False),
        "opus": (".opus", "audio/ogg", True),
        "pcm": (".pcm", "audio/pcm", True),
    }
    assert get_format("MP3") is FORMATS["mp3"]
    with pytest.raises(UsageError, match="choose one of wav, mp3, flac, opus, pcm"):
        get_format("ogg")
    assert format_for_path("out/Speech.MP3") is FORMATS["mp3"]
    assert format_for_path("a.opus") is FORMATS["opus"] and format_for_path("a.txt") is None


def test_the_cli_offers_every_format() -> None:
    # cli.py spells the choices out (importing this module there would slow `chatterbox --help`).
    hint = typing.get_type_hints(cli.synthesize, include_extras=True)["audio_format"]
    choice, _none = typing.get_args(typing.get_args(hint)[0])
    assert list(typing.get_args(choice)) == list(FORMATS)


def test_a_missing_encoder_says_which_and_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    old = {k: v for k, v in sf.available_formats().items() if k != "MP3"}  # as libsndfile 1.0.31
    monkeypatch.setattr(sf, "available_formats", lambda: old)
    monkeypatch.setattr(sf, "__libsndfile_version__", "1.0.31")
    for make in (lambda: ChunkEncoder(FORMATS["mp3"], SR), lambda: encode(tone(10), SR, FORMATS["mp3"])):
        with pytest.raises(UsageError) as error:
            make()
        message = str(error.value)
        assert "libsndfile (1.0.31) has no MP3 encoder" in message
        assert "soundfile>=0.13" in message and "--format wav/flac/opus/pcm" in message
    ChunkEncoder(FORMATS["flac"], SR).close()  # the others still work


def test_opus_refuses_a_rate_it_cannot_code() -> None:
    with pytest.raises(UsageError, match="Opus codes 8000, 12000, 16000, 24000, 48000 Hz only"):
        ChunkEncoder(FORMATS["opus"], 22_050)


# --------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_whole_clip_decodes_to_its_samples(name: str) -> None:
    samples = tone()
    check_decodes_to(encode(samples, SR, FORMATS[name]), name, samples)


@pytest.mark.parametrize("name", ["mp3", "opus"])
def test_a_lossy_file_decodes_to_exactly_its_length(name: str) -> None:
    # Written seekably: the MP3 has its LAME header, the Ogg its end granule position.
    for n in (1, 575, 577, N):
        decoded, _ = decode(encode(tone(n), SR, FORMATS[name]), name)
        assert decoded.shape[0] == n


@pytest.mark.parametrize("name", list(FORMATS))
def test_five_writes_make_one_valid_file(name: str) -> None:
    samples = tone()
    parts = stream(name, samples, 5)
    data = b"".join(parts)
    check_decodes_to(data, name, samples)
    whole = encode(samples, SR, FORMATS[name])
    if name in ("flac", "pcm"):
        assert data == whole
    elif name == "wav":  # the stream's header says "size unknown"; the samples are the same bytes
        assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff" and data[44:] == whole[44:]
    elif name == "mp3":  # the stream has no LAME header, so it differs from the file; parts change nothing
        assert data == b"".join(stream(name, samples, 1))
    else:  # Ogg streams get a random serial number; the packets are the same
        np.testing.assert_array_equal(decode(data, name)[0], decode(whole, name)[0])


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.streamable])
def test_streamable_formats_hand_out_valid_bytes_before_the_end(name: str) -> None:
    samples = tone(3 * SR)
    parts = stream(name, samples, 6)
    sent = b"".join(parts[:-1])
    if name == "opus":  # Ogg pages hold about a second: the first parts may give only the headers
        assert len(sent) > len(parts[0])
    else:
        assert all(parts[:-1])
    # What was sent before the end is itself a file of a prefix of the audio.
    decoded, rate = decode(sent, name, "int16")
    assert rate == SR and decoded.shape[0] >= SR
    if name in LOSSLESS:
        np.testing.assert_array_equal(decoded, to_pcm16(samples)[: decoded.shape[0]])


def test_flac_comes_whole_at_close() -> None:
    parts = stream("flac", tone(), 5)
    assert parts[:-1] == [b""] * 5 and parts[-1][:4] == b"fLaC"


def test_samples_are_cleaned_as_the_wav_writer_does() -> None:
    samples = np.array([np.nan, 2.0, -2.0, np.inf, 0.5], dtype=np.float32)
    for name in ("pcm", "flac"):
        decoded, _ = decode(encode(samples, SR, FORMATS[name]), name, "int16")
        np.testing.assert_array_equal(decoded, [0, 32767, -32767, 32767, 16384])


def test_a_file_path_gets_a_finished_file(tmp_path: Path) -> None:
    for name in ("mp3", "opus", "flac", "pcm"):
        path = tmp_path / f"out{FORMATS[name].extension}"
        writer = open_writer(path, FORMATS[name], SR)
        for part in np.array_split(tone(), 3):
            writer.write(part)
        writer.close()
        assert writer.frames_written == N and formats.frame_count(path) == N
        check_decodes_to(path.read_bytes(), name, tone())
    with pytest.raises(UsageError, match="applies to WAV only"):
        open_writer(tmp_path / "x.mp3", FORMATS["mp3"], SR, "FLOAT")


# --------------------------------------------------------------------------------------------------
# `chatterbox synthesize --format`


def test_the_extension_of_o_picks_the_format(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    out = tmp_path / "hello.mp3"
    code, stdout, stderr = synth("Hello there.", "-o", str(out), "--seed", "1", "--json")
    assert code == 0, stderr
    info = sf.info(str(out))
    assert (info.format, info.samplerate, info.channels) == ("MP3", SR, 1)
    [entry] = json.loads(stdout)["files"]
    assert entry["frames"] == info.frames > 0  # the LAME header makes the length exact


def test_flac_to_stdout(tiny_checkpoint: str, make_child_env: EnvFactory) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chatterbox_cli", "synthesize", "Words for a pipe.", "-o", "-", "--format"]
        + ["flac", "--model", tiny_checkpoint, *FAST],
        capture_output=True,
        env=make_child_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:4] == b"fLaC" and proc.stderr == b""
    data, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    assert rate == SR and data.ndim == 1 and data.shape[0] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-o", "a.wav", "--format", "mp3"), "-o a.wav names a wav file but --format is mp3; use -o a.mp3"),
        (("-o", "a.mp3", "--subtype", "FLOAT"), "--subtype FLOAT applies to WAV only"),
        (("-o", "a.ogg", "--format", "vorbis"), "Invalid value"),
        (("-o", "a.m4a"), "-o a.m4a: .m4a is not a format written here; end the name in one of .wav, .mp3"),
    ],
)
def test_format_mistakes_are_usage_errors(
    synth: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = synth("Hi.", *args)
    assert code == 2 and message in " ".join(stderr.split())
    assert list(tmp_path.iterdir()) == []


def test_a_batch_folder_of_opus_files_and_its_rerun(
    synth: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ("One line.\nAnother line.", "--output-dir", str(out), "--format", "opus", "--seed", "4", "--json")
    code, stdout, stderr = synth(*args)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["0001.opus", "0002.opus", "manifest.jsonl"]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in lines] == ["0001.opus", "0002.opus"]
    for m in lines:
        info = sf.info(str(out / m["file"]))
        assert (info.format, info.subtype, info.samplerate) == ("OGG", "OPUS", SR)
        assert info.frames == m["frames"] > 0
    assert json.loads(stdout)["items"]["made"] == 2

    code, stdout, _ = synth(*args)  # a rerun finds both done
    assert code == 0 and json.loads(stdout)["items"] == {"total": 2, "made": 0, "skipped": 2}
    code, stdout, _ = synth(*args[:3], "--seed", "4", "--json")  # WAV is another file: made anew
    assert code == 0 and json.loads(stdout)["items"]["made"] == 2
    assert {"0001.wav", "0002.wav"} <= {p.name for p in out.iterdir()}
