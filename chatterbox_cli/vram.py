"""What NVIDIA GPUs this machine has and how much of their memory is free, read through NVML.

A machine without a GPU, without the NVIDIA driver or without libnvidia-ml is a normal answer: the
report lists no GPUs and says why in `no_gpu_reason`. Only NVML failing after it started (a lost GPU,
a driver fault) is an error; it is reported in `error` next to whatever was read before it failed.

GPU indices are NVML's (PCI bus order). CUDA numbers GPUs the same way only with
CUDA_DEVICE_ORDER=PCI_BUS_ID and no CUDA_VISIBLE_DEVICES; match on `uuid` when that matters.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from chatterbox_cli.bitsandbytes_quiet import import_bitsandbytes
from chatterbox_cli.errors import ChatterboxError

SCHEMA_VERSION = 1

CPU_FALLBACK_NOTE = "no NVIDIA GPU found; chatterbox will run on the CPU"


class VramProbeError(ChatterboxError):
    """NVML started but failed while answering a query."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]


@dataclass
class VramReport:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    # Why the list of GPUs is empty although nothing went wrong (no driver, no NVML library, ...).
    no_gpu_reason: str | None = None
    bitsandbytes_available: bool = False
    bitsandbytes_version: str | None = None
    bitsandbytes_error: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for g in d["gpus"]:
            g["compute_capability"] = list(g["compute_capability"])
        return {"schema_version": SCHEMA_VERSION, **d}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _load_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as e:
        raise VramProbeError(
            f"the NVML binding is not installed ({e}); install it with `pip install nvidia-ml-py`"
        ) from e
    return pynvml


# nvmlInit failures that mean "this machine has no usable NVIDIA GPU" rather than "NVML is broken".
_NO_GPU_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NoPermission")


def _no_gpu_errors(pynvml: ModuleType) -> tuple[type[BaseException], ...]:
    return tuple(getattr(pynvml, n) for n in _NO_GPU_ERRORS if hasattr(pynvml, n))


def _format_cuda_version(v: int) -> str:
    # NVML encodes CUDA 12.4 as 12040.
    return f"{v // 1000}.{(v % 1000) // 10}"


def _read_gpu(pynvml: ModuleType, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        total_bytes=int(mem.total),
        used_bytes=int(mem.used),
        free_bytes=int(mem.free),
        compute_capability=(int(major), int(minor)),
    )


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send anything written to stdout (Python or C level) to stderr, so `--json` output stays clean."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        saved = None  # no real fd 1 (e.g. captured output); the Python-level redirect still applies
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _check_bitsandbytes(report: VramReport) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        report.bitsandbytes_error = (
            "not installed; install it with `pip install 'chatterbox-cli[quant]'` for the bnb presets"
        )
        return
    try:
        with _stdout_to_stderr():
            bnb = import_bitsandbytes()
    except Exception as e:  # noqa: BLE001 - any import failure is the answer we report, with its text
        report.bitsandbytes_error = f"installed but fails to import: {type(e).__name__}: {e}"
        return
    report.bitsandbytes_available = True
    report.bitsandbytes_version = getattr(bnb, "__version__", None)


def probe(check_bitsandbytes: bool = True) -> VramReport:
    """Read every NVIDIA GPU through NVML. Never raises for NVML trouble: see `VramReport.error`."""
    report = VramReport()
    if check_bitsandbytes:
        _check_bitsandbytes(report)
    try:
        pynvml = _load_pynvml()
    except VramProbeError as e:
        report.error = str(e)
        return report

    try:
        pynvml.nvmlInit()
    except _no_gpu_errors(pynvml) as e:
        report.no_gpu_reason = f"NVML: {e}"
        return report
    except pynvml.NVMLError as e:
        report.error = f"NVML failed to start: {e}"
        return report

    step = "nvmlSystemGetDriverVersion"
    try:
        report.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        step = "nvmlSystemGetCudaDriverVersion"
        report.cuda_driver_version = _format_cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        step = "nvmlDeviceGetCount"
        count = int(pynvml.nvmlDeviceGetCount())
        for i in range(count):
            step = f"reading GPU {i}"
            report.gpus.append(_read_gpu(pynvml, i))
        if count == 0:
            report.no_gpu_reason = "NVML reports 0 GPUs"
    except pynvml.NVMLError as e:
        report.error = f"NVML failed while {step}: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as e:
            if report.error is None:
                report.error = f"NVML failed to shut down: {e}"
    return report


def free_bytes(device_index: int) -> int | None:
    """Free memory of NVML GPU `device_index` in bytes; None when there is no NVML, no GPU or no such index.

    Raises VramProbeError when NVML starts but fails while reading the GPU.
    """
    pynvml = _load_pynvml()
    try:
        pynvml.nvmlInit()
    except _no_gpu_errors(pynvml):
        return None
    except pynvml.NVMLError as e:
        raise VramProbeError(f"NVML failed to start: {e}") from e
    try:
        if not 0 <= device_index < int(pynvml.nvmlDeviceGetCount()):
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except pynvml.NVMLError as e:
        raise VramProbeError(f"NVML failed while reading GPU {device_index}: {e}") from e
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plain(report: VramReport, gpu_notes: Mapping[int, str] | None = None) -> str:
    """The report as plain lines of text (no colour), for pipes, logs and NO_COLOR; `gpu_notes` adds an
    indented line under the GPU of that NVML index."""
    lines: list[str] = []
    if report.gpus:
        lines.append(f"NVIDIA driver {report.driver_version}, CUDA driver {report.cuda_driver_version}")
        for g in report.gpus:
            cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
            lines.append(
                f"GPU {g.index}: {g.name}, compute capability {cc}, total {gib(g.total_bytes)}, "
                f"used {gib(g.used_bytes)}, free {gib(g.free_bytes)}"
            )
            if gpu_notes and g.index in gpu_notes:
                lines.append(f"  {gpu_notes[g.index]}")
    elif report.error is None:
        reason = f" ({report.no_gpu_reason})" if report.no_gpu_reason else ""
        lines.append(CPU_FALLBACK_NOTE + reason)
    lines.append(bitsandbytes_line(report))
    return "\n".join(lines)


def bitsandbytes_line(report: VramReport) -> str:
    if report.bitsandbytes_available:
        return f"bitsandbytes {report.bitsandbytes_version}: importable"
    return f"bitsandbytes: not available ({report.bitsandbytes_error})"
