"""Audio in and out: a WAV writer that keeps the file valid after every chunk, chunk joining without
clicks, reading voice clips, and resampling."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import struct
import sys
from collections.abc import Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import soundfile as sf
import soxr

from chatterbox_cli.errors import ChatterboxError, UsageError

if TYPE_CHECKING:
    import torch

Subtype = Literal["PCM_16", "FLOAT"]

_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_IEEE_FLOAT = 3
# The streaming convention for "size unknown": readers (libsndfile, ffmpeg) then read to end of stream.
_UNKNOWN_SIZE = 0xFFFFFFFF
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class _Layout(NamedTuple):
    header: bytes
    data_size_at: int  # byte offset of the data chunk's size field, from the start of the header
    fact_at: int | None  # byte offset of the fact chunk's frame count (float files only)


def _wav_layout(sample_rate: int, channels: int, subtype: Subtype, data_bytes: int, frames: int) -> _Layout:
    """The bytes of a canonical WAV header; sizes are filled from `data_bytes`/`frames`."""
    if subtype == "PCM_16":
        tag, bits = _WAVE_FORMAT_PCM, 16
    else:
        tag, bits = _WAVE_FORMAT_IEEE_FLOAT, 32
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, sample_rate, sample_rate * block_align, block_align, bits)
    chunks = b"WAVE"
    fact_at = None
    if subtype == "FLOAT":
        # Non-PCM formats carry cbSize in fmt and a fact chunk with the frame count (RIFF spec).
        fmt += struct.pack("<H", 0)
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
        fact_at = 8 + len(chunks) + 8
        chunks += b"fact" + struct.pack("<II", 4, frames)
    else:
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    data_size_at = 8 + len(chunks) + 4
    chunks += b"data" + struct.pack("<I", data_bytes)
    riff_size = _UNKNOWN_SIZE if data_bytes == _UNKNOWN_SIZE else len(chunks) + data_bytes
    return _Layout(b"RIFF" + struct.pack("<I", riff_size) + chunks, data_size_at, fact_at)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as little-endian int16: clipped, scaled by 32767, rounded half to even."""
    scaled = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0)
    return scaled.astype("<i2")


