"""One `chatterbox synthesize` run: read the text, load the model, speak into one file or one file per item.

The command line only builds a `SynthesizeJob` and calls `run_synthesize`. Everything the user can get
wrong is checked before the model loads (sources, output paths), so mistakes fail in a second.

Nothing written is lost: a single output is streamed in place and, as WAV, is valid after every chunk (MP3,
FLAC and Opus are finished when the run ends, formats.py); batch items are written as `.NNNN.wav.part`
(or the format's extension), renamed when complete, then recorded in `manifest.jsonl`. Ctrl-C
stops after the write in progress (SIGINT is held back while a chunk is being written), keeps what was
written and exits 130 with a message saying what was kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

import numpy as np
from rich.markup import escape

from chatterbox_cli import __version__, voice_library
from chatterbox_cli.audio import Subtype, join_pause, not_a_file
from chatterbox_cli.batch import BatchItem, Manifest, make_items, partial_path, pending, settings_hash
from chatterbox_cli.errors import ChatterboxError, ExitCode, UsageError
from chatterbox_cli.formats import (
    FORMATS,
    OTHER_AUDIO_EXTENSIONS,
    AudioFormat,
    check_encoder,
    format_for_path,
    frame_count,
    get_format,
    open_writer,
)
from chatterbox_cli.languages import LANGUAGES, detect_language
from chatterbox_cli.progress import Progress, stderr_is_terminal
from chatterbox_cli.text import decode_text, read_text_file, split_items
from chatterbox_cli.variants import variant_for

if TYPE_CHECKING:
    # These pull in torch and the models: imported when a run starts, so `chatterbox --help` stays fast.
    from chatterbox_cli.checkpoint import Checkpoint
    from chatterbox_cli.models.conds import Conditionals
    from chatterbox_cli.pipeline import SynthesisSettings
    from chatterbox_cli.service import LoadRequest, ModelHolder

SplitMode = Literal["lines", "paragraphs"]
Engine = Literal["local", "ray"]
VOICE_SUFFIX = ".voice"
SAMPLE_RATE = 24_000


class Interrupted(ChatterboxError):
    exit_code = ExitCode.INTERRUPTED


class ItemsFailed(ChatterboxError):
    """Some batch items failed (recorded in the manifest as failed); the run's summary comes with it."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, summary: dict[str, object]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class SynthesizeJob:
    text: str | None  # the TEXT argument; "-" reads stdin
    input_file: str | None  # --input; "-" reads stdin
    output: str | None  # -o: a path, or "-" for stdout
    output_dir: str | None  # --output-dir (batch)
    split: SplitMode | None
    settings: SynthesisSettings
    load: LoadRequest
    voice: str | None = None
    save_voice: str | None = None
    subtype: Subtype = "PCM_16"
    audio_format: str | None = None  # --format; None: what -o's extension names, else wav
    force: bool = False
    quiet: bool = False
    engine: Engine = "local"  # ray: batch items spoken by Ray Data workers (ray_engine/)
    ray_address: str | None = None  # --ray-address; None: $RAY_ADDRESS, else a new local Ray
    workers: int | None = None  # --workers; None: one per GPU, else one CPU worker


