"""Output formats, the one home: what each is, how chunks become its bytes, and how it goes into a file.

WAV and raw PCM are written by `audio.py` (the WAV stays valid after every chunk); MP3, FLAC and Opus by
libsndfile through `soundfile`. Streaming was settled by experiment with libsndfile 1.2.2, writing 1.5 s
of a 440 Hz tone at 24 kHz in five parts:

- Opus (Ogg): only appends, into a pipe or a seekable buffer alike; decodes to exactly the samples given.
- MP3: into a seekable sink LAME reserves a first frame and, at close, seeks back to fill it with its
  LAME/Info header (the encoder delay and padding that make the length exact). Into a pipe libsndfile
  writes no such header and never seeks, and the bytes are a valid MP3 as they come. Without the header,
  decoders play the codec's delay first (1,105 samples, 46 ms: LAME's 576 and the decoder's 529) and
  LAME's end padding after; and libsndfile sizes a header-less VBR MP3 from its first frame (it read
  4,860 of 36,000 samples), so MP3 is encoded at a constant 64 kbit/s, which every reader sizes right.
- FLAC: at close libFLAC seeks back to write the sample count, frame sizes and MD5 into STREAMINFO.
  Without them libsndfile cannot read the stream (an unknown length; into a pipe it "lost sync"), so a
  FLAC stream is made whole and handed over at close.

So `ChunkEncoder` streams WAV, PCM, MP3 (libsndfile writing into a pipe) and Opus (into a buffer it only
appends to) and returns FLAC at close. A file path or a seekable file object is written by libsndfile
itself (`open_writer`), as chunks arrive, and finished at close: its MP3 has the LAME header and decodes to
exactly the samples written, its FLAC has STREAMINFO; only a WAV is complete after every chunk.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol

import numpy as np
import soundfile as sf

from chatterbox_cli.audio import StreamingWavWriter, Subtype, open_sink, to_pcm16, write_error
from chatterbox_cli.errors import ChatterboxError, UsageError

# Opus codes at these rates only (RFC 6716); libsndfile refuses the others.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


@dataclass(frozen=True)
class AudioFormat:
    name: str  # what --format and the server's response_format say
    extension: str
    media_type: str
    streamable: bool  # ChunkEncoder hands out valid bytes as chunks arrive (else all at close)
    soundfile: tuple[str, str] | None = None  # libsndfile (format, subtype); None: written by audio.py
    pipe: bool = False  # libsndfile streams it only into a pipe (into a seekable sink it seeks back)
    compression_level: float | None = None  # libsndfile's 0 (best) .. 1 (smallest)
    bitrate_mode: str | None = None

    def soundfile_args(self) -> dict[str, object]:
        assert self.soundfile is not None
        args: dict[str, object] = {"format": self.soundfile[0], "subtype": self.soundfile[1]}
        if self.compression_level is not None:
            args.update(compression_level=self.compression_level, bitrate_mode=self.bitrate_mode)
        return args


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("wav", ".wav", "audio/wav", True),
        # Constant bitrate (see above). At 24 kHz (MPEG-2 Layer III) libsndfile 1.2.2's levels gave 0: 160,
        # 0.5: 80, 0.6: 64 kbit/s; at 0.7 (56 kbit/s) LAME resamples to a lower rate, so no further.
        AudioFormat(
            "mp3",
            ".mp3",
            "audio/mpeg",
            True,
            ("MP3", "MPEG_LAYER_III"),
            pipe=True,
            compression_level=0.6,
            bitrate_mode="CONSTANT",
        ),
        AudioFormat("flac", ".flac", "audio/flac", False, ("FLAC", "PCM_16")),
        AudioFormat("opus", ".opus", "audio/ogg", True, ("OGG", "OPUS")),
        AudioFormat("pcm", ".pcm", "audio/pcm", True),  # raw signed 16-bit little-endian mono, no header
    )
}


def get_format(name: str) -> AudioFormat:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown audio format {name!r}; choose one of {', '.join(FORMATS)}") from None


# Audio extensions of formats not written here: an -o ending in one, with no --format, is refused rather
# than filled with WAV bytes.
OTHER_AUDIO_EXTENSIONS = frozenset(
    ".aac .ac3 .aif .aiff .amr .caf .m4a .m4b .mka .mp2 .mp4 .oga .ogg .wma .webm".split()  # noqa: SIM905
)


def format_for_path(path: str | os.PathLike[str]) -> AudioFormat | None:
    """The format a file name's extension names (out.mp3: mp3), or None."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    return next((f for f in FORMATS.values() if f.extension == extension), None)


