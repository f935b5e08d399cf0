"""Exit codes: one table in errors.py, the same in README, and what `run()` turns errors into."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer

from chatterbox_cli.checkpoint import resolve_checkpoint
from chatterbox_cli.cli import json_errors, run
from chatterbox_cli.errors import ExitCode

README = Path(__file__).resolve().parent.parent / "README.md"


def test_codes_are_the_documented_ones() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "FAILED": 1,
        "USAGE": 2,
        "MODEL_NOT_FOUND": 3,
        "OUT_OF_MEMORY": 4,
        "INTERRUPTED": 130,
    }


def test_readme_lists_every_code() -> None:
    rows = re.findall(r"^\|\s*`?(\d+)`?\s*\|", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert sorted(int(r) for r in rows) == sorted(int(c) for c in ExitCode)


def _app_resolving(model: str) -> typer.Typer:
    """A two-command app that resolves a checkpoint the way the real commands do."""
    test_app = typer.Typer()

    @test_app.command()
    def load(json_out: bool = typer.Option(False, "--json")) -> None:
        with json_errors(json_out):
            resolve_checkpoint(model, allow_download=False)

    @test_app.command()
    def interrupt() -> None:
        raise KeyboardInterrupt

    return test_app


def test_checkpoint_error_exits_3_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    assert run(["load"], _app_resolving(str(missing))) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: --model {missing}: {missing} does not exist.")
    assert "Traceback" not in err


def test_checkpoint_error_in_json_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    assert run(["load", "--json"], _app_resolving(str(missing))) == 3
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["exit_code"] == 3 and doc["error"].startswith(f"--model {missing}:")
    assert err == ""


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["interrupt"], _app_resolving(".")) == 130


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["probe-vram", "--no-such-option"]) == 2
    assert run(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_subprocess_exit_codes(make_child_env: Callable[..., dict[str, str]]) -> None:
    env = make_child_env()
    bad = subprocess.run(
        [sys.executable, "-m", "chatterbox_cli", "probe-vram", "--bogus"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    help_ = subprocess.run(
        [sys.executable, "-m", "chatterbox_cli", "--help"], env=env, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "probe-vram" in help_.stdout
