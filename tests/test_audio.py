from __future__ import annotations

import errno
import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_cli.audio import (
    StreamingWavWriter,
    fade_edges,
    join_pause,
    read_voice_clip,
    resample,
    resample_tensor,
)
from chatterbox_cli.errors import ChatterboxError, UsageError

ROOT = Path(__file__).resolve().parents[1]
SR = 24000


def _sine(seconds: float, freq: float = 220.0, sr: int = SR, amp: float = 0.5, phase: float = 0.0):
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def _chunks(n: int = 5, length: int = 2400) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.9, 0.9, length).astype(np.float32) for _ in range(n)]


# ---- streaming writer: valid after every chunk


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_file_is_valid_after_every_chunk_without_closing(tmp_path, subtype):
    path = tmp_path / "out.wav"
    chunks = _chunks()
    writer = StreamingWavWriter(path, SR, subtype)
    assert sf.info(path).frames == 0
    for i, chunk in enumerate(chunks, start=1):
        writer.write(chunk)
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, subtype, 2400 * i)
        data, _ = sf.read(path, dtype="float32")
        expected = np.concatenate(chunks[:i])
        tolerance = 1.5 / 32767 if subtype == "PCM_16" else 0.0  # written x32767, read /32768
        assert np.abs(data - expected).max() <= tolerance
        raw = path.read_bytes()
        assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8
    writer.close()
    writer.close()
    assert writer.seconds_written == pytest.approx(0.5)


def test_float_file_has_a_fact_chunk_with_the_frame_count(tmp_path):
    path = tmp_path / "f.wav"
    with StreamingWavWriter(path, SR, "FLOAT") as writer:
        writer.write(np.zeros(123, np.float32))
        writer.write(np.zeros(77, np.float32))
    raw = path.read_bytes()
    at = raw.index(b"fact")
    assert struct.unpack("<II", raw[at + 4 : at + 12]) == (4, 200)
    assert struct.unpack("<HH", raw[20:24]) == (3, 1)  # IEEE float, mono


def test_pcm16_clips_rounds_and_silences_nan(tmp_path):
    path = tmp_path / "clip.wav"
    samples = np.array([1.5, -1.5, 0.5, -0.25, 1e-5, np.nan, np.inf, -np.inf], np.float32)
    with StreamingWavWriter(path, SR) as writer:
        writer.write(samples)
    data, _ = sf.read(path, dtype="int16")
    assert data.tolist() == [32767, -32767, 16384, -8192, 0, 0, 32767, -32767]


def test_stereo_and_bad_shapes(tmp_path):
    path = tmp_path / "st.wav"
    stereo = np.stack([_sine(0.1), -_sine(0.1)], axis=1)
    with StreamingWavWriter(path, SR, "FLOAT", channels=2) as writer:
        writer.write(stereo)
        with pytest.raises(ValueError, match="2-channel"):
            writer.write(_sine(0.1))
    data, _ = sf.read(path, dtype="float32")
    assert np.array_equal(data, stereo)