@dataclass
class RunState:
    """What a run has produced so far; becomes the summary (also of an interrupted run)."""

    files: list[dict[str, object]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    load_s: float = 0.0
    voice_s: float = 0.0
    first_chunk_s: float | None = None  # from the start of the run
    first_audio_s: float | None = None  # from the start of synthesis (model, voice and warm-up ready)
    warm_up_s: float = 0.0
    synth_started: float | None = None
    t3_s: float = 0.0
    s3gen_s: float = 0.0
    audio_s: float = 0.0


# --------------------------------------------------------------------------------------------------
# Interrupts


class HoldInterrupts:
    """SIGINT raises KeyboardInterrupt as usual, except inside `critical()`, where it waits for the end.

    Writing a chunk, renaming a finished item and appending its manifest line are critical: an interrupt
    in their middle would leave the header sizes or the manifest one step behind the data.
    """

    def __init__(self) -> None:
        self._inside = False
        self._pending = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._inside:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[HoldInterrupts]:
        try:
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------------
# Checks before anything is loaded


def _check_options(job: SynthesizeJob) -> None:
    if job.text is not None and job.input_file is not None:
        raise UsageError("give the text either as an argument or with --input, not both")
    if job.text is None and job.input_file is None:
        raise UsageError(
            'give the text to speak: chatterbox synthesize "Hello." -o hello.wav (or - for stdin)'
        )
    if job.output is None and job.output_dir is None:
        raise UsageError(
            "say where the audio goes: -o out.wav, -o - for stdout, or --output-dir DIR --split lines"
        )
    if job.output is not None and job.output_dir is not None:
        raise UsageError("-o writes one file and --output-dir one file per item; give one of them")
    if job.split is not None and job.output_dir is None:
        raise UsageError("--split needs --output-dir (one WAV per item goes into that folder)")
    if job.force and job.output_dir is None:
        raise UsageError("--force applies to --output-dir runs (it redoes items already done)")
    if job.engine != "ray" and (job.ray_address is not None or job.workers is not None):
        raise UsageError("--ray-address and --workers apply to --engine ray")
    if job.save_voice is not None and not job.save_voice.endswith(VOICE_SUFFIX):
        raise UsageError(f"--save-voice must name a file ending in {VOICE_SUFFIX}, got {job.save_voice}")
    if job.output == "-" and sys.stdout.isatty():
        raise UsageError(
            "-o - writes binary audio to stdout, which is a terminal here; "
            "pipe it (| play -) or redirect it (> out.wav)"
        )
    if job.voice is not None and not Path(job.voice).is_file():
        if voice_library.is_name(job.voice):
            voice_library.find(job.voice)  # a library voice, or an error naming the library's
        else:
            problem = not_a_file(job.voice)
            raise UsageError(f"{job.voice} {problem}; give an audio clip or a .voice file to --voice")
    output_format(job)


def output_format(job: SynthesizeJob) -> AudioFormat:
    """--format, else the format -o's extension names, else WAV; checked against -o and --subtype."""
    named = format_for_path(job.output) if job.output not in (None, "-") else None
    if job.audio_format is None:
        extension = Path(job.output or "").suffix.lower()
        if extension in OTHER_AUDIO_EXTENSIONS:
            names = ", ".join(f.extension for f in FORMATS.values())
            raise UsageError(
                f"-o {job.output}: {extension} is not a format written here; end the name in one of "
                f"{names}, or give --format"
            )
        fmt = named or FORMATS["wav"]
    else:
        fmt = get_format(job.audio_format)
        if named is not None and named != fmt:
            assert job.output is not None
            raise UsageError(
                f"-o {job.output} names a {named.name} file but --format is {fmt.name}; "
                f"use -o {Path(job.output).with_suffix(fmt.extension)} or drop --format"
            )
    if job.subtype != "PCM_16" and fmt.name != "wav":
        raise UsageError(f"--subtype {job.subtype} applies to WAV only; drop it for --format {fmt.name}")
    check_encoder(fmt)
    return fmt


def _check_output_file(path: str) -> None:
    if path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"-o {path} is a folder; give a file name such as {target / 'speech.wav'}")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"cannot write {path}: {parent} {what}; create the folder or choose another path")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: the folder {parent} is not writable; choose another path")


def prepare_output_dir(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise UsageError(f"--output-dir {path} is a file, not a folder; choose a folder") from e
    except OSError as e:
        raise UsageError(
            f"cannot create the folder {path} ({e.strerror or e}); choose a writable location"
        ) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"the folder {path} is not writable; choose another --output-dir")
    return folder


def read_source(job: SynthesizeJob) -> str:
    source = job.input_file if job.input_file is not None else job.text
    assert source is not None
    if source == "-":
        if sys.stdin is None:
            raise UsageError("no stdin to read the text from; give the text as an argument or --input FILE")
        return decode_text(sys.stdin.buffer.read(), "stdin")
    if job.input_file is not None:
        return read_text_file(job.input_file)
    return source


