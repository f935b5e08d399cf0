"""The driver of `synthesize --engine ray`: skip what is done, speak the rest on Ray Data, merge, report.

Items are the single-process mode's (`batch.make_items`), and so are the settings hash and `batch.pending`,
so a folder can be continued by either engine. The run's seed is fixed here and each item's seed derives
from it and the item's index (`SynthesisSettings.for_item`), so which worker speaks an item changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from chatterbox_cli.batch import BatchItem, Manifest, make_items, pending, settings_hash
from chatterbox_cli.checkpoint import looks_like_path
from chatterbox_cli.errors import ChatterboxError, ExitCode, UsageError
from chatterbox_cli.jobs import (
    SAMPLE_RATE,
    HoldInterrupts,
    Interrupted,
    ItemsFailed,
    Runner,
    RunState,
    SynthesizeJob,
    file_entry,
    interrupted_message,
    output_format,
    prepare_output_dir,
    read_source,
    reporters,
)
from chatterbox_cli.progress import Progress, stderr_is_terminal
from chatterbox_cli.ray_engine.resources import WorkerPlan, items_per_batch, plan_workers
from chatterbox_cli.ray_engine.shards import mark_run, merge_shards, unmark_run
from chatterbox_cli.text import split_items

if TYPE_CHECKING:
    from chatterbox_cli.checkpoint import Checkpoint

INSTALL = "pip install 'chatterbox-cli[ray]'"
# A worker that dies (a lost node, the kernel's OOM killer) is always restarted and its batch redone,
# up to this many times: a batch that kills its worker every time ends the run instead of looping.
BATCH_RETRIES = 3


def run_batch(job: SynthesizeJob) -> dict[str, object]:
    """Do a `--engine ray` run (options already checked by jobs._check_options); return the summary."""
    address = _check(job)
    ray = _import_ray()
    text = read_source(job)
    if not text.strip():
        raise UsageError("no text to speak: the text is empty or only whitespace; give some words")
    assert job.output_dir is not None
    items = make_items(split_items(text, job.split or "lines"), output_format(job).extension)
    out_dir = prepare_output_dir(job.output_dir).resolve()

    run = RunState()
    progress = Progress(enabled=not job.quiet and stderr_is_terminal())
    interrupts = HoldInterrupts()
    notify, warn = reporters(job, run, progress)
    runner = Runner(job, run, progress, interrupts, notify, warn)  # no model: options, seed, hash
    from chatterbox_cli import service

    checkpoint = service.resolve(runner.request)  # a missing checkpoint is exit 3 before Ray starts
    digest = settings_hash(runner.hash_inputs(checkpoint))

    rows: list[dict[str, object]] = []
    with interrupts.installed(), progress:
        with interrupts.critical():
            merge_shards(out_dir)  # what the workers of a killed run finished
        todo = pending(items, out_dir, digest, job.force)
        waiting = set(todo)
        run.files.extend(file_entry(out_dir / it.filename, it) for it in items if it not in waiting)
        if len(todo) < len(items):
            notify(f"{len(items) - len(todo)} of {len(items)} item(s) already done in {out_dir}; skipped")
        started_ray = False
        # Ray prints what its workers report (a worker died, a task is retried) on stdout, which belongs
        # to --json: while Ray runs, that goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                if todo:
                    started_ray = _connect(ray, address)
                    run.load_s = time.perf_counter() - run.started
                    worker_job = _worker_job(job, runner, checkpoint, out_dir)
                    speaker = {"job": worker_job, "digest": digest, "mark": mark_run(out_dir)}
                    rows = _speak(ray, speaker, todo, progress, notify, warn, run)
            except KeyboardInterrupt:
                progress.close()
                raise Interrupted(interrupted_message(job, run)) from None
            finally:
                if started_ray:
                    ray.shutdown()  # stops this run's workers before their shards are merged
                with interrupts.critical():
                    merge_shards(out_dir)
                    unmark_run(out_dir)

    summary = _summary(job, runner, run, rows, items, out_dir, digest)
    failed = [r for r in rows if r["status"] == "failed"]
    for row in failed:
        warn(f"{row['file']} failed: {row['error']}")
    progress.message(f"wrote {out_dir}: {run.audio_s:.1f} s of audio")
    if failed:
        raise ItemsFailed(
            f"{len(failed)} of {len(rows)} item(s) failed (recorded in {Manifest(out_dir).path} with status "
            '"failed"); run the same command again to redo them',
            summary,
        )
    return summary


def _check(job: SynthesizeJob) -> str | None:
    """The usage errors of --engine ray; returns the cluster address (None: a new local Ray)."""
    if job.output_dir is None:
        raise UsageError(
            "--engine ray converts a batch: give --output-dir DIR (one file per item); "
            "one-off text and -o use the default engine"
        )
    if job.save_voice is not None:
        raise UsageError("--save-voice needs the default engine; save the voice with a one-off run first")
    if re.fullmatch(r"cuda:\d+", job.load.device):
        raise UsageError(
            f"--device {job.load.device}: each Ray worker gets its own GPU; use auto, cuda or cpu"
        )
    address = job.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local") and not Path(job.output_dir).is_absolute():
        raise UsageError(
            f"--output-dir {job.output_dir} is relative, but the Ray cluster at {address} may run workers "
            "on other machines; give an absolute path on storage every node shares"
        )
    return address


def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError(f"--engine ray needs the ray extra ({e.name or e} is missing): {INSTALL}") from e
    return ray


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray; False when this process already had Ray."""
    if ray.is_initialized():
        return False
    local = address in (None, "local")
    options: dict[str, object] = {"include_dashboard": False} if local else {}
    try:
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "start a local Ray" if local else f"connect to the Ray cluster at {address}"
        raise ChatterboxError(f"cannot {where}: {e}") from e
    return True


