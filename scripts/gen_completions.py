"""Write completions/chatterbox.{bash,zsh,fish} from the Typer app.

Run from the repository root: `python scripts/gen_completions.py [--out DIR]`. The scripts call back into
`chatterbox` (through _CHATTERBOX_COMPLETE) to list commands and options, so they only change when the
completion protocol or the program name changes; tests/test_completions.py checks they are up to date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

import typer.main

REPO = Path(__file__).resolve().parent.parent
SHELLS = ("bash", "zsh", "fish")


def _shell_completion_module() -> ModuleType:
    # Newer Typer releases vendor click as typer._click.
    try:
        from typer._click import shell_completion
    except ImportError:
        from click import shell_completion
    return shell_completion


def completion_scripts() -> dict[str, str]:
    """Shell name -> completion script text, made in-process from the app's click command."""
    sys.path.insert(0, str(REPO))
    from chatterbox_cli.cli import PROG_NAME, app

    # Building the command registers Typer's completion classes with click's registry.
    command = typer.main.get_command(app)
    complete_var = "_{}_COMPLETE".format(PROG_NAME.replace("-", "_").upper())
    shell_completion = _shell_completion_module()
    scripts = {}
    for shell in SHELLS:
        cls = shell_completion.get_completion_class(shell)
        if cls is None:
            raise RuntimeError(f"click has no completion class for {shell}")
        source = cls(command, {}, PROG_NAME, complete_var).source()
        scripts[shell] = source.strip() + "\n"
    return scripts


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, text in completion_scripts().items():
        path = out / f"chatterbox.{shell}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "completions", help="folder to write into")
    args = parser.parse_args()
    for path in write(args.out):
        print(path)


if __name__ == "__main__":
    main()