def test_writing_into_an_existing_stream_position(tmp_path):
    # A seekable sink that already holds bytes (e.g. stdout redirected with >>) gets its header patched
    # at the right offset.
    buffer = io.BytesIO(b"xxxx")
    buffer.seek(4)
    writer = StreamingWavWriter(buffer, SR)
    writer.write(_sine(0.05))
    data, sr = sf.read(io.BytesIO(buffer.getvalue()[4:]), dtype="float32")
    assert sr == SR and data.shape == (1200,)


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from chatterbox_cli.audio import StreamingWavWriter
    writer = StreamingWavWriter(sys.argv[1], 24000)
    rng = np.random.default_rng(0)
    for i in range(1000):
        writer.write(rng.uniform(-0.9, 0.9, 2400).astype(np.float32))
        print(i + 1, flush=True, file=sys.stderr)
        sys.stdin.readline()  # wait for the parent before the next chunk
    """
)


def test_sigkill_mid_stream_keeps_every_flushed_chunk(tmp_path):
    path = tmp_path / "killed.wav"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(root=str(ROOT)), str(path)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for expected in range(1, 4):
            assert child.stderr.readline().strip() == str(expected)
            if expected < 3:
                child.stdin.write("\n")
                child.stdin.flush()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdin.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    data, sr = sf.read(path, dtype="float32")
    rng = np.random.default_rng(0)
    expected = np.concatenate([rng.uniform(-0.9, 0.9, 2400).astype(np.float32) for _ in range(3)])
    assert sr == SR and data.shape == (7200,)
    assert np.abs(data - expected).max() <= 1.5 / 32767


_KILLED_IN_A_WRITE_CHILD = textwrap.dedent(
    """
    import io
    import os
    import signal
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from chatterbox_cli.audio import StreamingWavWriter

    class DiesMidWrite(io.FileIO):
        # Once armed, the process is killed halfway through the first write of more than a size field.
        armed = False

        def write(self, data):
            if self.armed and len(data) > 4:
                super().write(bytes(data)[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return super().write(data)

    sink = DiesMidWrite(sys.argv[1], "w")
    writer = StreamingWavWriter(sink, 24000, sys.argv[2])
    rng = np.random.default_rng(0)
    for _ in range(3):
        writer.write(rng.uniform(-0.9, 0.9, 2400).astype(np.float32))
    sink.armed = True
    writer.write(rng.uniform(-0.9, 0.9, 2400).astype(np.float32))
    """
)


@pytest.mark.parametrize(("subtype", "header", "sample_bytes"), [("PCM_16", 44, 2), ("FLOAT", 58, 4)])
def test_sigkill_inside_a_payload_write_leaves_the_header_at_the_finished_chunks(
    tmp_path: Path, subtype: str, header: int, sample_bytes: int
) -> None:
    path = tmp_path / "killed.wav"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_A_WRITE_CHILD.format(root=str(ROOT)), str(path), subtype],
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    raw = path.read_bytes()
    chunk_bytes = 2400 * sample_bytes
    assert len(raw) == header + 3 * chunk_bytes + chunk_bytes // 2  # killed inside the 4th payload
    riff_size = struct.unpack("<I", raw[4:8])[0]
    assert raw[header - 8 : header - 4] == b"data"
    data_size = struct.unpack("<I", raw[header - 4 : header])[0]
    # the header counts exactly the three finished chunks, never the half-written one
    assert data_size == 3 * chunk_bytes and riff_size == header - 8 + data_size
    if subtype == "FLOAT":
        at = raw.index(b"fact")
        assert struct.unpack("<II", raw[at + 4 : at + 12]) == (4, 7200)
    data, sr = sf.read(path, dtype="float32")
    rng = np.random.default_rng(0)
    expected = np.concatenate([rng.uniform(-0.9, 0.9, 2400).astype(np.float32) for _ in range(3)])
    tolerance = 1.5 / 32767 if subtype == "PCM_16" else 0.0
    assert sr == SR and data.shape == (7200,) and np.abs(data - expected).max() <= tolerance


_STDOUT_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from chatterbox_cli.audio import StreamingWavWriter
    with StreamingWavWriter("-", 24000, sys.argv[1]) as writer:
        for i in range(4):
            writer.write(np.full(1000, 0.25 * (i - 1), np.float32))
    """
)


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_stdout_pipe_gets_a_streaming_header_and_is_never_seeked(subtype):
    result = subprocess.run(
        [sys.executable, "-c", _STDOUT_CHILD.format(root=str(ROOT)), subtype],
        capture_output=True,
        check=True,
    )
    raw = result.stdout
    assert result.stderr == b""
    assert struct.unpack("<I", raw[4:8])[0] == 0xFFFFFFFF
    data_at = raw.index(b"data")
    assert struct.unpack("<I", raw[data_at + 4 : data_at + 8])[0] == 0xFFFFFFFF
    data, sr = sf.read(io.BytesIO(raw), dtype="float32")
    assert sr == SR
    assert np.allclose(data, np.repeat([-0.25, 0.0, 0.25, 0.5], 1000), atol=1.5 / 32767)


def test_stdout_redirected_to_a_file_gets_exact_sizes(tmp_path):
    path = tmp_path / "redirected.wav"
    with open(path, "wb") as handle:
        subprocess.run(
            [sys.executable, "-c", _STDOUT_CHILD.format(root=str(ROOT)), "PCM_16"], stdout=handle, check=True
        )
    raw = path.read_bytes()
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8
    assert sf.info(path).frames == 4000


# ---- write failures


def test_real_enospc_from_dev_full():
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    with pytest.raises(ChatterboxError, match=r"cannot write /dev/full: the disk is full"):
        StreamingWavWriter("/dev/full", SR)


class _FillsUp(io.FileIO):
    """A real file whose device runs out of space after `room` bytes (the world's edge, simulated)."""

    def __init__(self, path: Path, room: int) -> None:
        super().__init__(path, "w+")
        self.room = room

    def write(self, data) -> int:
        data = bytes(data)
        if self.tell() + len(data) > self.room:
            fits = max(0, self.room - self.tell())
            if fits:
                return super().write(data[:fits])  # a partial write, as the OS does at the boundary
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_disk_full_mid_stream_names_the_path_and_keeps_earlier_chunks(tmp_path):
    path = tmp_path / "full.wav"
    chunks = _chunks(n=4, length=1000)
    sink = _FillsUp(path, room=44 + 2 * 2000 + 500)
    writer = StreamingWavWriter(sink, SR)
    writer.write(chunks[0])
    writer.write(chunks[1])
    with pytest.raises(ChatterboxError, match=r"cannot write .*full\.wav: the disk is full \(0\.1 s"):
        writer.write(chunks[2])
    with pytest.raises(ChatterboxError, match="closed"):
        writer.write(chunks[3])
    writer.close()
    sink.close()
    data, _ = sf.read(path, dtype="float32")
    assert data.shape == (2000,)
    assert np.abs(data - np.concatenate(chunks[:2])).max() <= 1.5 / 32767
    assert path.stat().st_size == 44 + 4000  # the half-written chunk was cut off again
    raw = path.read_bytes()
    assert raw[36:40] == b"data" and struct.unpack("<I", raw[40:44])[0] == 4000  # the two chunks kept
    assert struct.unpack("<I", raw[4:8])[0] == len(raw) - 8


def test_other_write_errors_name_the_sink(tmp_path):
    class Broken(io.BytesIO):
        name = "broken-sink"

        def write(self, data):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(ChatterboxError, match="cannot write broken-sink: Input/output error"):
        StreamingWavWriter(Broken(), SR)


def test_output_folder_that_does_not_exist_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"cannot create .*missing/out\.wav.*writable folder"):
        StreamingWavWriter(tmp_path / "missing" / "out.wav", SR)