def _worker_job(job: SynthesizeJob, runner: Runner, checkpoint: Checkpoint, out_dir: Path) -> SynthesizeJob:
    """What a worker needs: no text (items come as rows), this run's seed, absolute paths, and the hub
    commit this driver resolved, so every worker loads the same weights."""
    load = job.load
    if checkpoint.source == "local" or looks_like_path(load.model):
        load = replace(load, model=str(checkpoint.folder))
    else:
        load = replace(load, revision=load.revision or checkpoint.revision)
    voice = job.voice
    if voice is not None and Path(voice).is_file():
        voice = str(Path(voice).resolve())
    return replace(
        job,
        text=None,
        input_file=None,
        output_dir=str(out_dir),
        settings=runner.settings,
        load=load,
        voice=voice,
    )


def _speak(
    ray: ModuleType,
    speaker: dict[str, Any],
    todo: list[BatchItem],
    progress: Progress,
    notify: Callable[[str], None],
    warn: Callable[[str], None],
    run: RunState,
) -> list[dict[str, object]]:
    """Speak `todo` on Ray Data with Speaker(**speaker) workers, following the rows as they come back;
    returns them."""
    job: SynthesizeJob = speaker["job"]
    out_dir = Path(str(job.output_dir))
    plan = plan_workers([n["Resources"] for n in ray.nodes() if n["Alive"]], job.workers, job.load.device)
    notify(plan.describe())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is drawn instead, and that needs no notice
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    per_batch = items_per_batch(len(todo), plan.count)
    dataset = ray.data.from_items(
        [{"index": it.index, "text": it.text} for it in todo],
        override_num_blocks=math.ceil(len(todo) / per_batch),
    )
    spoken = _map(ray, dataset, speaker, plan, per_batch)
    texts = {it.filename: it.text for it in todo}
    progress.start(len(todo), 0, sum(len(t) for t in texts.values()))
    run.synth_started = time.perf_counter()
    rows: list[dict[str, object]] = []
    try:
        for row in spoken.iter_rows():
            if row["status"] == "stopped":
                code = ExitCode(int(row["exit_code"]))  # type: ignore[call-overload]
                raise ChatterboxError(f"a Ray worker could not start: {row['error']}", code)
            rows.append(row)
            _advance(progress, row, len(texts[str(row["file"])]))
            for message in str(row["warnings"]).splitlines():
                if message not in run.warnings:  # each worker says it once; the driver says it once
                    warn(message)
            if row["status"] == "done":
                run.audio_s += int(row["frames"]) / SAMPLE_RATE  # type: ignore[call-overload]
                run.files.append({"path": str(out_dir / str(row["file"]))})
    except ChatterboxError:
        raise
    except Exception as e:  # a worker's bug, or a batch that killed its worker every time
        raise ChatterboxError(
            f"the Ray run stopped after {len(rows)} of {len(todo)} item(s): {_describe(e)}; finished "
            "items are kept (worker logs: Ray's session folder); run the same command again to continue"
        ) from e
    progress.close()
    return rows


