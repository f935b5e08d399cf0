"""`chatterbox probe-vram` end to end: real subprocesses for the real machine, CliRunner with NVML faked."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pynvml
import pytest
from typer.testing import CliRunner

from chatterbox_cli import __version__
from chatterbox_cli.checkpoint import DEFAULT_REPO
from chatterbox_cli.cli import _print_vram_rich, app, run
from chatterbox_cli.reports import probe_report
from chatterbox_cli.service import LoadRequest

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
    "model",
    "would_pick_reason",
}
GPU_KEYS = {
    "index",
    "name",
    "uuid",
    "total_bytes",
    "used_bytes",
    "free_bytes",
    "compute_capability",
    "would_pick",
    "would_pick_reason",
}
GiB = 2**30
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


# --- the "would pick" column ------------------------------------------------------------------------


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, free: list[int]) -> None:
    """NVML (the world's edge) reporting one 80 GiB GPU per entry of `free`, with that many bytes free."""
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54.15")
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion", lambda: 12040)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(free))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: SimpleNamespace(i=i))
    monkeypatch.setattr(
        pynvml,
        "nvmlDeviceGetMemoryInfo",
        lambda h: SimpleNamespace(total=80 * GiB, used=80 * GiB - free[h.i], free=free[h.i]),
    )
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: (8, 6))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: f"Fake GPU {h.i}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: f"GPU-{h.i}")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _estimate_json(capsys: pytest.CaptureFixture[str], model: str, *args: str) -> dict:
    """`chatterbox estimate --json` on the CPU: the totals the picks below are set against."""
    code, out, _ = _cli(capsys, "estimate", "--model", model, "--device", "cpu", "--json", *args)
    assert code == 0, out
    return json.loads(out)


def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed by the environment; any download attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("probe-vram tried to download")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_gpus_with_different_free_memory_pick_different_presets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    totals = {k: v["total_bytes"] for k, v in _estimate_json(capsys, tiny_checkpoint)["presets"].items()}
    # (the tiny checkpoint's T3 Linears are too small to quantize, so bnb-4bit may equal bnb-8bit)
    assert totals["fp16"] > totals["bnb-8bit"] >= totals["bnb-4bit"] > totals["bnb-4bit-swap"]
    free = [totals["fp16"], totals["fp16"] - 1, totals["bnb-4bit-swap"] - 1]
    _fake_gpus(monkeypatch, free)
    _no_download(monkeypatch)
    code, out, err = _cli(capsys, "probe-vram", "--model", tiny_checkpoint, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == JSON_KEYS and doc["schema_version"] == 1
    assert doc["model"] == tiny_checkpoint and doc["would_pick_reason"] is None
    assert [set(g) for g in doc["gpus"]] == [GPU_KEYS] * 3
    assert [g["would_pick"] for g in doc["gpus"]] == ["fp16", "bnb-8bit", "fp32"]
    for gpu in doc["gpus"]:
        assert isinstance(gpu["would_pick"], str) and isinstance(gpu["would_pick_reason"], str)
    # The service's own wording, the same line `estimate` gives for that much free memory.
    for gpu in doc["gpus"][:2]:
        _fake_gpus(monkeypatch, [gpu["free_bytes"]])
        _, out, _ = _cli(capsys, "estimate", "--model", tiny_checkpoint, "--json")
        assert gpu["would_pick_reason"] == json.loads(out)["reason"]
        assert gpu["would_pick_reason"].endswith(f"→ {gpu['would_pick']}")
    assert doc["gpus"][2]["would_pick_reason"].endswith("→ CPU: running on the CPU")


def test_max_tokens_changes_the_pick(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    long = _estimate_json(capsys, tiny_checkpoint)["presets"]["fp16"]["total_bytes"]
    short = _estimate_json(capsys, tiny_checkpoint, "--max-tokens", "100")["presets"]["fp16"]["total_bytes"]
    assert short < long
    _fake_gpus(monkeypatch, [short])
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint, "--json")
    assert code == 0 and json.loads(out)["gpus"][0]["would_pick"] != "fp16"
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint, "--max-tokens", "100", "--json")
    assert code == 0 and json.loads(out)["gpus"][0]["would_pick"] == "fp16"
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint, "--max-tokens", "0", "--json")
    assert code == 2 and "--max-tokens" in json.loads(out)["error"]


