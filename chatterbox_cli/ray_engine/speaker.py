"""The Ray Data worker: a callable class that loads the model once and speaks batches of items.

It loads on its first call, not in `__init__`: Ray Data calls a worker from another thread than the one
that built it, and the warm-up (and any CUDA graph captured there) belongs to the thread that speaks. Each
item goes through `jobs.Runner.speak_item`, the single-process mode's own code (temporary name, rename,
manifest line), with this worker's shard as the manifest. Only a small row per item goes back to the
driver; the audio stays in the output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chatterbox_cli.batch import BatchItem, partial_path
from chatterbox_cli.errors import ChatterboxError, ExitCode, UsageError
from chatterbox_cli.jobs import HoldInterrupts, Runner, RunState, SynthesizeJob, output_format
from chatterbox_cli.progress import Progress
from chatterbox_cli.ray_engine.shards import shard_manifest

# What a worker returns per item: file name; status "done", "failed" (the item's own error, recorded in
# the shard) or "stopped" (the worker could not load the model or the voice, so the item was not tried);
# frames written, chunks, the error and its exit code, warnings (one per line), the worker's id.
ROW_COLUMNS = ("file", "status", "frames", "chunks", "error", "exit_code", "warnings", "worker")


def _quiet(_: str) -> None:
    pass


class Speaker:
    def __init__(self, job: SynthesizeJob, digest: str, mark: str) -> None:
        """`job`: the run's, with an absolute output folder; `digest`: its settings hash; `mark`: the
        driver's mark in that folder (shards.mark_run)."""
        import ray

        assert job.output_dir is not None
        self.job, self.digest, self.out_dir, self.mark = job, digest, Path(job.output_dir), mark
        self.extension = output_format(job).extension
        self.worker = ray.get_runtime_context().get_actor_id() or f"pid-{os.getpid()}"
        self.runner: Runner | None = None
        self.start_error: ChatterboxError | None = None
        self.warnings: list[str] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            BatchItem(int(index), str(text), self.extension)
            for index, text in zip(batch["index"], batch["text"], strict=True)
        ]
        if self.runner is None and self.start_error is None:
            try:
                self.runner = self._start(items[0])
            except ChatterboxError as e:  # the driver stops the run with this message and exit code
                self.start_error = e
        if self.runner is None:
            assert self.start_error is not None
            error, code = str(self.start_error), int(self.start_error.exit_code)
            rows = [self._row(item, "stopped", error=error, exit_code=code) for item in items]
        else:
            rows = [self._speak(self.runner, item) for item in items]
        return {key: np.array([row[key] for row in rows]) for key in ROW_COLUMNS}

    def _start(self, first: BatchItem) -> Runner:
        """Check the output folder is the driver's, load the model and the voice, and warm up on `first`'s
        first chunk."""
        runner = Runner(
            self.job, RunState(), Progress(enabled=False), HoldInterrupts(), _quiet, self.warnings.append
        )
        runner.manifest = shard_manifest(self.out_dir, self.worker, self.mark)
        runner.load()
        try:
            chunks, language = runner.chunks_of(first.text)
        except UsageError:  # nothing speakable: no warm-up on it
            chunks, language = [], ""
        runner.prepare_voice((chunks[0], language) if chunks else None)
        return runner

    def _row(self, item: BatchItem, status: str, **values: object) -> dict[str, object]:
        row: dict[str, object] = {"file": item.filename, "status": status, "frames": 0, "chunks": 0}
        return {**row, "error": "", "exit_code": 0, "warnings": "", "worker": self.worker, **values}

    def _speak(self, runner: Runner, item: BatchItem) -> dict[str, object]:
        """Speak one item; an error becomes a `failed` line in the shard and a failed row."""
        said = len(self.warnings)
        row = self._row(item, "done")
        try:
            line = runner.speak_item(*runner.work_item(item), self.digest, self.out_dir)
            row.update(frames=line["frames"], chunks=line["chunks"])
        except Exception as e:
            error = str(e) if isinstance(e, ChatterboxError) else f"{type(e).__name__}: {e}"
            row.update(status="failed", error=error, exit_code=int(ExitCode.FAILED))
            partial_path(self.out_dir, item).unlink(missing_ok=True)
            assert runner.manifest is not None
            runner.manifest.append(
                {
                    "file": item.filename,
                    "text": item.text,
                    "status": "failed",
                    "error": error,
                    "seed": runner.settings.for_item(item.index).seed,
                    "settings_hash": self.digest,
                }
            )
        row["warnings"] = "\n".join(self.warnings[said:])
        return row