class StreamingWavWriter:
    """Append audio chunks to a WAV file that is a complete, valid WAV after every `write`.

    After each chunk the samples are written, then the RIFF and data sizes in the header are patched,
    then the file is flushed (and fsync'ed with `fsync=True`), so a reader, or a run killed at any
    moment, sees every chunk that was finished. Sink: a path, "-" for stdout, or a binary file object.
    A non-seekable sink (a pipe) gets a header with sizes 0xFFFFFFFF ("read to the end") and is never
    seeked. Samples are float32 in [-1, 1]; PCM_16 output clips and rounds, NaN becomes silence.
    Write failures raise ChatterboxError naming the sink (disk full says so); the file then still
    holds every chunk written before the failure.
    """

    def __init__(
        self,
        sink: str | os.PathLike[str] | IO[bytes],
        sample_rate: int = 24000,
        subtype: Subtype = "PCM_16",
        channels: int = 1,
        *,
        fsync: bool = False,
    ) -> None:
        if subtype not in ("PCM_16", "FLOAT"):
            raise ValueError(f"subtype must be 'PCM_16' or 'FLOAT', got {subtype!r}")
        if channels < 1 or sample_rate < 1:
            raise ValueError(f"bad WAV shape: {channels} channels at {sample_rate} Hz")
        self.sample_rate = sample_rate
        self.subtype: Subtype = subtype
        self.channels = channels
        self.frames_written = 0
        self._fsync = fsync
        self._closed = False
        self._failed = False
        self._data_bytes = 0

        self._file, self.name, self._owns_file = open_sink(sink)

        self._start = 0
        self._end = 0
        try:
            self._seekable = bool(self._file.seekable())
            if self._seekable:
                self._start = self._file.tell()
        except (OSError, AttributeError, ValueError):
            self._seekable = False

        size = 0 if self._seekable else _UNKNOWN_SIZE
        frames = 0 if self._seekable else _UNKNOWN_SIZE
        self._layout = _wav_layout(sample_rate, channels, subtype, size, frames)
        self._end = self._start
        try:
            self._guarded(lambda: self._write_all(self._layout.header))
            self._end = self._start + len(self._layout.header)
            self._guarded(self._flush)
        except ChatterboxError:
            if self._owns_file:
                self._file.close()
            raise

    # ---- public API

    @property
    def seconds_written(self) -> float:
        return self.frames_written / self.sample_rate

    def write(self, chunk: np.ndarray) -> None:
        """Append one chunk: shape (frames,) for mono or (frames, channels)."""
        if self._closed or self._failed:
            raise ChatterboxError(f"cannot write {self.name}: the writer is closed (after an earlier error?)")
        samples = np.asarray(chunk, dtype=np.float32)
        if samples.ndim == 1 and self.channels == 1:
            samples = samples[:, None]
        if samples.ndim != 2 or samples.shape[1] != self.channels:
            raise ValueError(
                f"chunk of shape {np.shape(chunk)} does not fit a {self.channels}-channel WAV; "
                "expected (frames,) or (frames, channels)"
            )
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        payload = (to_pcm16(samples) if self.subtype == "PCM_16" else samples.astype("<f4")).tobytes()
        if not payload:
            return
        if self._seekable and len(self._layout.header) - 8 + self._data_bytes + len(payload) > 0xFFFFFFFF:
            raise ChatterboxError(
                f"cannot write {self.name}: a WAV file holds at most 4 GiB; "
                "split the text into several outputs (--output-dir with --split)"
            )
        self._guarded(lambda: self._append(payload))
        self.frames_written += samples.shape[0]

    def close(self) -> None:
        """Flush and, for a path, close the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._failed:
                self._guarded(self._flush)
        finally:
            if self._owns_file:
                self._file.close()

    def __enter__(self) -> StreamingWavWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- internals

    def _append(self, payload: bytes) -> None:
        f = self._file
        if not self._seekable:
            self._write_all(payload)
            self._data_bytes += len(payload)
            self._flush()
            return
        f.seek(self._end)
        self._write_all(payload)
        self._data_bytes += len(payload)
        self._end += len(payload)
        # Data first, sizes second: a crash in between leaves the previous, still valid, sizes.
        f.seek(self._start + 4)
        self._write_all(struct.pack("<I", len(self._layout.header) - 8 + self._data_bytes))
        if self._layout.fact_at is not None:
            f.seek(self._start + self._layout.fact_at)
            self._write_all(struct.pack("<I", self.frames_written + len(payload) // (4 * self.channels)))
        f.seek(self._start + self._layout.data_size_at)
        self._write_all(struct.pack("<I", self._data_bytes))
        f.seek(self._end)
        self._flush()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            if written is None:  # a non-blocking sink that would block
                raise OSError(errno.EAGAIN, "the output would block")
            if written == 0:
                raise OSError(errno.ENOSPC, "no space left on device")
            view = view[written:]

    def _flush(self) -> None:
        self._file.flush()
        if self._fsync:
            try:
                fd = self._file.fileno()
            except (OSError, AttributeError, ValueError):
                return  # in-memory sinks have no descriptor to sync
            os.fsync(fd)

    def _guarded(self, action: Callable[[], object]) -> None:
        good_end = self._end
        try:
            action()
        except OSError as exc:
            self._failed = True
            self._roll_back(good_end)
            raise self._write_error(exc) from exc

    def _roll_back(self, good_end: int) -> None:
        """After a failed append, cut the half-written chunk so the file ends where its header says."""
        if not self._seekable:
            return
        # Best effort: the caller raises the original write error either way.
        with contextlib.suppress(OSError, ValueError):
            self._file.truncate(good_end)

    def _write_error(self, exc: OSError) -> ChatterboxError:
        return write_error(self.name, exc, self.seconds_written)


def open_sink(sink: str | os.PathLike[str] | IO[bytes]) -> tuple[IO[bytes], str, bool]:
    """(file, name for messages, whether the caller closes it) for a path, "-" (stdout) or a file object."""
    if isinstance(sink, (str, os.PathLike)) and os.fspath(sink) == "-":
        # Our own unbuffered handle on fd 1: nothing is left pending in Python's buffers when the
        # reader goes away, so the interpreter does not fail again at exit.
        sys.stdout.flush()
        return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False), "<stdout>", True  # noqa: SIM115
    if isinstance(sink, (str, os.PathLike)):
        name = os.fspath(sink)
        try:
            # Unbuffered: every write reaches the OS at once, so a failure surfaces in write().
            return open(sink, "wb", buffering=0), name, True  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise UsageError(
                f"cannot create {name}: {exc.strerror or exc}; choose a path in an existing, writable folder"
            ) from exc
    return sink, str(getattr(sink, "name", "<output stream>")), False


def write_error(name: str, exc: OSError, seconds_written: float) -> ChatterboxError:
    """The message for a failed write to `name` after `seconds_written` of audio."""
    kept = f" ({seconds_written:.1f} s of audio written before it are kept)" if seconds_written else ""
    if isinstance(exc, BrokenPipeError):
        return ChatterboxError(f"cannot write audio to {name}: the reading program closed the pipe")
    if exc.errno in _DISK_FULL_ERRNOS:
        return ChatterboxError(
            f"cannot write {name}: the disk is full{kept}; free some space or write elsewhere"
        )
    return ChatterboxError(f"cannot write {name}: {exc.strerror or exc}{kept}")


# --------------------------------------------------------------------------------------------------
# Joining chunks


def join_pause(sample_rate: int, seconds: float) -> np.ndarray:
    """Silence to put between two chunks."""
    if seconds < 0:
        raise ValueError(f"pause must be >= 0 s, got {seconds}")
    return np.zeros(round(sample_rate * seconds), dtype=np.float32)


def _ramp(n: int) -> np.ndarray:
    """Raised-cosine rise from 0 towards 1 over n samples."""
    return (0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)).astype(np.float32)


def fade_edges(
    chunk: np.ndarray, sample_rate: int, ms: float = 5.0, *, start: bool = True, end: bool = True
) -> np.ndarray:
    """A copy of `chunk` faded in and out over `ms` (raised cosine), so joins start and end at zero."""
    out = np.array(chunk, dtype=np.float32, copy=True)
    n = min(round(sample_rate * ms / 1000.0), out.shape[0] // 2)
    if n <= 0:
        return out
    ramp = _ramp(n)
    if out.ndim > 1:
        ramp = ramp.reshape((n,) + (1,) * (out.ndim - 1))
    if start:
        out[:n] *= ramp
    if end:
        out[out.shape[0] - n :] *= ramp[::-1]
    return out


def crossfade(outgoing: np.ndarray, incoming: np.ndarray) -> np.ndarray:
    """Equal-length mono signals blended from all `outgoing` to all `incoming` (raised cosine)."""
    if outgoing.shape != incoming.shape:
        raise ValueError(f"crossfade of {outgoing.shape} and {incoming.shape} samples")
    ramp = _ramp(outgoing.shape[0])
    return (outgoing * (1.0 - ramp) + incoming * ramp).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Voice clips

# Loudest 20 ms frame quieter than this means the clip has no usable sound.
SILENCE_DBFS = -50.0
# Frames more than this far below the loudest frame count as silence when trimming the edges.
TRIM_TOP_DB = 40.0
# The model conditions on at most 10 s (S3Gen) and 6 s (T3 prompt); the speaker encoder averages over
# the clip, so a little more than 10 s still helps, but minutes of audio only cost time.
DEFAULT_MAX_VOICE_SECONDS = 20.0
_FRAME_SECONDS = 0.02


class VoiceClip(NamedTuple):
    audio: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    notes: list[str]  # things the user should be told (e.g. the clip was shortened)


def _frame_rms(wav: np.ndarray, frame: int) -> np.ndarray:
    count = math.ceil(wav.shape[0] / frame)
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: wav.shape[0]] = wav
    return np.sqrt(np.mean(padded.reshape(count, frame) ** 2, axis=1))


def active_span(wav: np.ndarray, sample_rate: int, top_db: float = TRIM_TOP_DB) -> tuple[int, int]:
    """Sample range [start, end) between the first and last frame within `top_db` of the loudest one.

    Returns (0, 0) for a clip whose loudest frame is below SILENCE_DBFS.
    """
    frame = max(1, round(sample_rate * _FRAME_SECONDS))
    rms = _frame_rms(wav, frame)
    if rms.size == 0:
        return 0, 0
    loudest = float(rms.max())
    if loudest <= 10 ** (SILENCE_DBFS / 20):
        return 0, 0
    active = np.flatnonzero(rms >= loudest * 10 ** (-top_db / 20))
    return int(active[0]) * frame, min(wav.shape[0], (int(active[-1]) + 1) * frame)


def _dbfs(value: float) -> str:
    return "-inf dBFS" if value <= 0 else f"{20 * math.log10(value):.0f} dBFS"


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be read as a file ("does not exist", "is a folder", "is not a regular file (a device
    or a pipe)"), or None when it is a regular file."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "is a folder"
    return "is not a regular file (a device or a pipe)" if os.path.exists(path) else "does not exist"


def read_voice_clip(
    path: str | os.PathLike[str],
    *,
    min_seconds: float = 3.0,
    max_seconds: float | None = DEFAULT_MAX_VOICE_SECONDS,
) -> VoiceClip:
    """Read a reference voice clip as mono float32 at its own sample rate.

    Any format libsndfile reads (WAV of any subtype, FLAC, OGG, MP3 ...); channels are averaged.
    Length and loudness are judged on the clip with its leading/trailing silence trimmed. A clip with
    more than `max_seconds` of sound is cut to that much, starting where the sound starts, and a note
    says so. Problems raise UsageError naming the file and the fix.
    """
    name = os.fspath(path)
    if (problem := not_a_file(name)) is not None:
        raise UsageError(f"{name} {problem}; give an audio file to --voice")
    try:
        data, sample_rate = sf.read(name, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).replace(f"Error opening {name!r}: ", "").strip().rstrip(".") or type(exc).__name__
        raise UsageError(f"{name} cannot be read: {reason}; give a WAV/FLAC/OGG file") from exc
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.size == 0:
        raise UsageError(f"{name} holds no audio; give at least {min_seconds:g} s of speech")
    if not np.all(np.isfinite(wav)):
        raise UsageError(f"{name} contains invalid samples (NaN or infinity); export it again")

    start, end = active_span(wav, sample_rate)
    if end <= start:
        loudest = float(np.abs(wav).max())
        raise UsageError(
            f"{name} is silent (peak {_dbfs(loudest)}); give a clip with at least {min_seconds:g} s of speech"
        )
    total = wav.shape[0] / sample_rate
    sound = (end - start) / sample_rate
    if sound < min_seconds:
        detail = f" of sound (of {total:.1f} s)" if total - sound > 0.05 else " long"
        raise UsageError(f"{name} is {sound:.1f} s{detail}; give at least {min_seconds:g} s of speech")

    notes: list[str] = []
    if max_seconds is not None and sound > max_seconds:
        wav = wav[start : start + round(max_seconds * sample_rate)]
        notes.append(
            f"{name} is {total:.1f} s long; using {max_seconds:g} s of it, "
            f"starting at {start / sample_rate:.1f} s"
        )
    return VoiceClip(wav, int(sample_rate), notes)


# --------------------------------------------------------------------------------------------------
# Resampling

# soxr: a maintained, fast, properly band-limited resampler (the reference reaches it through librosa,
# whose default is soxr "HQ"), and a small wheel, unlike scipy or torchaudio.


def resample(wav: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ") -> np.ndarray:
    """Resample float audio, shape (frames,) or (frames, channels), to float32 at `sr_out`."""
    audio = np.asarray(wav, dtype=np.float32)
    if sr_in == sr_out:
        return audio
    if audio.shape[0] == 0:
        return np.zeros((0,) + audio.shape[1:], dtype=np.float32)
    return np.asarray(soxr.resample(audio, sr_in, sr_out, quality=quality), dtype=np.float32)


def normalize_loudness(wav: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    """`wav` (mono float) scaled to `target_lufs` of integrated loudness (ITU-R BS.1770, measured with
    pyloudnorm, as Turbo's reference does). Audio whose loudness cannot be measured (silence: -inf) is
    returned as it is."""
    import pyloudnorm

    audio = np.asarray(wav, dtype=np.float32)
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64))
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return audio * np.float32(gain) if math.isfinite(gain) and gain > 0.0 else audio


def resample_tensor(wav: torch.Tensor, sr_in: int, sr_out: int, quality: str = "HQ") -> torch.Tensor:
    """`resample` for a tensor of shape (..., time); returns the same dtype on the same device."""
    import torch

    if sr_in == sr_out:
        return wav
    lead_shape = wav.shape[:-1]
    flat = wav.detach().reshape(-1, wav.shape[-1]).to("cpu", torch.float32).numpy().T  # (time, rows)
    out = resample(np.ascontiguousarray(flat), sr_in, sr_out, quality)
    if out.ndim == 1:
        out = out[:, None]
    result = torch.from_numpy(np.ascontiguousarray(out.T)).reshape(*lead_shape, out.shape[0])
    return result.to(device=wav.device, dtype=wav.dtype)
