"""`chatterbox estimate` on a tiny random checkpoint: JSON schema, table, verdict (NVML faked)."""

from __future__ import annotations

import json
import types
from collections.abc import Callable

import pynvml
import pytest

from chatterbox_cli import estimate as est
from chatterbox_cli.cli import run

GiB = 1024**3
PRESET_KEYS = {
    "components",
    "kv_cache_bytes",
    "workspace_bytes",
    "cuda_context_bytes",
    "margin_bytes",
    "total_bytes",
    "fits",
    "missing",
    "details",
}


@pytest.fixture
def estimate_cli(
    tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(["estimate", "--model", tiny_checkpoint, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """NVML (the world's edge) reporting one GPU with `free` bytes free."""
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: object())
    monkeypatch.setattr(
        pynvml, "nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(total=8 * GiB, used=0, free=free)
    )


def test_json_schema_without_a_gpu(
    estimate_cli: Callable[..., tuple[int, str, str]], tiny_checkpoint: str
) -> None:
    code, out, err = estimate_cli("--json", "--device", "cpu")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert set(doc) == {"free_bytes", "presets", "chosen", "reason"}
    assert doc["free_bytes"] is None and doc["chosen"] is None
    assert set(doc["presets"]) == {"fp16", "bnb-8bit", "awq", "bnb-4bit", "bnb-4bit-swap"}
    for preset in doc["presets"].values():
        assert set(preset) == PRESET_KEYS and preset["fits"] is None
        assert set(preset["components"]) == {"t3", "s3gen", "voice_encoder"}
        for comp in preset["components"].values():
            assert isinstance(comp["weights_bytes"], int) and comp["weights_bytes"] > 0
        assert isinstance(preset["total_bytes"], int)
    # the same numbers as the library call: the command adds nothing of its own
    assert doc == est.estimate(tiny_checkpoint, "all", free_bytes=None).to_dict()


def test_one_preset_and_options(estimate_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, _ = estimate_cli("--json", "--device", "cpu", "--preset", "bnb-4bit", "--max-tokens", "500")
    assert code == 0
    doc = json.loads(out)
    assert list(doc["presets"]) == ["bnb-4bit"]
    short = doc["presets"]["bnb-4bit"]["kv_cache_bytes"]
    _, out, _ = estimate_cli("--json", "--device", "cpu", "--preset", "bnb-4bit", "--max-tokens", "1000")
    assert json.loads(out)["presets"]["bnb-4bit"]["kv_cache_bytes"] > short
    _, out, _ = estimate_cli("--json", "--device", "cpu", "--all", "--cfg-weight", "0", "--batch", "2")
    assert json.loads(out)["presets"]["fp16"]["details"]["cfg"] is False


def test_verdict_against_free_memory(
    estimate_cli: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: str
) -> None:
    totals = {k: v.total_bytes for k, v in est.estimate(tiny_checkpoint, "all").presets.items()}
    _fake_gpu(monkeypatch, totals["fp16"] - 1)
    code, out, _ = estimate_cli("--json")
    doc = json.loads(out)
    assert doc["free_bytes"] == totals["fp16"] - 1 and doc["chosen"] == "bnb-8bit"
    assert doc["presets"]["fp16"]["fits"] is False and doc["presets"]["bnb-8bit"]["fits"] is True
    code, out, _ = estimate_cli()
    assert code == 0 and "bnb-8bit" in out.splitlines()[-1] and "→ bnb-8bit" in out


def test_plain_table(estimate_cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, _ = estimate_cli("--device", "cpu")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["preset", "T3", "S3Gen"]
    assert [line.split()[0] for line in lines[1:5]] == ["fp16", "bnb-8bit", "awq", "bnb-4bit"]
    assert "awq: no AWQ weights yet (chatterbox quantize --method awq)" in lines
    assert "no NVIDIA GPU found" in lines[-1] and "\x1b[" not in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--preset", "fp16", "--all"), 2, "not both"),
        (("--preset", "fp8"), 2, "unknown preset"),
        (("--plan", "t3=nf5"), 2, "unknown mode"),
        (("--device", "tpu"), 2, "not a device"),
        (("--batch", "0"), 2, "batch must be a finite number >= 1, got 0"),
        (("--cfg-weight", "inf"), 2, "cfg_weight must be a finite number >= 0, got inf"),
    ],
)
def test_bad_options(
    estimate_cli: Callable[..., tuple[int, str, str]], args: tuple[str, ...], code: int, message: str
) -> None:
    got, out, _ = estimate_cli(*args, "--json")
    doc = json.loads(out)
    assert got == code == doc["exit_code"] and message in doc["error"]


def test_missing_checkpoint_exits_3(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert run(["estimate", "--model", str(tmp_path / "none"), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["exit_code"] == 3
