"""Progress of a synthesis run on a terminal: items, chunks, audio produced, real-time factor, ETA.

Drawn on stderr (stdout may carry the audio) and only on a terminal; `Progress(enabled=False)` draws
nothing and costs nothing, which is what pipes, CI logs and `--quiet` get.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Progress:
    """A progress bar over the characters of text to speak (chunks differ in length; characters don't).

    `message` prints a line above the bar on a terminal; elsewhere messages are the caller's business.
    """

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._items = self._items_done = 0
        self._chunks = self._chunks_done = 0
        self._audio_s = 0.0
        self._started = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)

    def start(self, items: int, chunks: int, characters: int) -> None:
        """Begin the bar: `items` outputs holding `chunks` chunks of `characters` characters in all."""
        self._items, self._chunks = items, chunks
        self._started = time.perf_counter()
        if not self.enabled:
            return
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[audio]}"),
            TextColumn("{task.fields[rtf]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("speaking", total=max(characters, 1), **self._fields())

    def add_chunks(self, chunks: int, characters: int) -> None:
        """More work became known (batch items are chunked one by one)."""
        self._chunks += chunks
        if self._bar is not None and self._task is not None:
            total = self._bar.tasks[0].total or 0
            self._bar.update(self._task, total=total + characters, **self._fields())

    def audio_done(self, audio_seconds: float, chunk_characters: int | None) -> None:
        """Audio was written: a whole chunk's (or its last piece) with its characters, or an early piece
        (None: the chunk is not done yet)."""
        self._audio_s += audio_seconds
        self._chunks_done += chunk_characters is not None
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=chunk_characters or 0, **self._fields())

    def item_done(self) -> None:
        self._items_done += 1
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, **self._fields())

    @property
    def rtf(self) -> float | None:
        """Compute seconds per second of audio so far (below 1 is faster than real time)."""
        if self._audio_s <= 0:
            return None
        return (time.perf_counter() - self._started) / self._audio_s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _fields(self) -> dict[str, str]:
        counts = f"chunk {self._chunks_done}/{self._chunks}"
        if self._items > 1:
            counts = f"item {self._items_done}/{self._items} · " + counts
        rtf = self.rtf
        return {
            "counts": counts,
            "audio": f"{self._audio_s:.1f} s audio",
            "rtf": f"RTF {rtf:.2f}" if rtf is not None else "RTF –",
        }