# ---- joining


def test_fade_and_pause_make_click_free_joins():
    a = _sine(0.1037, freq=220, amp=0.8)  # ends mid-cycle, far from zero
    b = _sine(0.1, freq=220, amp=0.8, phase=1.3)  # starts far from zero
    assert abs(a[-1]) > 0.3 and abs(b[0]) > 0.3
    natural_step = 2 * np.pi * 220 / SR * 0.8
    threshold = 2 * natural_step

    raw_join = np.concatenate([a, join_pause(SR, 0.2), b])
    assert np.abs(np.diff(raw_join)).max() > threshold  # the test can see a click

    joined = np.concatenate([fade_edges(a, SR), join_pause(SR, 0.2), fade_edges(b, SR)])
    assert np.abs(np.diff(joined)).max() <= threshold
    assert len(joined) == len(a) + round(0.2 * SR) + len(b)
    assert fade_edges(a, SR)[0] == 0.0 and fade_edges(a, SR)[-1] == 0.0
    assert np.array_equal(fade_edges(a, SR)[500:-500], a[500:-500])  # only the edges change
    assert join_pause(SR, 0.0).shape == (0,)
    with pytest.raises(ValueError):
        join_pause(SR, -1)
    assert fade_edges(np.ones(3, np.float32), SR).shape == (3,)


# ---- voice clips


def test_good_clip_reads_as_mono_float(tmp_path):
    path = tmp_path / "voice.wav"
    sf.write(path, _sine(4.0, sr=16000), 16000)
    clip = read_voice_clip(path)
    assert clip.sample_rate == 16000 and clip.audio.dtype == np.float32 and clip.audio.shape == (64000,)
    assert clip.notes == []


def test_stereo_44k_is_averaged_to_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    left = _sine(4.0, sr=44100, amp=0.6)
    sf.write(path, np.stack([left, 0.2 * left], axis=1), 44100)
    clip = read_voice_clip(path)
    assert clip.sample_rate == 44100 and clip.audio.ndim == 1
    assert np.allclose(clip.audio, 0.6 * left, atol=2 / 32767)


def test_eight_bit_and_flac_and_ogg_clips_read(tmp_path):
    for name, subtype in [("u8.wav", "PCM_U8"), ("c.flac", "PCM_16"), ("c.ogg", "VORBIS")]:
        path = tmp_path / name
        sf.write(path, _sine(4.0, sr=22050), 22050, subtype=subtype)
        clip = read_voice_clip(path)
        assert clip.sample_rate == 22050
        assert abs(len(clip.audio) - 4 * 22050) < 2048
        assert 0.3 < np.abs(clip.audio).max() < 0.7


def test_short_clip_is_rejected_with_its_length(tmp_path):
    path = tmp_path / "voice.wav"
    sf.write(path, _sine(0.4), SR)
    with pytest.raises(UsageError, match=r"voice\.wav is 0\.4 s long; give at least 3 s of speech"):
        read_voice_clip(path)


def test_short_speech_padded_with_silence_is_rejected(tmp_path):
    path = tmp_path / "voice.wav"
    silence = np.zeros(2 * SR, np.float32)
    sf.write(path, np.concatenate([silence, _sine(0.4), silence]), SR)
    with pytest.raises(UsageError, match=r"is 0\.4 s of sound \(of 4\.4 s\); give at least 3 s"):
        read_voice_clip(path)


