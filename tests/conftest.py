"""Shared test set-up: no test reaches the network or the user's hub cache; `gpu` tests need CUDA."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable

import pytest

# Set before any test module imports huggingface_hub, which reads these once at import time.
_HF_HOME = tempfile.mkdtemp(prefix="chatterbox-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# The quantized-weight cache (chatterbox_cli/quant/cache.py) goes to a throwaway folder, never ~/.cache.
os.environ["CHATTERBOX_CACHE_DIR"] = os.path.join(_HF_HOME, "chatterbox-cache")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**overrides: str) -> dict[str, str]:
    """Environment for a child `python` that imports this checkout, with overrides (empty string = unset)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    for key, value in overrides.items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture
def make_child_env() -> Callable[..., dict[str, str]]:
    return child_env


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random checkpoint folder in the official layout (written once per test session)."""
    from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

    return str(write_random_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), "tiny", seed=0))


# Options that make `synthesize` fast on the tiny checkpoint (CPU, short chunks, two flow steps)
FAST = ("--device", "cpu", "--max-tokens", "20", "--flow-steps", "2")


@pytest.fixture
def synth(tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `chatterbox synthesize ARGS` in-process on the tiny checkpoint; (exit code, stdout, stderr)."""
    from chatterbox_cli.cli import run

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(["synthesize", *args, "--model", tiny_checkpoint, *FAST])
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def synth_json(synth: Callable[..., tuple[int, str, str]]) -> Callable[..., tuple[int, dict, str]]:
    """As `synth`, with --json: (exit code, the JSON summary, stderr)."""
    import json

    def call(*args: str) -> tuple[int, dict, str]:
        code, out, err = synth(*args, "--json")
        return code, json.loads(out), err

    return call