# --------------------------------------------------------------------------------------------------
# The run


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_synthesize(job: SynthesizeJob) -> dict[str, object]:
    """Do the run; return the summary (what `--json` prints). Errors are ChatterboxErrors."""
    _check_options(job)
    if job.engine == "ray":
        from chatterbox_cli.ray_engine.run import run_batch

        return run_batch(job)
    text = read_source(job)
    if not text.strip():
        raise UsageError("no text to speak: the text is empty or only whitespace; give some words")
    items: list[BatchItem] | None = None
    out_dir: Path | None = None
    if job.output_dir is not None:
        items = make_items(split_items(text, job.split or "lines"), output_format(job).extension)
        out_dir = prepare_output_dir(job.output_dir)
    else:
        assert job.output is not None
        _check_output_file(job.output)
    if job.save_voice is not None:
        _check_output_file(job.save_voice)

    run = RunState()
    progress = Progress(enabled=not job.quiet and stderr_is_terminal())
    interrupts = HoldInterrupts()
    notify, warn = reporters(job, run, progress)
    with interrupts.installed(), progress:
        try:
            return Runner(job, run, progress, interrupts, notify, warn).execute(text, items, out_dir)
        except KeyboardInterrupt:
            progress.close()
            raise Interrupted(interrupted_message(job, run)) from None


def reporters(
    job: SynthesizeJob, run: RunState, progress: Progress
) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """notify and warn: a note (kept in the summary, shown on a terminal) and a warning (shown unless
    --quiet)."""

    def notify(message: str) -> None:
        run.notes.append(message)
        progress.message(message)

    def warn(message: str) -> None:
        run.warnings.append(message)
        if progress.enabled:
            progress.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)
        elif not job.quiet:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    return notify, warn


def interrupted_message(job: SynthesizeJob, run: RunState) -> str:
    if job.output_dir is not None:
        done = sum(1 for f in run.files if not f.get("skipped"))
        return (
            f"interrupted: {done} item(s) finished in {job.output_dir} this run and are kept "
            f"({run.audio_s:.1f} s of audio); run the same command again to continue"
        )
    if run.files and run.files[0]["frames"]:
        where = "stdout" if job.output == "-" else job.output
        f = run.files[0]
        return (
            f"interrupted: kept {where} with {f['duration_s']:.1f} s of audio "
            f"({f['chunks']} of {f['chunks_total']} chunks); it is a valid {output_format(job).name.upper()}"
        )
    return "interrupted before any audio was written"