def test_silent_clip_is_rejected(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, np.zeros(5 * SR, np.float32), SR)
    with pytest.raises(UsageError, match=r"quiet\.wav is silent \(peak -inf dBFS\)"):
        read_voice_clip(path)
    sf.write(path, _sine(5.0, amp=1e-4), SR, subtype="FLOAT")
    with pytest.raises(UsageError, match=r"is silent \(peak -80 dBFS\)"):
        read_voice_clip(path)


def test_corrupt_and_missing_clips(tmp_path):
    path = tmp_path / "voice.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + os.urandom(200))
    with pytest.raises(UsageError, match=r"voice\.wav cannot be read: .*; give a WAV/FLAC/OGG file"):
        read_voice_clip(path)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all\n" * 20)
    with pytest.raises(UsageError, match=r"notes\.wav cannot be read"):
        read_voice_clip(text)
    with pytest.raises(UsageError, match="does not exist"):
        read_voice_clip(tmp_path / "absent.wav")
    with pytest.raises(UsageError, match="is a folder"):
        read_voice_clip(tmp_path)


def test_five_minute_clip_is_cut_and_says_so(tmp_path):
    path = tmp_path / "long.wav"
    sr = 16000
    sf.write(path, np.concatenate([np.zeros(sr, np.float32), _sine(300.0, sr=sr)]), sr)
    clip = read_voice_clip(path, max_seconds=20.0)
    assert clip.audio.shape == (20 * sr,)
    assert np.abs(clip.audio[:160]).max() > 0.01  # the leading silence was skipped
    assert len(clip.notes) == 1 and "301.0 s long; using 20 s" in clip.notes[0]
    assert read_voice_clip(path, max_seconds=None).audio.shape == (301 * sr,)


# ---- resampling


# soxr's HQ recipe is built for 20-bit precision: ripple, leakage and its float32 arithmetic stay within
# 2^-20 of full scale (measured at most 0.75 of that); twice that leaves room for other SIMD paths.
SOXR_HQ_ERROR = 2.0**-19


def test_resample_keeps_frequency_and_length():
    x = _sine(1.0, freq=1000, sr=44100, amp=0.5)
    y = resample(x, 44100, 24000)
    assert y.dtype == np.float32 and y.shape == (24000,)
    ideal = _sine(1.0, freq=1000, sr=24000, amp=0.5)
    assert np.abs(y[500:-500] - ideal[500:-500]).max() <= SOXR_HQ_ERROR * 0.5
    assert resample(x, 44100, 44100) is not None and np.array_equal(resample(x, 44100, 44100), x)


def test_resample_is_band_limited():
    tone = _sine(1.0, freq=15000, sr=48000, amp=0.5)  # above the 12 kHz Nyquist of 24 kHz
    out = resample(tone, 48000, 24000)
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) <= SOXR_HQ_ERROR * 0.5  # removed, not aliased to 9 kHz


def test_resample_tensor_matches_numpy():
    torch = pytest.importorskip("torch")
    x = np.stack([_sine(0.5, sr=24000), _sine(0.5, freq=330, sr=24000)])
    out = resample_tensor(torch.from_numpy(x).to(torch.float64), 24000, 16000)
    assert out.dtype == torch.float64 and out.shape == (2, 8000)
    expected = np.stack([resample(row, 24000, 16000) for row in x])
    # two channels in one call or one at a time: the same filter, at most rounding apart
    assert np.abs(out.numpy() - expected).max() <= SOXR_HQ_ERROR * np.abs(x).max()


def test_closed_pipe_says_the_reader_went_away():
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb", buffering=0) as sink, pytest.raises(ChatterboxError, match="closed the pipe"):
        StreamingWavWriter(sink, SR).write(_sine(0.1))


_ENDLESS_STDOUT_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from chatterbox_cli.audio import StreamingWavWriter
    from chatterbox_cli.errors import ChatterboxError
    try:
        with StreamingWavWriter("-", 24000) as writer:
            while True:
                writer.write(np.zeros(2400, np.float32))
    except ChatterboxError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    """
)


def test_stdout_reader_that_stops_early_gives_one_clean_error():
    child = subprocess.Popen(
        [sys.executable, "-c", _ENDLESS_STDOUT_CHILD.format(root=str(ROOT))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout.read(1000)[:4] == b"RIFF"
    child.stdout.close()
    stderr = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait(timeout=30) == 1
    assert stderr.strip() == "cannot write audio to <stdout>: the reading program closed the pipe"
