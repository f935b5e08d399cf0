"""The `chatterbox estimate` and `chatterbox probe-vram` jobs: what each preset needs and what the service
would pick, from checkpoint headers and NVML only (no weights are read)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from chatterbox_cli.errors import UsageError

if TYPE_CHECKING:
    from chatterbox_cli.estimate import EstimateReport
    from chatterbox_cli.service import LoadRequest
    from chatterbox_cli.vram import VramReport


# --------------------------------------------------------------------------------------------------
# estimate


def _nvml_index(device: str) -> int | None:
    """The GPU whose free memory `--device` means; None for the CPU."""
    if device == "cpu":
        return None
    if device in ("auto", "cuda"):
        return 0
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    return int(index)


def estimate_report(request: LoadRequest, preset: str | None) -> EstimateReport:
    """`chatterbox estimate`: resolve the checkpoint (headers only), read NVML's free memory, estimate
    `preset` (None: every available preset) and say which preset `--preset auto` would pick."""
    from chatterbox_cli import estimate, presets, service, vram
    from chatterbox_cli.quant.plan import parse_plan_spec

    overrides = parse_plan_spec(request.plan) if request.plan else None
    if preset is not None:
        presets.get_preset(preset)  # unknown or unavailable presets are usage errors
    checkpoint = service.resolve(request)
    index = _nvml_index(request.device)
    free = None if index is None else vram.free_bytes(index)
    return estimate.estimate(
        checkpoint.folder,
        preset or "all",
        max_tokens=request.max_tokens,
        batch=request.batch,
        cfg_weight=service.cfg_weight(request, checkpoint.variant),
        free_bytes=free,
        overrides=overrides,
        variant=checkpoint.variant,
    )


# --------------------------------------------------------------------------------------------------
# probe-vram


@dataclass
class ProbeReport:
    """`chatterbox probe-vram`: NVML's answer plus what `--preset auto` would pick on each GPU."""

    vram: VramReport
    model: str
    picks: dict[int, tuple[str, str]]  # NVML index -> (preset, reason); "fp32" means the CPU
    would_pick_reason: str | None = None  # why `picks` is empty although GPUs may be listed

    def to_dict(self) -> dict[str, object]:
        doc = self.vram.to_dict()
        for gpu in doc["gpus"]:
            gpu["would_pick"], gpu["would_pick_reason"] = self.picks.get(gpu["index"], (None, None))
        doc["model"] = self.model
        doc["would_pick_reason"] = self.would_pick_reason
        return doc


def probe_report(request: LoadRequest) -> ProbeReport:
    """`chatterbox probe-vram`: every GPU NVML reports and, from its free memory, what `--preset auto`
    would pick there (the service's own choice). Never downloads: a hub model that is not in the cache
    gives no picks and says why; an invalid local checkpoint is a CheckpointError as in `estimate`."""
    from chatterbox_cli import service, vram
    from chatterbox_cli.checkpoint import DEFAULT_REPO, NotDownloadedError

    if request.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {request.max_tokens}")
    report = vram.probe()
    request = replace(request, allow_download=False)
    try:
        checkpoint = service.resolve(request)
    except NotDownloadedError:
        flag = "" if request.model == DEFAULT_REPO else f" --model {request.model}"
        why = (
            f"{request.model} is not downloaded yet; run `chatterbox synthesize{flag}` once, "
            "or pass --model FOLDER"
        )
        return ProbeReport(report, request.model, {}, why)
    picks = {}
    for gpu in report.gpus:
        preset, reason, _ = service.auto_pick(request, checkpoint, gpu.free_bytes)
        picks[gpu.index] = (preset, reason)
    return ProbeReport(report, request.model, picks)