def test_plain_and_rich_show_the_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    fp16 = _estimate_json(capsys, tiny_checkpoint)["presets"]["fp16"]["total_bytes"]
    _fake_gpus(monkeypatch, [fp16, 1])
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint)
    assert code == 0 and ANSI_ESCAPE not in out
    lines = out.splitlines()
    assert lines[1].startswith("GPU 0: Fake GPU 0") and lines[3].startswith("GPU 1: Fake GPU 1")
    assert lines[2].startswith("  would pick: fp16 (") and lines[2].endswith("→ fp16)")
    assert lines[4].startswith("  would pick: CPU (") and "running on the CPU" in lines[4]

    probe = probe_report(LoadRequest(model=tiny_checkpoint))
    capsys.readouterr()
    _print_vram_rich(probe)
    rich = capsys.readouterr().out
    header = next(line for line in rich.splitlines() if "would pick" in line)
    assert header.split("┃")[1:-1][-1].strip() == "would pick"  # the last column, at 80 columns too
    rows = [line.split("│")[1:-1] for line in rich.splitlines() if line.startswith("│")]
    assert [r[-1].strip() for r in rows if r[0].strip()] == ["fp16", "CPU"]
    assert f"GPU 0: {probe.picks[0][1]}" in rich and f"GPU 1: {probe.picks[1][1]}" in rich


def test_model_not_downloaded_is_a_normal_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    _no_download(monkeypatch)
    _fake_gpus(monkeypatch, [8 * GiB, 2 * GiB])
    code, out, err = _cli(capsys, "probe-vram", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == JSON_KEYS and doc["model"] == DEFAULT_REPO
    assert [(g["would_pick"], g["would_pick_reason"]) for g in doc["gpus"]] == [(None, None)] * 2
    assert doc["would_pick_reason"] == (
        f"{DEFAULT_REPO} is not downloaded yet; run `chatterbox synthesize` once, or pass --model FOLDER"
    )
    assert not (tmp_path / "hf").exists()  # nothing was written into the cache either
    code, out, _ = _cli(capsys, "probe-vram")
    assert code == 0
    assert out.count("  would pick: -\n") == 2
    assert f"would pick -: {DEFAULT_REPO} is not downloaded yet" in out


def test_model_in_the_hub_cache_is_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: str
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + DEFAULT_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in Path(tiny_checkpoint).iterdir():
        (snapshot / f.name).symlink_to(f)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _no_download(monkeypatch)
    _fake_gpus(monkeypatch, [80 * GiB])
    code, out, _ = _cli(capsys, "probe-vram", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["would_pick_reason"] is None
    assert doc["gpus"][0]["would_pick"] == "fp16"


def test_no_gpu_has_no_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_checkpoint: str
) -> None:
    _fake_gpus(monkeypatch, [])
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint, "--json")
    doc = json.loads(out)
    assert code == 0 and set(doc) == JSON_KEYS
    assert doc["gpus"] == [] and doc["no_gpu_reason"] == "NVML reports 0 GPUs"
    assert doc["model"] == tiny_checkpoint and doc["would_pick_reason"] is None
    code, out, _ = _cli(capsys, "probe-vram", "--model", tiny_checkpoint)
    assert code == 0 and "would pick" not in out and "no NVIDIA GPU found" in out


def test_invalid_local_checkpoint_exits_3_like_estimate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: str
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny_checkpoint).iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[: 1000 if f.name == "t3_cfg.safetensors" else None])
    _fake_gpus(monkeypatch, [8 * GiB])
    for model in (str(broken), str(tmp_path / "missing")):
        for command in ("probe-vram", "estimate"):
            code, out, _ = _cli(capsys, command, "--model", model, "--json")
            assert code == 3 and json.loads(out)["exit_code"] == 3, (command, model, out)
