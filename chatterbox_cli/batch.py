"""Batch conversion bookkeeping: numbered items, `manifest.jsonl`, and what a rerun may skip.

An item is done when its audio file exists with the frame count its manifest line records, and the line's
text and settings hash match this run. Files are written under a temporary name and renamed when
complete, and the manifest line is appended after the rename, so a killed run never leaves an item
that looks done but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chatterbox_cli.formats import frame_count

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class BatchItem:
    index: int  # 1-based, as the file name shows it
    text: str
    extension: str = ".wav"  # the output format's

    @property
    def filename(self) -> str:
        return f"{self.index:04d}{self.extension}"


def make_items(texts: Iterable[str], extension: str = ".wav") -> list[BatchItem]:
    return [BatchItem(i, t, extension) for i, t in enumerate(texts, start=1)]


def settings_hash(settings: dict[str, object]) -> str:
    """A short, stable hash of everything that changes the audio of an item."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Manifest:
    """`manifest.jsonl`: one JSON object per finished item; the last line for a file wins."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / MANIFEST_NAME

    def entries(self) -> dict[str, dict[str, object]]:
        found: dict[str, dict[str, object]] = {}
        if not self.path.exists():
            return found
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that item is simply not done
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                found[entry["file"]] = entry
        return found

    def append(self, entry: dict[str, object]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def is_done(item: BatchItem, out_dir: Path, entry: dict[str, object] | None, digest: str) -> bool:
    if entry is None or entry.get("text") != item.text or entry.get("settings_hash") != digest:
        return False
    try:
        frames = frame_count(Path(out_dir) / item.filename)
    except (OSError, RuntimeError):
        return False
    return frames == entry.get("frames")


def pending(items: list[BatchItem], out_dir: Path, digest: str, force: bool) -> list[BatchItem]:
    """The items a run must (re)do."""
    if force:
        return list(items)
    entries = Manifest(out_dir).entries()
    return [it for it in items if not is_done(it, out_dir, entries.get(it.filename), digest)]


def partial_path(out_dir: Path, item: BatchItem) -> Path:
    return Path(out_dir) / f".{item.filename}.part"
