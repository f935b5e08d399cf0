"""probe() and free_bytes() against NVML; NVML is faked only by replacing functions of the pynvml module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from chatterbox_cli import vram

GIB = 2**30


class FakeNvml:
    """Two GPUs as NVML would describe them; `fail` makes one call raise an NVML error."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n_gpus: int = 2) -> None:
        self.n_gpus = n_gpus
        self.initialised = 0
        self.shutdowns = 0
        self.fail: dict[tuple[str, int | None], int] = {}
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlSystemGetDriverVersion",
            "nvmlSystemGetCudaDriverVersion",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetCudaComputeCapability",
            "nvmlDeviceGetName",
            "nvmlDeviceGetUUID",
        ):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _maybe_fail(self, call: str, index: int | None = None) -> None:
        code = self.fail.get((call, index))
        if code is not None:
            raise pynvml.NVMLError(code)

    def nvmlInit(self) -> None:
        self._maybe_fail("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return self.n_gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> SimpleNamespace:
        if not 0 <= i < self.n_gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(i=i)

    def nvmlDeviceGetMemoryInfo(self, h: SimpleNamespace) -> SimpleNamespace:
        self._maybe_fail("nvmlDeviceGetMemoryInfo", h.i)
        total = (80 if h.i == 0 else 4) * GIB
        used = (h.i + 1) * GIB // 2
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetCudaComputeCapability(self, h: SimpleNamespace) -> tuple[int, int]:
        return (9, 0) if h.i == 0 else (7, 5)

    def nvmlDeviceGetName(self, h: SimpleNamespace) -> str | bytes:
        # Older bindings return bytes; both must come out as str.
        return "NVIDIA H100 80GB HBM3" if h.i == 0 else b"NVIDIA GeForce GTX 1650"

    def nvmlDeviceGetUUID(self, h: SimpleNamespace) -> str:
        return f"GPU-0000000{h.i}-aaaa-bbbb-cccc-dddddddddddd"


def test_probe_on_this_machine_is_a_normal_answer() -> None:
    report = vram.probe()
    assert report.error is None, report.error
    if not report.gpus:
        assert report.no_gpu_reason
        assert vram.CPU_FALLBACK_NOTE in vram.format_plain(report)


def test_probe_reads_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    report = vram.probe(check_bitsandbytes=False)
    assert report.error is None
    assert report.driver_version == "550.54.15"
    assert report.cuda_driver_version == "12.4"
    assert [g.index for g in report.gpus] == [0, 1]
    h100, gtx = report.gpus
    assert h100.name == "NVIDIA H100 80GB HBM3" and gtx.name == "NVIDIA GeForce GTX 1650"
    assert h100.compute_capability == (9, 0) and gtx.compute_capability == (7, 5)
    assert (
        h100.total_bytes == 80 * GIB
        and h100.used_bytes == GIB // 2
        and h100.free_bytes == 80 * GIB - GIB // 2
    )
    assert gtx.free_bytes == 3 * GIB
    assert fake.initialised == 1 and fake.shutdowns == 1
    text = vram.format_plain(report)
    assert "GPU 1: NVIDIA GeForce GTX 1650, compute capability 7.5, total 4.00 GiB" in text
    assert vram.CPU_FALLBACK_NOTE not in text


def test_json_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(monkeypatch, n_gpus=1)
    d = json.loads(vram.probe().to_json())
    assert set(d) == {
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
    assert d["schema_version"] == 1
    assert d["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
            "total_bytes": 80 * GIB,
            "used_bytes": GIB // 2,
            "free_bytes": 80 * GIB - GIB // 2,
            "compute_capability": [9, 0],
        }
    ]


@pytest.mark.parametrize(
    "code",
    [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED],
    ids=["no-lib", "no-driver"],
)
def test_no_nvml_or_driver_is_not_an_error(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    fake = FakeNvml(monkeypatch)
    fake.fail[("nvmlInit", None)] = code
    report = vram.probe(check_bitsandbytes=False)
    assert report.error is None
    assert report.gpus == []
    assert report.no_gpu_reason == f"NVML: {pynvml.NVMLError(code)}"
    assert vram.format_plain(report).startswith(vram.CPU_FALLBACK_NOTE)


def test_zero_gpus_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(monkeypatch, n_gpus=0)
    report = vram.probe(check_bitsandbytes=False)
    assert report.error is None and report.gpus == []
    assert report.no_gpu_reason == "NVML reports 0 GPUs"


def test_nvml_failing_to_start_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    fake.fail[("nvmlInit", None)] = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    report = vram.probe(check_bitsandbytes=False)
    assert (
        report.error == f"NVML failed to start: {pynvml.NVMLError(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)}"
    )
    assert report.gpus == []


def test_nvml_raising_mid_query_keeps_what_was_read(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    fake.fail[("nvmlDeviceGetMemoryInfo", 1)] = pynvml.NVML_ERROR_GPU_IS_LOST
    report = vram.probe(check_bitsandbytes=False)
    assert report.error == "NVML failed while reading GPU 1: GPU is lost"
    assert [g.index for g in report.gpus] == [0]
    assert fake.shutdowns == 1  # NVML is shut down even after a failure
    assert json.loads(report.to_json())["error"] == report.error


def test_free_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    assert vram.free_bytes(0) == 80 * GIB - GIB // 2
    assert vram.free_bytes(1) == 3 * GIB
    assert vram.free_bytes(2) is None
    assert vram.free_bytes(-1) is None
    assert fake.shutdowns == fake.initialised == 4


def test_free_bytes_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    fake.fail[("nvmlInit", None)] = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    assert vram.free_bytes(0) is None


def test_free_bytes_raises_when_nvml_fails_mid_query(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch)
    fake.fail[("nvmlDeviceGetMemoryInfo", 0)] = pynvml.NVML_ERROR_UNKNOWN
    with pytest.raises(vram.VramProbeError, match="NVML failed while reading GPU 0") as info:
        vram.free_bytes(0)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    assert fake.shutdowns == 1


def test_bitsandbytes_importable_here() -> None:
    pytest.importorskip("bitsandbytes")
    report = vram.probe()
    assert report.bitsandbytes_available
    assert report.bitsandbytes_version and report.bitsandbytes_error is None


def test_bitsandbytes_import_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A package that fails at import time, found ahead of any installed bitsandbytes.
    pkg = tmp_path / "bitsandbytes"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('CUDA Setup failed despite GPU being available')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    report = vram.probe()
    assert not report.bitsandbytes_available
    assert report.bitsandbytes_error == (
        "installed but fails to import: RuntimeError: CUDA Setup failed despite GPU being available"
    )
    assert "bitsandbytes: not available (installed but fails to import" in vram.format_plain(report)