def has_encoder(fmt: AudioFormat) -> bool:
    """Whether this libsndfile writes `fmt` (MP3 came with libsndfile 1.1, Opus with 1.0.29)."""
    if fmt.soundfile is None:
        return True
    container, subtype = fmt.soundfile
    return container in sf.available_formats() and subtype in sf.available_subtypes(container)


def check_encoder(fmt: AudioFormat, sample_rate: int | None = None) -> None:
    """UsageError naming the missing encoder and the fix, or a sample rate the codec has not."""
    if fmt.name == "opus" and sample_rate is not None and sample_rate not in _OPUS_RATES:
        raise UsageError(f"Opus codes {', '.join(map(str, _OPUS_RATES))} Hz only, not {sample_rate} Hz")
    if has_encoder(fmt):
        return
    usable = "/".join(f.name for f in FORMATS.values() if has_encoder(f))
    raise UsageError(
        f"this libsndfile ({sf.__libsndfile_version__}) has no {fmt.name.upper()} encoder; install "
        "soundfile>=0.13 (pip install -U soundfile: its wheels bundle libsndfile 1.2 with MP3 and Opus), "
        f"or use --format {usable}"
    )


def frame_count(path: str | os.PathLike[str]) -> int:
    """Samples per channel in a finished output file; raw PCM has no header, so its size says it."""
    fmt = format_for_path(path)
    if fmt is not None and fmt.name == "pcm":
        return os.path.getsize(path) // 2
    return int(sf.info(os.fspath(path)).frames)


def _prepare(samples: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1], NaN as silence (as the WAV writer does)."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim == 2 and audio.shape[1] == 1:
        audio = audio[:, 0]
    if audio.ndim != 1:
        raise ValueError(f"expected mono samples, shape (frames,), got {audio.shape}")
    return np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def _samples_for(fmt: AudioFormat, samples: np.ndarray) -> np.ndarray:
    # 16-bit formats get audio.py's rounding, so FLAC holds the very samples a WAV would.
    return to_pcm16(samples) if fmt.soundfile is not None and fmt.soundfile[1] == "PCM_16" else samples


# --------------------------------------------------------------------------------------------------
# Bytes as chunks arrive


class _Pending:
    """A non-seekable in-memory sink: what was written since the last `take`."""

    def __init__(self) -> None:
        self._data = bytearray()

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self._data)
        self._data.clear()
        return data


class _Buffer(io.BytesIO):
    """A seekable in-memory file for libsndfile; `take` hands out what was appended since the last take.
    Bytes handed out cannot be taken back, so `finish` checks (by CRC) that libsndfile left them alone."""

    def __init__(self) -> None:
        super().__init__()
        self._sent = 0
        self._crc = 0

    def take(self) -> bytes:
        with self.getbuffer() as view:
            data = bytes(view[self._sent :])
        self._sent += len(data)
        self._crc = zlib.crc32(data, self._crc)
        return data

    def finish(self) -> bytes:
        with self.getbuffer() as view:
            rewritten = zlib.crc32(view[: self._sent]) != self._crc
        if rewritten:
            raise ChatterboxError(
                "libsndfile rewrote audio bytes already sent; this format cannot stream here"
            )
        return self.take()


