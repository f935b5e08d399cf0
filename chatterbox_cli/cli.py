"""The `chatterbox` command line. Commands only parse, call one function and print its answer."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer

from chatterbox_cli import __version__, oom, vram
from chatterbox_cli.checkpoint import DEFAULT_REPO as DEFAULT_MODEL
from chatterbox_cli.errors import ChatterboxError, ExitCode, OutOfMemoryError, UsageError

if TYPE_CHECKING:
    from chatterbox_cli.reports import ProbeReport

app = typer.Typer(
    name="chatterbox",
    help="Resemble AI's Chatterbox text-to-speech on small GPUs and CPUs.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

PROG_NAME = "chatterbox"


def use_rich() -> bool:
    """Colour and tables only for a terminal, and never when NO_COLOR is set or TERM is dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def emit_json(obj: dict[str, Any]) -> None:
    """Print one JSON object on stdout: the only thing a `--json` command writes there."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def json_errors(enabled: bool) -> Iterator[None]:
    """In `--json` mode turn a ChatterboxError into {"error": ..., "exit_code": ...} and that exit code.
    CUDA out-of-memory that no step-down handled becomes OutOfMemoryError (exit 4), never a traceback."""
    try:
        try:
            yield
        except Exception as e:
            if isinstance(e, ChatterboxError) or not oom.is_out_of_memory(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OutOfMemoryError(
                f"out of GPU memory ({first}); try --preset auto, a shorter --max-tokens, or --device cpu"
            ) from oom.forget_frames(e)
    except ChatterboxError as e:
        if not enabled:
            raise
        emit_json({"error": str(e), "exit_code": int(e.exit_code)})
        raise typer.Exit(int(e.exit_code)) from e


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"chatterbox-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Resemble AI's Chatterbox text-to-speech on small GPUs and CPUs."""


def _pick_label(preset: str | None) -> str:
    from chatterbox_cli.service import CPU_PRESET

    if preset is None:
        return "-"
    return "CPU" if preset == CPU_PRESET else preset


