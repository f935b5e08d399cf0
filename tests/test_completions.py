"""The committed completion scripts are what scripts/gen_completions.py makes, and they complete."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _gen_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_completions", REPO / "scripts" / "gen_completions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_scripts_are_up_to_date(tmp_path: Path) -> None:
    written = _gen_module().write(tmp_path)
    assert sorted(p.name for p in written) == ["chatterbox.bash", "chatterbox.fish", "chatterbox.zsh"]
    for path in written:
        committed = REPO / "completions" / path.name
        assert committed.is_file(), f"{committed} is missing; run python scripts/gen_completions.py"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale; run python scripts/gen_completions.py"
        )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_script_parses() -> None:
    subprocess.run(["bash", "-n", str(REPO / "completions" / "chatterbox.bash")], check=True)


def _complete(env_factory: Callable[..., dict[str, str]], shell: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "chatterbox_cli"],
        env=env_factory(_CHATTERBOX_COMPLETE=f"complete_{shell}", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_completion_protocol_answers(make_child_env: Callable[..., dict[str, str]]) -> None:
    # What the bash script asks when the user types `chatterbox pro<TAB>` and `chatterbox probe-vram --<TAB>`.
    assert _complete(make_child_env, "bash", COMP_WORDS="chatterbox pro", COMP_CWORD="1").split() == [
        "probe-vram"
    ]
    options = _complete(make_child_env, "bash", COMP_WORDS="chatterbox probe-vram --", COMP_CWORD="2").split()
    assert "--json" in options
    fish = _complete(
        make_child_env,
        "fish",
        _TYPER_COMPLETE_FISH_ACTION="get-args",
        _TYPER_COMPLETE_ARGS="chatterbox probe-vram --",
    )
    assert "--json\t" in fish
