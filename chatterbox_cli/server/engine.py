"""The server's speech engine: one model, one worker thread, and the requests it speaks.

Requests wait in a queue. Each round, the worker takes the oldest request's voice and settings and the
next chunk of every waiting request that shares them (up to the batch size the free memory allows,
service.ModelHolder.group_size), and decodes those chunks together in one T3 batch and one S3Gen call
(pipeline.speak_group). A request that arrives while a round runs joins at the next chunk boundary. The
rows of a round then move behind the other waiting requests, so a long text does not hold the GPU while
others wait. A round starts once requests stop arriving (GATHER_QUIET_S apart, GATHER_MAX_S at most)
and, after a round that ended requests, once as many wait as it ended: the clients of a round that just
ended send their next requests within some tens of milliseconds of each other, and a round started on
the first few of them would keep the rest waiting for all of it. Every chunk is seeded
by its own request's seed and index, so a request's audio does not depend on which requests shared its
rounds. Out-of-memory is handled by the model holder (halve the group, then step down), as for the CLI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from chatterbox_cli import voice_library
from chatterbox_cli.audio import join_pause
from chatterbox_cli.errors import ChatterboxError, UsageError
from chatterbox_cli.models.conds import Conditionals
from chatterbox_cli.pipeline import SAMPLE_RATE, ChunkRow, SynthesisSettings
from chatterbox_cli.service import ModelHolder

log = logging.getLogger("chatterbox.server")

# OpenAI's voice names: the checkpoint's built-in voice, unless the voice library has one of that name.
OPENAI_VOICES = frozenset(
    [
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    ]
)
BUILTIN = ("default", "builtin")

# How long the worker waits for more requests before it starts a round: until none has arrived for
# GATHER_QUIET_S, and no longer than GATHER_MAX_S. After a round that ended K requests, while fewer than K
# wait, it waits on as long as requests keep coming (RETURN_GAP_S apart at most, the first within
# RETURN_GAP_S of the round's end), and starts as soon as K wait. A lone request pays GATHER_QUIET_S once.
# 32 closed-loop clients' next requests reached the server over 0.15 s and more, a few ms apart (H100,
# benchmarks/serve_load.py with all clients in one process): with the quiet gap alone they were once split
# 5 + 27, with a 0.15 s cap 21 + 11, and each part of a split waits for the other's rounds.
GATHER_QUIET_S = 0.02
RETURN_GAP_S = 0.1
GATHER_MAX_S = 0.5

# What a request receives from the engine: audio (float32, 24 kHz, pauses included), an error, or None
# at the end.
Delivery = Callable[[np.ndarray | BaseException | None], None]


@dataclass(eq=False)
class Speech:
    """One request in the engine: its chunks, voice and settings, and how far it has come."""

    chunks: list[str]
    conds: Conditionals
    voice_key: str
    settings: SynthesisSettings  # with a seed
    deliver: Delivery
    next: int = 0  # the next chunk to finish
    in_chunk: bool = False  # an early piece of chunk `next` went out
    text_tokens: int = 0  # the text tokens T3 read for its chunks so far
    speech_tokens: int = 0  # the speech tokens of its chunks made so far
    cancelled: bool = False  # the client went away or its time ran out: its chunks are dropped
    queued_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.settings.seed is None:
            self.settings = self.settings.with_seed()

    @property
    def key(self) -> tuple[str, SynthesisSettings]:
        """What requests must share to decode together: the voice, and the settings less the seed."""
        return self.voice_key, replace(self.settings, seed=None)


class Engine:
    def __init__(
        self,
        holder: ModelHolder,
        gather_quiet_s: float = GATHER_QUIET_S,
        return_gap_s: float = RETURN_GAP_S,
        gather_max_s: float = GATHER_MAX_S,
    ) -> None:
        self.holder = holder
        self.gather_quiet_s, self.return_gap_s, self.gather_max_s = gather_quiet_s, return_gap_s, gather_max_s
        self._last_arrival = 0.0
        self._returning = 0  # requests the last round ended: their clients may be sending the next ones
        self._ended_at = 0.0  # when the last round ended
        model = holder.model
        self.variant = model.variant
        self.tokenizer = model.tokenizer  # the same at every preset
        builtin = model.builtin_voice
        self.builtin = builtin.to("cpu") if builtin is not None else None
        self._voices: dict[str, tuple[int, Conditionals]] = {}  # library name -> (mtime, conds)
        self._queue: list[Speech] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="chatterbox-engine", daemon=True)
        self.rounds = 0
        self.largest_group = 0  # the most requests that shared a round so far

    # -- requests side (any thread) ---------------------------------------------------------------------

    def voice(self, name: str) -> tuple[str, Conditionals]:
        """A voice by name: the library's, else (OpenAI's names, "default") the built-in one."""
        if voice_library.is_name(name) and voice_library.path_of(name).is_file():
            from chatterbox_cli.models.conds import load_voice

            path = voice_library.path_of(name)
            mtime = path.stat().st_mtime_ns
            cached = self._voices.get(name)
            if cached is None or cached[0] != mtime:
                conds, _ = load_voice(path)
                cached = self._voices[name] = (mtime, conds.to("cpu"))
            return f"library:{name}:{mtime}", cached[1]
        if name.lower() in OPENAI_VOICES or name.lower() in BUILTIN:
            if self.builtin is None:
                raise UsageError(
                    "this checkpoint has no built-in voice (conds.pt); add one to the voice library with "
                    f"`chatterbox voices add {name} clip.wav`"
                )
            return "builtin", self.builtin
        voice_library.path_of(name)  # a name that is not one says so
        have = ", ".join(e.name for e in voice_library.entries()) or "none"
        raise UsageError(
            f"no voice {name!r}: the library ({voice_library.library_dir()}) has {have}; OpenAI's voice "
            "names speak in the built-in voice. Add one with `chatterbox voices add NAME clip.wav`"
        )

    def submit(self, speech: Speech) -> None:
        with self._wake:
            if self._stopping:
                raise ChatterboxError("the server is shutting down")
            self._queue.append(speech)
            self._last_arrival = time.perf_counter()
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests already queued, then end the worker."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                self._queue = [s for s in self._queue if not s.cancelled]
                while not self._queue and not self._stopping:
                    self._wake.wait()
                    self._queue = [s for s in self._queue if not s.cancelled]
                if not self._queue:
                    return
                gathered = self._gather()
                self._queue = [s for s in self._queue if not s.cancelled]
                if not self._queue:
                    continue
                key = self._queue[0].key
                candidates = [s for s in self._queue if s.key == key]
            group = candidates
            try:
                size, _ = self.holder.group_size(len(candidates))
                group = candidates[:size]
                self._round(group, gathered)
            except Exception as e:  # every request of the round hears of it
                self._fail(group, e)

    def _gather(self) -> float:
        """Wait while requests keep arriving, longer while fewer wait than the last round ended, up to
        gather_max_s (see GATHER_QUIET_S); return the seconds waited. Called holding the lock, which the
        waits release."""
        start = time.perf_counter()
        if start - self._ended_at > self.return_gap_s:  # nobody came back soon: no returns to wait for
            self._returning = 0
        while not self._stopping:
            if len(self._queue) < self._returning:  # the gap counts from the round's end at the earliest
                until = max(self._last_arrival, start) + self.return_gap_s
            elif self._returning:  # as many wait as the last round ended: no quiet window to wait out
                break
            else:
                until = self._last_arrival + self.gather_quiet_s
            wait = min(start + self.gather_max_s, until) - time.perf_counter()
            if wait <= 0:
                break
            self._wake.wait(wait)
        self._returning = 0
        return time.perf_counter() - start

    def _round(self, group: list[Speech], gathered: float) -> None:
        self.rounds += 1
        self.largest_group = max(self.largest_group, len(group))
        started = time.perf_counter()
        first_audio: float | None = None
        t3_s = render_s = early_s = 0.0  # per-row shares summed: the round's T3 and S3Gen time
        starting = sum(s.next == 0 for s in group)
        first = group[0]
        rows = [ChunkRow(s.chunks[s.next], s.next, int(s.settings.seed or 0)) for s in group]
        pause = join_pause(SAMPLE_RATE, first.settings.pause_seconds)
        for j, chunk in self.holder.speak_rows(rows, first.conds, first.settings):
            speech = group[j]
            if speech.cancelled:
                continue
            starts = chunk.index > 0 and not speech.in_chunk
            speech.in_chunk = not chunk.final
            speech.deliver(np.concatenate([pause, chunk.audio]) if starts else chunk.audio)
            first_audio = first_audio or time.perf_counter() - started
            if chunk.final:
                speech.next += 1
                speech.text_tokens += chunk.text_tokens
                speech.speech_tokens += chunk.speech_tokens
                t3_s, render_s = t3_s + chunk.t3_s, render_s + chunk.s3gen_s
            else:
                early_s += chunk.s3gen_s
        with self._wake:
            done = [s for s in group if s.next == len(s.chunks) or s.cancelled]
            self._returning = sum(not s.cancelled for s in done)
            self._ended_at = time.perf_counter()
            # the round's requests go behind the others that wait (the queue keeps arrival order otherwise)
            self._queue = [s for s in self._queue if s not in group] + [s for s in group if s not in done]
        for speech in done:
            if not speech.cancelled:
                speech.deliver(None)
        log.info(
            "round %d: %d requests (%d starting, gathered for %.3f s), first audio after %.3f s, done after "
            "%.3f s (T3 after the early pieces %.3f s, early pieces' S3Gen %.3f s, S3Gen %.3f s)",
            self.rounds,
            len(group),
            starting,
            gathered,
            first_audio or 0.0,
            time.perf_counter() - started,
            t3_s,
            early_s,
            render_s,
        )

    def _fail(self, group: list[Speech], error: BaseException) -> None:
        if not isinstance(error, ChatterboxError):
            log.exception("speaking failed", exc_info=error)
        with self._wake:
            self._queue = [s for s in self._queue if s not in group]
        for speech in group:
            speech.deliver(error)