def _print_vram_rich(probe: ProbeReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    report = probe.vram
    console = Console()
    if report.gpus:
        table = Table(
            title=f"NVIDIA driver {report.driver_version} · CUDA driver {report.cuda_driver_version}",
        )
        for col in ("GPU", "name", "compute cap.", "total", "used", "free", "would pick"):
            # Only the name wraps, so narrow terminals keep every number whole.
            table.add_column(
                col, justify="left" if col in ("name", "would pick") else "right", no_wrap=col != "name"
            )
        for g in report.gpus:
            table.add_row(
                str(g.index),
                g.name,
                f"{g.compute_capability[0]}.{g.compute_capability[1]}",
                vram.gib(g.total_bytes),
                vram.gib(g.used_bytes),
                f"[bold]{vram.gib(g.free_bytes)}[/bold]",
                _pick_label(probe.picks.get(g.index, (None, ""))[0]),
            )
        console.print(table)
        for index, (_, reason) in probe.picks.items():
            console.print(f"GPU {index}: {escape(reason)}", highlight=False, soft_wrap=True)
        if probe.would_pick_reason:
            console.print(
                f"[yellow]would pick -: {escape(probe.would_pick_reason)}[/yellow]", highlight=False
            )
    elif report.error is None:
        reason = f" ({report.no_gpu_reason})" if report.no_gpu_reason else ""
        console.print(f"[yellow]{vram.CPU_FALLBACK_NOTE}[/yellow]{reason}", highlight=False)
    style = "green" if report.bitsandbytes_available else "yellow"
    console.print(f"[{style}]{vram.bitsandbytes_line(report)}[/{style}]", highlight=False)


def _format_probe_plain(probe: ProbeReport) -> str:
    notes = {g.index: "would pick: -" for g in probe.vram.gpus}
    for index, (preset, reason) in probe.picks.items():
        notes[index] = f"would pick: {_pick_label(preset)} ({reason})"
    text = vram.format_plain(probe.vram, notes)
    if probe.vram.gpus and probe.would_pick_reason:
        text += f"\nwould pick -: {probe.would_pick_reason}"
    return text


@app.command("probe-vram")
def probe_vram(
    model: Annotated[
        str, typer.Option(help="Model hub repo id or local checkpoint folder (never downloaded here).")
    ] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(help="Speech tokens per utterance, for the pick.")] = 1000,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """List NVIDIA GPUs with total/used/free memory, driver, compute capability, bitsandbytes, and the
    preset `--preset auto` would pick on each GPU for the model."""
    with json_errors(json_out):
        from chatterbox_cli.reports import probe_report
        from chatterbox_cli.service import LoadRequest

        probe = probe_report(LoadRequest(model=model, max_tokens=max_tokens))
    report = probe.vram
    if json_out:
        emit_json(probe.to_dict())
    elif use_rich():
        _print_vram_rich(probe)
    else:
        typer.echo(_format_probe_plain(probe))
    if report.error is not None:
        if not json_out:
            typer.echo(f"error: {report.error}", err=True)
        raise typer.Exit(int(ExitCode.FAILED))


@app.command()
def languages(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """List the languages of the multilingual model, and whether the optional package each needs is
    installed."""
    from chatterbox_cli.languages import LANGUAGES, extra_installed

    rows = [
        {"code": lang.code, "name": lang.name, "extra": lang.extra, "installed": extra_installed(lang)}
        for lang in LANGUAGES.values()
    ]
    if json_out:
        emit_json({"schema_version": 1, "variant": "multilingual", "languages": rows})
        return
    for row in rows:
        needs = "" if row["extra"] is None else f"needs pip install 'chatterbox-cli[{row['extra']}]'"
        state = "" if row["installed"] else " (not installed)"
        typer.echo(f"{row['code']}  {row['name']:<11} {needs}{state}".rstrip())


# --------------------------------------------------------------------------------------------------
# synthesize / estimate

_MODEL_HELP = "Model hub repo id or a local checkpoint folder."
_PANEL_VOICE = "Voice and sampling"
_PANEL_MODEL = "Model and device"
_PANEL_OUTPUT = "Output"
# Options several commands share, declared once
ModelOption = Annotated[str, typer.Option(help=_MODEL_HELP)]
RevisionOption = Annotated[
    str | None, typer.Option(help="Hub revision (branch, tag or commit).", show_default=False)
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
VariantOption = Annotated[
    Literal["english", "multilingual", "turbo"] | None,
    typer.Option(help="Model variant. Default: as for synthesize.", show_default=False),
]


def _parse_batch(value: str) -> int:
    """--batch: 'auto' is 0 for the service; otherwise a count >= 1."""
    if value == "auto":
        return 0
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--batch must be auto or a whole number >= 1, got {value!r}")
    return int(value)


@app.command()
def synthesize(
    text: Annotated[
        str | None, typer.Argument(help="Text to speak; - reads it from stdin.", show_default=False)
    ] = None,
    input_file: Annotated[
        str | None,
        typer.Option("--input", "-i", help="UTF-8 text file to speak (- for stdin).", show_default=False),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Audio file, written as chunks arrive; - writes to stdout. A WAV is valid after every "
            "chunk (partial audio survives); MP3, FLAC and Opus are complete when the run ends.",
            rich_help_panel=_PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    output_dir: Annotated[
        str | None,
        typer.Option(
            "--output-dir",
            help="Batch mode: one numbered file per item plus manifest.jsonl; a rerun continues.",
            rich_help_panel=_PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        Literal["lines", "paragraphs"] | None,
        typer.Option(
            "--split",
            help="Batch items: lines (the default) or paragraphs.",
            rich_help_panel=_PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Batch mode: redo items already done.", rich_help_panel=_PANEL_OUTPUT),
    ] = False,
    engine: Annotated[
        Literal["local", "ray"],
        typer.Option(
            "--engine",
            help="Batch mode: local (this process) or ray (Ray Data workers, one per GPU; extra: ray).",
            rich_help_panel="Batch on Ray",
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray cluster to join (auto, or the head's HOST:6379). Default: $RAY_ADDRESS, else a new "
            "local Ray.",
            rich_help_panel="Batch on Ray",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Ray workers. Default: one per GPU in the cluster; without GPUs, one CPU worker.",
            rich_help_panel="Batch on Ray",
            show_default=False,
        ),
    ] = None,
    audio_format: Annotated[
        Literal["wav", "mp3", "flac", "opus", "pcm"] | None,
        typer.Option(
            "--format",
            help="wav, mp3 (64 kbit/s), flac, opus (Ogg) or pcm (raw 16-bit). Default: what -o's extension "
            "names, else wav.",
            rich_help_panel=_PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    subtype: Annotated[
        Literal["PCM_16", "FLOAT"],
        typer.Option(
            "--subtype",
            help="WAV sample format: 16-bit PCM or 32-bit float.",
            rich_help_panel=_PANEL_OUTPUT,
        ),
    ] = "PCM_16",
    voice: Annotated[
        str | None,
        typer.Option(
            "--voice",
            help="Reference clip (WAV/FLAC/...; prepared once, cached) or a saved .voice file. "
            "Default: the checkpoint's built-in voice.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    save_voice: Annotated[
        str | None,
        typer.Option(
            "--save-voice",
            help="Also write the prepared voice to this .voice file.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    exaggeration: Annotated[
        float | None,
        typer.Option(
            help="Emotion exaggeration. Default: 0.5 (neutral); Turbo has no such input.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    cfg_weight: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance weight (0 turns it off). Default: 0.5; Turbo has no guidance.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (0 = greedy).", rich_help_panel=_PANEL_VOICE)
    ] = 0.8,
    top_p: Annotated[
        float | None,
        typer.Option(
            help="Nucleus sampling mass. Default: 1.0; Turbo 0.95.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="Keep the k most likely speech tokens (0: all). Default: 0; Turbo 1000.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    min_p: Annotated[
        float | None,
        typer.Option(
            help="Drop tokens below this fraction of the top one. Default: 0.05; Turbo has no min-p.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    repetition_penalty: Annotated[
        float | None,
        typer.Option(
            help="Penalty for repeated speech tokens. Default: the model's (English and Turbo 1.2, "
            "multilingual 2.0).",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    language: Annotated[
        str | None,
        typer.Option(
            help="Language code (see `chatterbox languages`); other than en, the multilingual model speaks. "
            "Default: detected from the text (multilingual model) or English.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for reproducible audio (default: random).", rich_help_panel=_PANEL_VOICE),
    ] = None,
    flow_steps: Annotated[
        int | None,
        typer.Option(
            help="Flow-matching (Euler) steps of S3Gen. Default: 10; Turbo 2.",
            rich_help_panel=_PANEL_VOICE,
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int,
        typer.Option(help="Speech tokens per chunk at most (25 per second).", rich_help_panel=_PANEL_VOICE),
    ] = 1000,
    pause: Annotated[
        float, typer.Option(help="Seconds of silence between chunks.", rich_help_panel=_PANEL_VOICE)
    ] = 0.1,
    model: Annotated[str, typer.Option(help=_MODEL_HELP, rich_help_panel=_PANEL_MODEL)] = DEFAULT_MODEL,
    variant: Annotated[
        Literal["english", "multilingual", "turbo"] | None,
        typer.Option(
            help="Model variant. Default: what a local --model folder holds (or turbo for "
            "--model ResembleAI/chatterbox-turbo); multilingual with a --language other than en; else "
            "english.",
            rich_help_panel=_PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option(
            help="Hub revision (branch, tag or commit).", rich_help_panel=_PANEL_MODEL, show_default=False
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=_PANEL_MODEL)
    ] = "auto",
    preset: Annotated[
        str, typer.Option(help="auto, fp16, bnb-8bit or bnb-4bit.", rich_help_panel=_PANEL_MODEL)
    ] = "auto",
    plan: Annotated[
        str | None,
        typer.Option(
            help="Per-component overrides, e.g. t3=nf4,flow=int8.",
            rich_help_panel=_PANEL_MODEL,
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        str,
        typer.Option(
            help="Chunks decoded together: a number, or auto (as many as free GPU memory allows, up to 64).",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = "auto",
    no_fallback: Annotated[
        bool,
        typer.Option(
            "--no-fallback",
            help="On GPU out-of-memory exit 4 instead of stepping down.",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never download the checkpoint.", rich_help_panel=_PANEL_MODEL)
    ] = False,
    no_quant_cache: Annotated[
        bool,
        typer.Option(
            "--no-quant-cache",
            help="Quantize from the checkpoint; neither read nor write the quantized-weight cache.",
            rich_help_panel=_PANEL_MODEL,
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or warnings on stderr.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary on stdout at the end (schema in README).")
    ] = False,
) -> None:
    """Speak text into an audio file (WAV, MP3, FLAC, Opus), stdout, or one file per line/paragraph."""
    with json_errors(json_out):
        if json_out and output == "-":
            raise UsageError("--json and -o - both write to stdout; write the audio to a file instead")
        from chatterbox_cli.jobs import ItemsFailed, SynthesizeJob, run_synthesize
        from chatterbox_cli.pipeline import SynthesisSettings
        from chatterbox_cli.service import LoadRequest

        settings = SynthesisSettings(
            exaggeration=exaggeration,
            cfg_weight=cfg_weight,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            language=language,
            seed=seed,
            flow_steps=flow_steps,
            max_tokens=max_tokens,
            pause_seconds=pause,
        )
        request = LoadRequest(
            model=model,
            revision=revision,
            device=device,
            preset=preset,
            plan=plan,
            variant=variant,
            max_tokens=max_tokens,
            batch=_parse_batch(batch),
            cfg_weight=cfg_weight,
            allow_download=not offline,
            fallback=not no_fallback,
            quant_cache=not no_quant_cache,
        )
        job = SynthesizeJob(
            text=text,
            input_file=input_file,
            output=output,
            output_dir=output_dir,
            split=split,
            settings=settings,
            load=request,
            voice=voice,
            save_voice=save_voice,
            subtype=subtype,
            audio_format=audio_format,
            force=force,
            quiet=quiet,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
        )
        try:
            summary = run_synthesize(job)
        except ItemsFailed as e:  # the summary still says what was made and what failed
            if not json_out:
                raise
            emit_json({**e.summary, "error": str(e), "exit_code": int(e.exit_code)})
            raise typer.Exit(int(e.exit_code)) from None
    if json_out:
        emit_json(summary)


@app.command()
def estimate(
    model: ModelOption = DEFAULT_MODEL,
    variant: Annotated[
        Literal["english", "multilingual", "turbo"] | None,
        typer.Option(
            help="Model variant. Default: what a local --model folder holds (or turbo for "
            "--model ResembleAI/chatterbox-turbo), else english.",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOption = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Estimate one preset (fp16, bnb-8bit, awq, bnb-4bit, bnb-4bit-swap); default: all.",
            show_default=False,
        ),
    ] = None,
    all_presets: Annotated[bool, typer.Option("--all", help="Estimate every available preset.")] = False,
    plan: Annotated[
        str | None, typer.Option(help="Per-component overrides, e.g. t3=nf4,flow=int8.", show_default=False)
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Speech tokens per utterance.")] = 1000,
    batch: Annotated[int, typer.Option(help="Utterances decoded at once.")] = 1,
    cfg_weight: Annotated[
        float | None,
        typer.Option(
            help="Guidance weight (0: no unconditional row). Default: the model's (0.5; Turbo none).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="GPU to check the free memory of: auto, cuda or cuda:N.")
    ] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never download the checkpoint.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """GPU memory each preset needs (weights, KV cache, workspace, CUDA context) against free VRAM.

    Reads only the checkpoint's safetensors headers: nothing is loaded.
    """
    with json_errors(json_out):
        if preset is not None and all_presets:
            raise UsageError("give --preset P or --all, not both")
        from chatterbox_cli.reports import estimate_report
        from chatterbox_cli.service import LoadRequest

        request = LoadRequest(
            model=model,
            revision=revision,
            device=device,
            plan=plan,
            variant=variant,
            max_tokens=max_tokens,
            batch=batch,
            cfg_weight=cfg_weight,
            allow_download=not offline,
        )
        report = estimate_report(request, preset)
    if json_out:
        emit_json(report.to_dict())
    else:
        _print_estimate(report, rich=use_rich())


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _print_estimate(report: Any, rich: bool) -> None:
    rows = []
    for name, est in report.presets.items():
        comps = est.components
        fits = {True: "yes", False: "no", None: "-"}[est.fits]
        rows.append(
            (
                name,
                _size(comps["t3"].weights_bytes),
                _size(comps["s3gen"].weights_bytes) + ("" if comps["s3gen"].resident else " in turns"),
                _size(comps["voice_encoder"].weights_bytes),
                _size(est.kv_cache_bytes),
                _size(est.workspace_bytes),
                _size(est.cuda_context_bytes),
                _size(est.margin_bytes),
                _size(est.total_bytes),
                fits,
            )
        )
    header = (
        "preset",
        "T3",
        "S3Gen",
        "voice prep",
        "KV cache",
        "workspace",
        "CUDA ctx",
        "margin",
        "total",
        "fits",
    )
    notes = [f"{name}: {est.missing}" for name, est in report.presets.items() if est.missing]
    if report.free_bytes is None:
        verdict = "no NVIDIA GPU found: estimates only; synthesize would run on the CPU"
    else:
        verdict = report.reason or f"{vram.gib(report.free_bytes)} free"
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=verdict)
        for col in header:
            table.add_column(col, justify="left" if col == "preset" else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        for note in notes:
            Console().print(note)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        typer.echo("  ".join(cells))
    for note in notes:
        typer.echo(note)
    typer.echo(verdict)


# --------------------------------------------------------------------------------------------------
# quantize


@app.command()
def quantize(
    method: Annotated[
        Literal["awq"], typer.Option(help="awq: T3's backbone to 4 bits, calibrated once per checkpoint.")
    ] = "awq",
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Write a model folder (the checkpoint's files and t3_awq.safetensors) for --model. "
            "Default: the quantized-weight cache, which --preset awq reads.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    variant: VariantOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    force: Annotated[bool, typer.Option("--force", help="Calibrate again, even if weights exist.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Never download the checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """Quantize a checkpoint ahead of time: AWQ calibrates T3 once with the built-in voice on shipped texts
    and stores 4-bit weights in AutoAWQ's GEMM layout."""
    with json_errors(json_out):
        from chatterbox_cli.quant.awq_store import quantize_checkpoint
        from chatterbox_cli.service import LoadRequest

        request = LoadRequest(
            model=model, revision=revision, device=device, variant=variant, allow_download=not offline
        )
        notify = (lambda _: None) if quiet else (lambda message: typer.echo(message, err=True))
        result = quantize_checkpoint(request, output, force, notify)
    if json_out:
        emit_json(result)
    else:
        typer.echo(f"{result['path']} ({result['layers']} layers, {_size(int(result['bytes']))})")


# --------------------------------------------------------------------------------------------------
# eval


@app.command("eval")
def eval_command(
    preset: Annotated[
        str,
        typer.Option(
            help="Preset under test: fp16, bnb-8bit, awq, bnb-4bit, bnb-4bit-swap, fp32, or all.",
            show_default=False,
        ),
    ],
    against: Annotated[
        str | None,
        typer.Option(
            help="Reference precision: fp32 or a preset. Default: fp16 on a GPU, fp32 on the CPU.",
            show_default=False,
        ),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    variant: VariantOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    seed: Annotated[
        int, typer.Option(help="Seed of every text's sampling and noise, the same on both sides.")
    ] = 0,
    max_tokens: Annotated[int, typer.Option(help="Speech tokens per text at most.")] = 150,
    texts: Annotated[
        str | None,
        typer.Option(
            "--texts", help="UTF-8 file, one text per line. Default: a built-in set of 8.", show_default=False
        ),
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never download the checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """How far a preset's outputs are from a reference precision's, on the same texts, seeds and tokens:
    T3 teacher-forced KL and top-1 agreement, S3Gen mel L1 and waveform SNR, speaker-embedding cosine."""
    with json_errors(json_out):
        from chatterbox_cli.evaluate import evaluate, read_texts

        notify = (lambda _: None) if quiet else (lambda message: typer.echo(message, err=True))
        report = evaluate(
            model,
            preset,
            against,
            device,
            read_texts(texts) if texts is not None else None,
            seed,
            max_tokens,
            notify,
            variant=variant,
            revision=revision,
            allow_download=not offline,
        )
    if json_out:
        emit_json(report.to_dict())
    elif use_rich():
        from chatterbox_cli.evaluate import print_rich

        print_rich(report)
    else:
        from chatterbox_cli.evaluate import format_plain

        typer.echo(format_plain(report))


# --------------------------------------------------------------------------------------------------
# serve


@app.command()
def serve(
    model: ModelOption = DEFAULT_MODEL,
    variant: VariantOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    preset: Annotated[
        str, typer.Option(help="auto (the best that fits, stepping down on out-of-memory) or a preset.")
    ] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CHATTERBOX_API_KEY",
            help="Require Authorization: Bearer KEY on /v1 (also $CHATTERBOX_API_KEY).",
            show_default=False,
        ),
    ] = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="Let web pages from this origin (http://localhost:3000) call the API; repeat for more, "
            "* for any. Default: none.",
            show_default=False,
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            min=0, help="Chunks of concurrent requests decoded together; 0: as many as memory allows."
        ),
    ] = 0,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Speech tokens per chunk at most (25 per second).")
    ] = 1000,
    max_input_chars: Annotated[int, typer.Option(min=1, help="Longest `input` accepted.")] = 4096,
    max_concurrent: Annotated[
        int, typer.Option(min=1, help="Requests in flight at once; more get 429.")
    ] = 64,
    timeout: Annotated[
        float, typer.Option(min=0.001, max=86400.0, help="Seconds a request may take, queue included.")
    ] = 300.0,
    max_body: Annotated[int, typer.Option(min=1, help="Largest request body in bytes.")] = 65536,
    offline: Annotated[bool, typer.Option("--offline", help="Never download the checkpoint.")] = False,
) -> None:
    """An OpenAI-compatible speech server: POST /v1/audio/speech, GET /v1/models, GET /health.

    Needs the server extra: pip install 'chatterbox-cli\\[server]'.
    """
    from chatterbox_cli.server.limits import Limits
    from chatterbox_cli.server.run import serve as run_server
    from chatterbox_cli.service import LoadRequest

    request = LoadRequest(
        model=model,
        revision=revision,
        device=device,
        preset=preset,
        variant=variant,
        max_tokens=max_tokens,
        batch=max_batch,
        allow_download=not offline,
    )
    limits = Limits(max_input_chars, max_concurrent, timeout, max_body, max_tokens)
    run_server(
        request,
        limits,
        host=host,
        port=port,
        api_key=api_key,
        allow_origins=allow_origin or (),
        notify=lambda m: typer.echo(m, err=True),
    )


# --------------------------------------------------------------------------------------------------
# voices

voices_app = typer.Typer(
    help="The voice library: prepared voices kept under a name, for --voice NAME.", no_args_is_help=True
)
app.add_typer(voices_app, name="voices")


@voices_app.command("add")
def voices_add(
    name: Annotated[str, typer.Argument(help="The voice's name: letters, digits, - and _.")],
    clip: Annotated[str, typer.Argument(help="An audio clip of the voice (any format libsndfile reads).")],
    model: ModelOption = DEFAULT_MODEL,
    variant: Annotated[
        Literal["english", "multilingual", "turbo"] | None,
        typer.Option(help="Model variant that prepares it. Default: as for synthesize.", show_default=False),
    ] = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never download the checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a voice of that name.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Prepare a clip with the model, as `synthesize --voice clip` does, and keep it as NAME."""
    with json_errors(json_out):
        from chatterbox_cli.service import LoadRequest, add_library_voice

        request = LoadRequest(
            model=model, revision=revision, device=device, variant=variant, allow_download=not offline
        )
        notify = (lambda _: None) if json_out else (lambda message: typer.echo(message, err=True))
        path = add_library_voice(request, name, clip, force, notify)
    if json_out:
        emit_json({"schema_version": 1, "name": name, "path": str(path)})
    else:
        typer.echo(f"added {name}: {path}")


@voices_app.command("list")
def voices_list(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The library's voices, with the clip and the model variant each was prepared from."""
    from chatterbox_cli import voice_library

    found = voice_library.entries()
    if json_out:
        rows = [{"name": e.name, "path": str(e.path), **e.metadata} for e in found]
        emit_json({"schema_version": 1, "library": str(voice_library.library_dir()), "voices": rows})
        return
    if not found:
        typer.echo(
            f"no voices in {voice_library.library_dir()}; add one with `chatterbox voices add NAME clip.wav`"
        )
    for e in found:
        meta = e.metadata
        what = meta.get("problem") or f"from {meta.get('source_name', '?')} ({meta.get('variant', '?')})"
        typer.echo(f"{e.name}  {what}")


@voices_app.command("remove")
def voices_remove(
    name: Annotated[str, typer.Argument(help="The voice to remove.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Delete a voice from the library."""
    with json_errors(json_out):
        from chatterbox_cli import voice_library

        path = voice_library.remove(name)
    if json_out:
        emit_json({"schema_version": 1, "removed": name, "path": str(path)})
    else:
        typer.echo(f"removed {name}: {path}")


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") semantics
    return 1


def run(argv: Sequence[str] | None = None, typer_app: typer.Typer = app) -> int:
    """Run the CLI on `argv` and return its exit code; ChatterboxError becomes `error: <message>`."""
    try:
        typer_app(args=list(argv) if argv is not None else None, prog_name=PROG_NAME, standalone_mode=True)
    except SystemExit as e:
        return _exit_code(e.code)
    except ChatterboxError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    return 0


def main() -> NoReturn:
    sys.exit(run())