class Runner:
    """The state of one run once the model is loaded."""

    def __init__(
        self,
        job: SynthesizeJob,
        run: RunState,
        progress: Progress,
        interrupts: HoldInterrupts,
        notify: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.job, self.run, self.progress, self.interrupts = job, run, progress, interrupts
        self.notify, self.warn = notify, warn
        # --language other than English asks for the multilingual model (variants.variant_for)
        variant = variant_for(job.load.variant, job.settings.language)
        self.request: LoadRequest = replace(job.load, variant=variant.name if variant else None)
        self.settings: SynthesisSettings = job.settings.with_seed()  # one seed for the run, OOM step-down too
        self.format = output_format(job)
        self.detected: set[str] = set()  # languages detected and announced so far
        self.manifest: Manifest | None = None  # where finished items are recorded; None: the folder's

    def execute(self, text: str, items: list[BatchItem] | None, out_dir: Path | None) -> dict[str, object]:
        job, run = self.job, self.run
        self.load()

        # Text problems show before the voice is prepared.
        digest = None
        work: list[tuple[BatchItem | None, list[str], str]]  # item, its chunks, its language
        if items is None:
            work = [(None, *self.chunks_of(text))]
        else:
            assert out_dir is not None
            digest = settings_hash(self.hash_inputs())
            todo = pending(items, out_dir, digest, job.force)
            for item in items:
                if item not in todo:
                    run.files.append(file_entry(out_dir / item.filename, item))
            if len(todo) < len(items):
                self.notify(
                    f"{len(items) - len(todo)} of {len(items)} item(s) already done in {out_dir}; skipped"
                )
            work = [self.work_item(item) for item in todo]

        self.prepare_voice(next(((chunks[0], language) for _, chunks, language in work if chunks), None))
        chunk_count = sum(len(c) for _, c, _ in work)
        self.progress.start(len(work), chunk_count, sum(len(t) for _, c, _ in work for t in c))
        run.synth_started = time.perf_counter()
        for item, chunks, language in work:
            if item is None:
                assert job.output is not None
                self.speak_into(job.output, chunks, replace(self.settings, language=language), None)
            else:
                assert out_dir is not None and digest is not None
                self.speak_item(item, chunks, language, digest, out_dir)
            self.progress.item_done()
        self.progress.close()
        summary = self.summary(digest, out_dir)
        rtf = summary["timings"]["rtf"]  # type: ignore[index]
        where = job.output_dir or ("stdout" if job.output == "-" else job.output)
        self.progress.message(
            f"wrote {where}: {run.audio_s:.1f} s of audio" + (f", RTF {rtf:.2f}" if rtf is not None else "")
        )
        return summary

    def load(self) -> None:
        """Load the model (stepping down as needed) and fill in the variant's defaults."""
        from chatterbox_cli import service

        started = time.perf_counter()
        # The holder owns the model: a step-down on CUDA out-of-memory may replace it at any stage.
        self.holder: ModelHolder = service.ModelHolder(self.request, self.notify)
        variant = self.holder.model.variant  # loads it now, stepping down
        ignored = self.settings.ignored_by(variant)
        if ignored:
            self.warn(f"the {variant.name} model has no input for {', '.join(ignored)}: ignored")
        self.settings = self.settings.for_variant(variant)
        self.run.load_s = time.perf_counter() - started

    def prepare_voice(self, first: tuple[str, str] | None) -> None:
        """Prepare the voice (and save it with --save-voice), then warm up on `first`, the run's first
        chunk and its language, when there is one."""
        started = time.perf_counter()
        self.conds: Conditionals = self.holder.voice(self.job.voice, self.settings.exaggeration)
        self.run.voice_s = time.perf_counter() - started
        if self.job.save_voice is not None:
            self.save_voice(self.job.save_voice)
        if first is not None:
            chunk, language = first
            settings = replace(self.settings, language=language)
            self.run.warm_up_s = self.holder.warm_up(self.conds, chunk, settings)

    def work_item(self, item: BatchItem) -> tuple[BatchItem, list[str], str]:
        """A batch item with its chunks and language; an item with nothing speakable gets no chunks (it
        becomes a short silence)."""
        try:
            return (item, *self.chunks_of(item.text))
        except UsageError as e:
            self.warn(f"item {item.index} ({item.filename}): {e}; writing silence")
            return item, [], self.settings.language or "en"

    def language_of(self, text: str) -> str:
        """The language `text` is spoken in: --language, else the English model's, else detected (said in
        one line per language). Text that looks foreign to the English model gets one hint per run."""
        if self.settings.language is not None:
            return self.settings.language
        variant = self.holder.model.variant
        detection = detect_language(text)
        if len(variant.languages) == 1:
            if detection.code not in variant.languages and not self.detected:
                self.detected.add(detection.code)
                name = LANGUAGES[detection.code].name
                self.warn(
                    f"the text looks {name} ({detection.reason}); the {variant.name} model reads it as "
                    f"{LANGUAGES[variant.languages[0]].name}. For {name}: --language {detection.code}"
                )
            return variant.languages[0]
        if detection.code not in self.detected:
            self.detected.add(detection.code)
            self.notify(f"language {detection.code}: {detection.reason}; --language chooses another")
        return detection.code

    def chunks_of(self, text: str) -> tuple[list[str], str]:
        """The chunks of `text` and its language."""
        from chatterbox_cli import pipeline

        language = self.language_of(text)
        tokenizer = self.holder.model.tokenizer.for_language(language)
        chunks, dropped = pipeline.prepare_chunks(tokenizer, text, self.settings.chunk_tokens)
        new = [c for c in dropped if c not in self.run.dropped]
        if new:
            self.run.dropped.extend(new)
            self.warn(
                f"dropped {len(new)} character(s) the {self.holder.model.variant.name} model has no tokens "
                f"for in {LANGUAGES[language].name}: {pipeline.describe_chars(new)}"
            )
        return chunks, language

    def hash_inputs(self, checkpoint: Checkpoint | None = None) -> dict[str, object]:
        """Everything that changes an item's audio or file, for the settings hash. The run's own random
        seed is left out: without --seed, finished items count as done whatever seed made them.
        `checkpoint`: the resolved checkpoint when no model is loaded here (default: the loaded one's)."""
        job = self.job
        values = job.settings.to_dict()
        values.update(
            model=job.load.model,
            revision=job.load.revision or (checkpoint or self.holder.checkpoint).revision,
            variant=self.request.variant,  # None: the folder's own, which the model path names
            preset=job.load.preset,
            plan=job.load.plan,
            voice="builtin" if job.voice is None else _file_digest(job.voice),
            subtype=job.subtype,
        )
        if self.format.name != "wav":  # absent for WAV, so folders made before --format keep their hash
            values["format"] = self.format.name
        return values

    def speak_into(
        self, sink: str | Path, chunks: list[str], settings: SynthesisSettings, item: BatchItem | None
    ) -> dict[str, object]:
        """Stream `chunks` into one audio file at `sink`; returns (and records in run.files) its entry."""

        run, interrupts = self.run, self.interrupts
        pause = join_pause(SAMPLE_RATE, settings.pause_seconds)
        entry: dict[str, object] = {
            "path": str(sink) if item is None else str(Path(sink).parent / item.filename),
            "frames": 0,
            "duration_s": 0.0,
            "chunks": 0,
            "chunks_total": len(chunks),
            "seed": settings.seed,
            "language": settings.language,
        }
        if item is not None:
            entry["text"] = item.text
        run.files.append(entry)
        with interrupts.critical():
            writer = open_writer(sink, self.format, SAMPLE_RATE, self.job.subtype)
        try:
            if not chunks:
                with interrupts.critical():
                    writer.write(pause)
            spoken = self.holder.speak(chunks, self.conds, settings)
            done, continuing = 0, False  # continuing: the last piece was an early piece of this chunk
            for chunk in spoken:
                first_piece = chunk.index > 0 and not continuing
                audio = np.concatenate([pause, chunk.audio]) if first_piece else chunk.audio
                continuing = not chunk.final
                done += chunk.final
                with interrupts.critical():  # the written audio and its account, never one without the other
                    writer.write(audio)
                    run.audio_s += audio.shape[0] / SAMPLE_RATE
                    entry.update(
                        frames=writer.frames_written, duration_s=round(writer.seconds_written, 3), chunks=done
                    )
                if run.first_chunk_s is None:
                    run.first_chunk_s = time.perf_counter() - run.started
                    run.first_audio_s = time.perf_counter() - (run.synth_started or run.started)
                run.t3_s += chunk.t3_s
                run.s3gen_s += chunk.s3gen_s
                characters = len(chunk.text) if chunk.final else None
                self.progress.audio_done(audio.shape[0] / SAMPLE_RATE, characters)
        finally:
            writer.close()
        return entry

    def speak_item(
        self, item: BatchItem, chunks: list[str], language: str, digest: str, out_dir: Path
    ) -> dict[str, object]:
        """Speak one batch item into its file and record it in the manifest (`self.manifest`, default
        the folder's); returns the manifest line."""
        settings = replace(self.settings.for_item(item.index), language=language)
        part = partial_path(out_dir, item)
        try:
            entry = self.speak_into(part, chunks, settings, item)
        except BaseException:
            part.unlink(missing_ok=True)  # a rerun redoes the item; no half file is left behind
            self.run.files.pop()
            raise
        final = out_dir / item.filename
        manifest = self.manifest if self.manifest is not None else Manifest(out_dir)
        with self.interrupts.critical():
            try:
                os.replace(part, final)
            except OSError as e:
                raise ChatterboxError(f"cannot rename {part} to {final}: {e.strerror or e}") from e
            try:
                # As a reader counts them, which is what a rerun compares (an MP3 decoder that ignored
                # the LAME header would count the encoder's delay and padding too).
                frames = frame_count(final)
            except (OSError, RuntimeError) as e:
                raise ChatterboxError(f"cannot read back {final}: {e}") from e
            line: dict[str, object] = {
                "file": item.filename,
                "text": item.text,
                "frames": frames,
                "duration": entry["duration_s"],
                "chunks": entry["chunks"],
                "preset": self.holder.model.preset,
                "device": str(self.holder.model.device),
                "seed": settings.seed,
                "language": language,
                "settings_hash": digest,
            }
            try:
                manifest.append(line)
            except OSError as e:
                raise ChatterboxError(
                    f"cannot append to {manifest.path}: {e.strerror or e}; free some space and run again"
                ) from e
        return line

    def save_voice(self, path: str) -> None:
        import torch

        from chatterbox_cli.models.conds import save_voice

        job = self.job
        metadata = {
            "source_name": Path(job.voice).name if job.voice else "built-in voice",
            "exaggeration": f"{self.settings.exaggeration:g}",
            "model": job.load.model,
            "created_by": f"chatterbox-cli {__version__}",
        }
        if job.voice:
            metadata["source_sha256"] = _file_digest(job.voice)
        try:
            save_voice(path, self.conds.to("cpu", torch.float32), metadata)
        except OSError as e:
            raise ChatterboxError(f"cannot write the voice file {path}: {e.strerror or e}") from e
        self.notify(f"saved the voice to {path}")

    def summary(self, digest: str | None, out_dir: Path | None) -> dict[str, object]:
        job, run, model = self.job, self.run, self.holder.model
        now = time.perf_counter()
        synthesis_s = now - run.synth_started if run.synth_started is not None else 0.0
        made = [f for f in run.files if not f.get("skipped")]
        summary: dict[str, object] = {
            "files": run.files,
            "audio_seconds": round(run.audio_s, 3),
            "preset": model.preset,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "quant_cache": dict(model.quant_cache),  # component -> hit | miss | off (quantized ones only)
            "step_downs": list(self.holder.step_downs),  # what running out of GPU memory changed
            "voice": job.voice or "builtin",
            "seed": self.settings.seed,
            "settings": self.settings.to_dict(),
            "dropped_chars": run.dropped,
            "warnings": run.warnings,
            "notes": run.notes,
            "timings": {
                "load_s": round(run.load_s, 3),
                "voice_s": round(run.voice_s, 3),
                "warm_up_s": round(run.warm_up_s, 3),
                "first_chunk_s": None if run.first_chunk_s is None else round(run.first_chunk_s, 3),
                "first_audio_s": None if run.first_audio_s is None else round(run.first_audio_s, 3),
                "t3_s": round(run.t3_s, 3),
                "s3gen_s": round(run.s3gen_s, 3),
                "synthesis_s": round(synthesis_s, 3),
                "total_s": round(now - run.started, 3),
                "rtf": round(synthesis_s / run.audio_s, 4) if run.audio_s > 0 else None,
            },
        }
        if out_dir is not None:
            summary.update(
                output_dir=str(out_dir),
                manifest=str(Manifest(out_dir).path),
                settings_hash=digest,
                items={"total": len(run.files), "made": len(made), "skipped": len(run.files) - len(made)},
            )
        if job.save_voice is not None:
            summary["saved_voice"] = job.save_voice
        return summary


def file_entry(path: Path, item: BatchItem) -> dict[str, object]:
    """The summary entry of an item a previous run finished."""
    frames = frame_count(path)
    return {
        "path": str(path),
        "text": item.text,
        "frames": frames,
        "duration_s": round(frames / SAMPLE_RATE, 3),
        "skipped": True,
    }