def _map(
    ray: ModuleType,
    dataset: Any,
    speaker: dict[str, Any],
    plan: WorkerPlan,
    per_batch: int,
) -> Any:
    """`dataset` through Speaker workers, `per_batch` items per call (a lazy Ray dataset of rows)."""
    from chatterbox_cli.ray_engine.speaker import Speaker

    with warnings.catch_warnings():
        # Ray 2.60 names max_restarts/max_task_retries deprecated remote args, with no named replacement yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return dataset.map_batches(
            Speaker,
            fn_constructor_kwargs=speaker,
            batch_size=per_batch,
            compute=ray.data.ActorPoolStrategy(size=plan.count),
            num_gpus=plan.num_gpus,
            num_cpus=plan.num_cpus,
            max_restarts=-1,
            max_task_retries=BATCH_RETRIES,
        )


def _advance(progress: Progress, row: dict[str, object], characters: int) -> None:
    """Move the bar by one finished item: its chunks, its audio and its characters."""
    chunks = int(row["chunks"])  # type: ignore[call-overload]
    seconds = int(row["frames"]) / SAMPLE_RATE  # type: ignore[call-overload]
    progress.add_chunks(chunks, 0)
    for k in range(chunks):
        progress.audio_done(seconds if k == 0 else 0.0, characters if k == chunks - 1 else 0)
    if not chunks:
        progress.audio_done(seconds, None)
    progress.item_done()


def _describe(error: BaseException) -> str:
    """The worker's exception as one line ("module.Error: message"), from Ray's text of it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    raised = [line for line in text.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception): \S", line)]
    return raised[0] if raised else (text.strip().splitlines() or [type(error).__name__])[0]


def _summary(
    job: SynthesizeJob,
    runner: Runner,
    run: RunState,
    rows: list[dict[str, object]],
    items: list[BatchItem],
    out_dir: Path,
    digest: str,
) -> dict[str, object]:
    """The single-process mode's summary, as far as a driver without a model knows it."""
    entries = Manifest(out_dir).entries()
    by_file = {it.filename: it for it in items}
    files = [f for f in run.files if f.get("skipped")]
    made = 0
    for row in rows:
        name = str(row["file"])
        if row["status"] == "done" and name in entries:
            line = entries[name]
            made += 1
            files.append(
                {
                    "path": str(out_dir / name),
                    "text": line.get("text"),
                    "frames": line.get("frames"),
                    "duration_s": line.get("duration"),
                    "chunks": line.get("chunks"),
                    "seed": line.get("seed"),
                    "language": line.get("language"),
                }
            )
        else:
            files.append(
                {
                    "path": str(out_dir / name),
                    "text": by_file[name].text,
                    "status": "failed",
                    "error": row["error"],
                }
            )
    files.sort(key=lambda f: str(f["path"]))
    used = [entries[str(r["file"])] for r in rows if r["status"] == "done" and str(r["file"]) in entries]
    now = time.perf_counter()
    synthesis_s = now - run.synth_started if run.synth_started is not None else 0.0
    skipped = sum(1 for f in files if f.get("skipped"))
    return {
        "engine": "ray",
        "files": files,
        "audio_seconds": round(run.audio_s, 3),
        "preset": ",".join(sorted({str(e.get("preset")) for e in used})) or None,
        "device": ",".join(sorted({str(e.get("device")) for e in used})) or None,
        "workers": len({str(r["worker"]) for r in rows}),
        "voice": job.voice or "builtin",
        "seed": runner.settings.seed,
        "settings": runner.settings.to_dict(),
        "warnings": run.warnings,
        "notes": run.notes,
        "timings": {
            "start_s": round(run.load_s, 3),
            "synthesis_s": round(synthesis_s, 3),
            "total_s": round(now - run.started, 3),
            "rtf": round(synthesis_s / run.audio_s, 4) if run.audio_s > 0 else None,
        },
        "output_dir": str(out_dir),
        "manifest": str(Manifest(out_dir).path),
        "settings_hash": digest,
        "items": {"total": len(items), "made": made, "skipped": skipped, "failed": len(rows) - made},
    }
