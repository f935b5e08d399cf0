"""Every README example marked `<!-- readme-test: creates FILE... -->` runs, on the tiny checkpoint.

The block runs in bash with `chatterbox` defined as this checkout's CLI plus `--model <tiny checkpoint>`
and fast settings after the subcommand; the files the marker names must exist afterwards (WAVs readable).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile as sf

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = re.compile(r"<!-- readme-test: creates ([^>]*?) -->\s*```sh\n(.*?)```", re.DOTALL)
EXAMPLES = [(m[1].split(), m[2]) for m in EXAMPLE.finditer(README.read_text(encoding="utf-8"))]


def test_readme_has_the_three_kinds_of_example() -> None:
    scripts = [script for _, script in EXAMPLES]
    assert len(scripts) == 3
    assert re.search(r"chatterbox synthesize \"[^\"]+\" -o \S+\.wav", scripts[0])  # one-off
    assert "| chatterbox synthesize - -o - >" in scripts[1]  # stdin to stdout
    assert "--output-dir" in scripts[2] and "--split lines" in scripts[2]  # batch


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(("creates", "script"), EXAMPLES, ids=["one-off", "stdin-stdout", "batch"])
def test_readme_example_runs(
    creates: list[str],
    script: str,
    tiny_checkpoint: str,
    tmp_path: Path,
    make_child_env: Callable[..., dict[str, str]],
) -> None:
    wrapper = (
        "set -euo pipefail\n"
        f'chatterbox() {{ {shlex.quote(sys.executable)} -m chatterbox_cli "$1" '
        f'--model {shlex.quote(tiny_checkpoint)} --device cpu --max-tokens 20 --flow-steps 2 "${{@:2}}"; }}\n'
    )
    proc = subprocess.run(
        ["bash", "-c", wrapper + script],
        cwd=tmp_path,
        env=make_child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in creates:
        path = tmp_path / name
        assert path.is_file(), f"{name} was not created"
        if path.suffix == ".wav":
            info = sf.info(str(path))
            assert info.samplerate == 24_000 and info.frames > 0
    manifests = [tmp_path / n for n in creates if n.endswith("manifest.jsonl")]
    for manifest in manifests:  # the second run of the batch example redid nothing
        assert len(manifest.read_text().splitlines()) == 2
