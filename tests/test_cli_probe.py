"""`chatterbox probe-vram` end to end: real subprocesses for the real machine, CliRunner with NVML faked."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable

import pynvml
import pytest
from typer.testing import CliRunner

from chatterbox_cli import __version__
from chatterbox_cli.cli import app, run

JSON_KEYS = {
    "schema_version",
    "gpus",
    "driver_version",
    "cuda_driver_version",
    "no_gpu_reason",
    "bitsandbytes_available",
    "bitsandbytes_version",
    "bitsandbytes_error",
    "error",
}
ANSI_ESCAPE = "\x1b["

EnvFactory = Callable[..., dict[str, str]]


def chatterbox(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatterbox_cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_json_is_one_object_on_stdout(make_child_env: EnvFactory) -> None:
    proc = chatterbox(make_child_env(), "probe-vram", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout is exactly one JSON document
    assert set(report) == JSON_KEYS
    assert report["error"] is None
    if not report["gpus"]:
        assert report["no_gpu_reason"]


def test_plain_text_when_piped(make_child_env: EnvFactory) -> None:
    proc = chatterbox(make_child_env(NO_COLOR=""), "probe-vram")
    assert proc.returncode == 0, proc.stderr
    assert ANSI_ESCAPE not in proc.stdout
    assert "bitsandbytes" in proc.stdout
    assert ("no NVIDIA GPU found; chatterbox will run on the CPU" in proc.stdout) or ("GPU 0:" in proc.stdout)


def _run_on_tty(env: dict[str, str], *args: str) -> tuple[int, str]:
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatterbox_cli", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=child_fd,
        stderr=subprocess.DEVNULL,
    )
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    return proc.wait(timeout=120), b"".join(chunks).decode()


def test_rich_on_a_terminal_plain_with_no_color(make_child_env: EnvFactory) -> None:
    rc, coloured = _run_on_tty(make_child_env(NO_COLOR="", TERM="xterm-256color"), "probe-vram")
    assert rc == 0
    assert ANSI_ESCAPE in coloured
    rc, plain = _run_on_tty(make_child_env(NO_COLOR="1", TERM="xterm-256color"), "probe-vram")
    assert rc == 0
    assert ANSI_ESCAPE not in plain and "bitsandbytes" in plain


def _nvml_lost_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU whose memory query fails as when the GPU falls off the bus."""

    def lost(handle: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54.15")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 12040)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: object())
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lost)


def test_json_with_failing_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    _nvml_lost_gpu(monkeypatch)
    result = CliRunner().invoke(app, ["probe-vram", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert set(report) == JSON_KEYS
    assert report["error"] == "NVML failed while reading GPU 0: GPU is lost"
    assert report["driver_version"] == "550.54.15" and report["gpus"] == []
    assert "error:" not in result.stdout.replace('"error":', "")


def test_plain_with_failing_probe(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _nvml_lost_gpu(monkeypatch)
    assert run(["probe-vram"]) == 1
    out, err = capsys.readouterr()
    assert "error: NVML failed while reading GPU 0: GPU is lost" in err
    assert "no NVIDIA GPU found" not in out  # a failed probe is not reported as "no GPU"
    assert "bitsandbytes" in out


def test_probe_with_fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _nvml_lost_gpu(monkeypatch)
    monkeypatch.setattr(
        pynvml,
        "nvmlDeviceGetMemoryInfo",
        lambda h: type("Mem", (), {"total": 4 * 2**30, "used": 2**30, "free": 3 * 2**30})(),
    )
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: (8, 6))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA GeForce RTX 3050")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: "GPU-1")
    result = CliRunner().invoke(app, ["probe-vram"])
    assert result.exit_code == 0, result.output
    assert "GPU 0: NVIDIA GeForce RTX 3050, compute capability 8.6, total 4.00 GiB" in result.stdout
    assert "used 1.00 GiB, free 3.00 GiB" in result.stdout
    assert "NVIDIA driver 550.54.15, CUDA driver 12.4" in result.stdout


def test_version(make_child_env: EnvFactory) -> None:
    proc = chatterbox(make_child_env(), "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"chatterbox-cli {__version__}"
