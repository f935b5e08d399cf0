"""The `chatterbox` command line. Commands only parse, call one function and print its answer."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, NoReturn

import typer

from chatterbox_cli import __version__, vram
from chatterbox_cli.errors import ChatterboxError, ExitCode

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
    """In `--json` mode turn a ChatterboxError into {"error": ..., "exit_code": ...} and that exit code."""
    try:
        yield
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


def _print_vram_rich(report: vram.VramReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.gpus:
        table = Table(
            title=f"NVIDIA driver {report.driver_version} · CUDA driver {report.cuda_driver_version}",
        )
        for col in ("GPU", "name", "compute cap.", "total", "used", "free"):
            table.add_column(col, justify="left" if col == "name" else "right", no_wrap=True)
        for g in report.gpus:
            table.add_row(
                str(g.index),
                g.name,
                f"{g.compute_capability[0]}.{g.compute_capability[1]}",
                vram.gib(g.total_bytes),
                vram.gib(g.used_bytes),
                f"[bold]{vram.gib(g.free_bytes)}[/bold]",
            )
        console.print(table)
    elif report.error is None:
        reason = f" ({report.no_gpu_reason})" if report.no_gpu_reason else ""
        console.print(f"[yellow]{vram.CPU_FALLBACK_NOTE}[/yellow]{reason}", highlight=False)
    style = "green" if report.bitsandbytes_available else "yellow"
    console.print(f"[{style}]{vram.bitsandbytes_line(report)}[/{style}]", highlight=False)


@app.command("probe-vram")
def probe_vram(
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (schema in README).")
    ] = False,
) -> None:
    """List NVIDIA GPUs with total/used/free memory, driver, compute capability, and bitsandbytes."""
    report = vram.probe()
    if json_out:
        emit_json(report.to_dict())
    elif use_rich():
        _print_vram_rich(report)
    else:
        typer.echo(vram.format_plain(report))
    if report.error is not None:
        if not json_out:
            typer.echo(f"error: {report.error}", err=True)
        raise typer.Exit(int(ExitCode.FAILED))


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
