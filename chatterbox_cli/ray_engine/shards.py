"""Manifest shards: each Ray worker appends to its own file, the driver merges them into manifest.jsonl.

A shard is a `manifest.jsonl` of one worker (`OUT/.manifest-shards/<worker>.jsonl`), so a line is written
by the same code and with the same fsync as in the single-process mode. The merge rewrites the manifest
with one line per file (the last line for a file wins, as `batch.Manifest.entries` reads it), sorted by
file name, through a temporary file and a rename; a kill at any point leaves either the old or the new
manifest, and shards not yet merged are merged by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path

from chatterbox_cli.batch import MANIFEST_NAME, Manifest
from chatterbox_cli.errors import UsageError

SHARD_DIR = ".manifest-shards"
_MERGING = ".merging"  # a shard taken for merging; a worker still writing starts a new shard


def mark_run(out_dir: Path) -> str:
    """Leave this run's mark in the shard folder and return its name: a worker that cannot see it does not
    share the driver's output folder."""
    folder = Path(out_dir) / SHARD_DIR
    folder.mkdir(exist_ok=True)
    mark = f"run-{uuid.uuid4().hex}"
    (folder / mark).touch()
    return mark


def unmark_run(out_dir: Path) -> None:
    """Remove the runs' marks (a killed run's too) and the shard folder once it is empty."""
    folder = Path(out_dir) / SHARD_DIR
    for mark in folder.glob("run-*"):
        mark.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: a worker is still writing
        folder.rmdir()


def shard_manifest(out_dir: Path, worker: str, mark: str) -> Manifest:
    """The manifest a worker appends its lines to, in the folder where the driver left `mark`."""
    folder = Path(out_dir) / SHARD_DIR
    try:
        shared = (folder / mark).is_file()
    except OSError:
        shared = False
    if not shared:
        raise UsageError(
            f"--output-dir {out_dir} on {socket.gethostname()} is not the driver's folder; put it on "
            "storage every Ray node mounts at the same path"
        )
    manifest = Manifest(out_dir)
    manifest.path = folder / f"{worker}.jsonl"
    return manifest


def merge_shards(out_dir: Path) -> int:
    """Merge every shard into `OUT/manifest.jsonl` and remove them; returns the number of lines merged."""
    folder = Path(out_dir) / SHARD_DIR
    if not folder.is_dir():
        return 0
    for shard in folder.glob("*.jsonl"):
        shard.rename(shard.with_name(shard.name + _MERGING))
    taken = sorted(folder.glob("*" + _MERGING), key=lambda p: p.stat().st_mtime_ns)
    entries = Manifest(out_dir).entries()
    merged = 0
    for shard in taken:
        reader = Manifest(out_dir)
        reader.path = shard
        for name, entry in reader.entries().items():
            entries[name] = entry
            merged += 1
    if taken:
        _write_manifest(Path(out_dir) / MANIFEST_NAME, entries)
    for shard in taken:
        shard.unlink()
    return merged


def _write_manifest(path: Path, entries: dict[str, dict[str, object]]) -> None:
    temporary = path.with_name("." + path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as f:
        for name in sorted(entries):
            f.write(json.dumps(entries[name], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
