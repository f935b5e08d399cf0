"""`chatterbox voices add|list|remove` and `synthesize --voice NAME` on a tiny random checkpoint: the library
keeps prepared voices by name, names cannot reach outside it, and errors say what to do."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chatterbox_cli.cli import run
from chatterbox_cli.errors import ExitCode

Cli = Callable[..., tuple[int, dict[str, object]]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`chatterbox ARGS --json` in-process, with the library and the voice cache in tmp_path."""
    monkeypatch.setenv("CHATTERBOX_VOICES", str(tmp_path / "library"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def call(*args: str) -> tuple[int, dict[str, object]]:
        capsys.readouterr()
        code = run([*args, "--json"])
        return code, json.loads(capsys.readouterr().out)

    return call


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    t = np.arange(24_000 * 4) / 24_000
    wav = 0.2 * np.sin(2 * np.pi * 160 * t) * (1 + 0.2 * np.random.default_rng(0).standard_normal(t.size))
    sf.write(tmp_path / "me.wav", wav.astype(np.float32), 24_000)
    return tmp_path / "me.wav"


def test_add_list_use_and_remove_a_voice(cli: Cli, tiny_checkpoint: str, clip: Path, tmp_path: Path) -> None:
    code, added = cli("voices", "add", "narrator", str(clip), "--model", tiny_checkpoint, "--device", "cpu")
    assert code == 0, added
    path = Path(str(added["path"]))
    assert path == tmp_path / "library" / "narrator.voice" and path.is_file()

    code, listed = cli("voices", "list")
    assert code == 0
    (entry,) = listed["voices"]  # type: ignore[misc]
    assert (entry["name"], entry["source_name"], entry["variant"]) == ("narrator", "me.wav", "english")

    out = tmp_path / "n.wav"
    code, summary = cli(
        "synthesize", "Hello there.", "-o", str(out), "--voice", "narrator", "--model", tiny_checkpoint,
        "--device", "cpu", "--max-tokens", "12", "--seed", "1",
    )  # fmt: skip
    assert code == 0, summary
    assert summary["voice"] == "narrator" and sf.info(str(out)).frames > 0

    code, again = cli("voices", "add", "narrator", str(clip), "--model", tiny_checkpoint, "--device", "cpu")
    assert code == ExitCode.USAGE and "--force" in str(again["error"])

    code, removed = cli("voices", "remove", "narrator")
    assert code == 0 and not path.exists()
    assert cli("voices", "list")[1]["voices"] == []


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", ".hidden", "", "x" * 65, "with space", "..", "voice.wav"]
)
def test_names_cannot_leave_the_library(cli: Cli, name: str, clip: Path, tmp_path: Path) -> None:
    code, out = cli("voices", "add", name, str(clip), "--model", "/nowhere", "--device", "cpu")
    assert code == ExitCode.USAGE and "is not a voice name" in str(out["error"])
    assert not (tmp_path / "escape.voice").exists() and not (tmp_path / "library").exists()


def test_a_missing_clip_or_a_folder_is_refused_before_any_model_loads(cli: Cli, tmp_path: Path) -> None:
    code, out = cli("voices", "add", "me", str(tmp_path / "none.wav"), "--model", "/nowhere")
    assert code == ExitCode.USAGE and "none.wav does not exist" in str(out["error"])
    code, out = cli("voices", "add", "me", str(tmp_path), "--model", "/nowhere")
    assert code == ExitCode.USAGE and f"{tmp_path} is a folder; give the path" in str(out["error"])


def test_unknown_voices_say_what_the_library_has(cli: Cli, tiny_checkpoint: str, tmp_path: Path) -> None:
    code, out = cli("voices", "remove", "ghost")
    assert (
        code == ExitCode.USAGE and "no voice 'ghost'" in str(out["error"]) and "none yet" in str(out["error"])
    )
    code, out = cli(
        "synthesize", "Hi.", "-o", str(tmp_path / "g.wav"), "--voice", "ghost", "--model", tiny_checkpoint,
        "--device", "cpu",
    )  # fmt: skip
    assert code == ExitCode.USAGE and "chatterbox voices add ghost" in str(out["error"])