class _Pipe:
    """An OS pipe: libsndfile writes into it as into any pipe (its streaming mode: no header to fill in
    later, no seeking back) and `take` reads what is there without waiting (a non-blocking read end: POSIX,
    or Windows from Python 3.12). Whoever writes keeps each write small enough for the pipe's buffer (4 KiB
    on Windows, 64 KiB on Linux)."""

    def __init__(self) -> None:
        self._read, self.fd = os.pipe()
        os.set_blocking(self._read, False)

    def take(self) -> bytes:
        parts = []
        while True:
            try:
                block = os.read(self._read, 1 << 16)
            except BlockingIOError:
                break
            if not block:
                break
            parts.append(block)
        return b"".join(parts)

    def close_write_end(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def finish(self) -> bytes:
        """What is left once libsndfile is done; closes the pipe."""
        self.close_write_end()
        data = self.take()
        self.close()
        return data

    def close(self) -> None:
        self.close_write_end()
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


# Samples per write into a pipe: at 64 kbit/s, 2,304 samples (4 MPEG-2 frames of 576) come out as a few
# frames of 192 or 193 bytes, and the flush at close as a few more (LAME holds back its 576-sample delay
# and 1,152 samples of look-ahead): 1-2 KiB, below any pipe's buffer, so libsndfile never waits for a
# reader that is waiting for it.
_PIPE_BLOCK = 2304


class ChunkEncoder:
    """Float32 mono chunks in, bytes of `fmt` out: `write` returns what can be sent now (maybe b""),
    `close` the rest. Concatenated, the bytes are one valid file. A streamable format's bytes are valid as
    they come (WAV: header sizes 0xFFFFFFFF, "read to the end"; MP3: no LAME header); FLAC comes whole
    from `close`."""

    def __init__(self, fmt: AudioFormat, sample_rate: int) -> None:
        check_encoder(fmt, sample_rate)
        self.format = fmt
        self._pending: _Pending | None = None
        self._wav: StreamingWavWriter | None = None
        self._pipe: _Pipe | None = None
        self._buffer: _Buffer | None = None
        self._sf: sf.SoundFile | None = None
        self._closed = False
        if fmt.soundfile is None:  # WAV and PCM: audio.py's writer on a non-seekable sink
            self._pending = _Pending()
            self._wav = StreamingWavWriter(self._pending, sample_rate)
            if fmt.name == "pcm":
                self._pending.take()  # the samples without the header
        elif fmt.pipe:
            self._pipe = _Pipe()
            try:
                self._sf = sf.SoundFile(
                    self._pipe.fd, "w", sample_rate, 1, closefd=False, **fmt.soundfile_args()
                )
            except BaseException:
                self._pipe.close()
                raise
        else:
            self._buffer = _Buffer()
            self._sf = sf.SoundFile(self._buffer, "w", sample_rate, 1, **fmt.soundfile_args())

    def write(self, samples: np.ndarray) -> bytes:
        if self._closed:
            raise ChatterboxError(f"the {self.format.name} encoder is closed")
        audio = _prepare(samples)
        if self._wav is not None:
            assert self._pending is not None
            self._wav.write(audio)
            return self._pending.take()
        assert self._sf is not None
        audio = _samples_for(self.format, audio)
        if self._pipe is not None:
            out = []
            for start in range(0, audio.shape[0], _PIPE_BLOCK):
                self._sf.write(audio[start : start + _PIPE_BLOCK])
                out.append(self._pipe.take())
            return b"".join(out)
        assert self._buffer is not None
        self._sf.write(audio)
        return self._buffer.take() if self.format.streamable else b""

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self._wav is not None:
            assert self._pending is not None
            self._wav.close()
            return self._pending.take()
        assert self._sf is not None
        try:
            self._sf.close()
        finally:
            if self._pipe is not None:
                self._pipe.close_write_end()
        if self._pipe is not None:
            return self._pipe.finish()
        assert self._buffer is not None
        return self._buffer.finish()

    def __del__(self) -> None:
        # An encoder dropped without close (a client went away): give the pipe's descriptors back.
        if not getattr(self, "_closed", True):
            self._closed = True
            if self._sf is not None:
                self._sf.close()
            if self._pipe is not None:
                self._pipe.close()


def encode(samples: np.ndarray, sample_rate: int, fmt: AudioFormat) -> bytes:
    """A whole clip as one file's bytes. Written seekably: the WAV header has its sizes, the MP3 its LAME
    header (decodes to exactly these samples), the FLAC its sample count and MD5."""
    buffer = io.BytesIO()
    writer = open_writer(buffer, fmt, sample_rate)
    try:
        writer.write(samples)
    finally:
        writer.close()
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Files


class AudioWriter(Protocol):
    name: str
    frames_written: int

    @property
    def seconds_written(self) -> float: ...

    def write(self, chunk: np.ndarray) -> None: ...

    def close(self) -> None: ...


class EncodedWriter:
    """MP3, FLAC, Opus or raw PCM into a file, chunk by chunk. A regular file (or a seekable file object) is
    written by libsndfile as chunks arrive and finished at close (the MP3's LAME header, the FLAC's
    STREAMINFO); it is only a complete file once closed. Stdout, pipes and other non-seekable sinks get
    `ChunkEncoder`'s bytes as they are ready. Write failures raise ChatterboxError naming the sink."""

    def __init__(self, sink: str | os.PathLike[str] | IO[bytes], fmt: AudioFormat, sample_rate: int) -> None:
        check_encoder(fmt, sample_rate)
        self.sample_rate = sample_rate
        self.frames_written = 0
        self.format = fmt
        self._closed = False
        self._sf: sf.SoundFile | None = None
        self._encoder: ChunkEncoder | None = None
        self._owns_file = False
        if fmt.soundfile is not None and _seekable_target(sink):
            self.name = os.fspath(sink) if isinstance(sink, (str, os.PathLike)) else _name_of(sink)
            try:
                self._sf = sf.SoundFile(sink, "w", sample_rate, 1, **fmt.soundfile_args())
            except (RuntimeError, OSError) as exc:
                raise UsageError(
                    f"cannot create {self.name}: {exc}; choose a path in an existing, writable folder"
                ) from exc
        else:
            self._file, self.name, self._owns_file = open_sink(sink)
            try:
                self._encoder = ChunkEncoder(fmt, sample_rate)
            except BaseException:
                self._release()
                raise

    @property
    def seconds_written(self) -> float:
        return self.frames_written / self.sample_rate

    def write(self, chunk: np.ndarray) -> None:
        if self._closed:
            raise ChatterboxError(f"cannot write {self.name}: the writer is closed")
        audio = _prepare(chunk)
        if self._sf is not None:
            writer = self._sf
            self._guarded(lambda: writer.write(_samples_for(self.format, audio)))
        else:
            assert self._encoder is not None
            self._send(self._encoder.write(audio))
        self.frames_written += audio.shape[0]

    def close(self) -> None:
        """Finish the file (MP3's header, FLAC's STREAMINFO; FLAC to stdout goes out now). Safe twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sf is not None:
                self._guarded(self._sf.close)
            else:
                assert self._encoder is not None
                self._send(self._encoder.close())
        finally:
            self._release()

    def __enter__(self) -> EncodedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _guarded(self, action: Callable[[], object]) -> None:
        try:
            action()
        except (RuntimeError, AssertionError) as exc:  # soundfile asserts that whole chunks were written
            detail = str(exc) or "libsndfile wrote less than asked (is the disk full?)"
            raise ChatterboxError(f"cannot write {self.name}: {detail}") from exc

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = self._file.write(view)
                if not written:
                    raise OSError(errno.ENOSPC, "no space left on device")
                view = view[written:]
            self._file.flush()
        except OSError as exc:
            raise write_error(self.name, exc, self.seconds_written) from exc

    def _release(self) -> None:
        if self._owns_file:
            self._file.close()


def open_writer(
    sink: str | os.PathLike[str] | IO[bytes], fmt: AudioFormat, sample_rate: int, subtype: Subtype = "PCM_16"
) -> AudioWriter:
    """The writer for `fmt` into a path, "-" (stdout) or a binary file object. WAV is `StreamingWavWriter`,
    valid after every chunk; `subtype` applies to WAV only."""
    if fmt.name == "wav":
        return StreamingWavWriter(sink, sample_rate, subtype)
    if subtype != "PCM_16":
        raise UsageError(f"sample format {subtype} applies to WAV only, not {fmt.name}")
    return EncodedWriter(sink, fmt, sample_rate)


def _name_of(sink: IO[bytes]) -> str:
    return str(getattr(sink, "name", "<output stream>"))


def _seekable_target(sink: str | os.PathLike[str] | IO[bytes]) -> bool:
    """A path to a regular file (or none yet), or a seekable file object: libsndfile may seek there."""
    if isinstance(sink, (str, os.PathLike)):
        if os.fspath(sink) == "-":
            return False
        try:
            return stat.S_ISREG(os.stat(sink).st_mode)
        except FileNotFoundError:
            return True
    try:
        return bool(sink.seekable())
    except (OSError, AttributeError, ValueError):
        return False
