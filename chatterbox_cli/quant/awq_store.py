"""Where a checkpoint's AWQ weights come from, and how they get into T3.

AWQ needs one calibration run per checkpoint (quant/awq.py). Its result is looked for, in this order: the
model folder's `t3_awq.safetensors` (written by `chatterbox quantize --method awq -o DIR` beside the
checkpoint's own files), then the quantized-weight cache (keyed by the T3 file and the AWQ settings). When
neither has it, `--preset awq` calibrates now and writes the cache entry (`ensure`); `--preset auto`
considers AWQ only where the weights exist already (`find`), so it never starts a calibration by itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from chatterbox_cli.checkpoint import Checkpoint, safetensors_header
from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.quant import awq
from chatterbox_cli.quant.bnb import QuantReport
from chatterbox_cli.quant.cache import checkpoint_identity, quantized_dir

if TYPE_CHECKING:
    from chatterbox_cli.service import LoadRequest

Notify = Callable[[str], None]

AWQ_FILE = "t3_awq.safetensors"
CALIBRATION_TOKENS = 150  # speech tokens decoded per calibration text (6 s of speech)
CALIBRATION_VERSION = "1"  # changes whenever the calibration run does: old cache entries are not reused


def t3_linears(header: dict) -> dict[str, tuple[int, int]]:
    """The T3 backbone Linears AWQ quantizes, with their (out, in) shapes as loaded (the presets' T3 plan
    applied to the header)."""
    from chatterbox_cli.estimate import t3_as_loaded
    from chatterbox_cli.quant.plan import component_plan, linear_shapes_from_header, which_linears

    shapes = linear_shapes_from_header(t3_as_loaded(header))
    return {name: shapes[name] for name in which_linears(component_plan("t3", "awq"), shapes)}


def config_for(t3_file: Path) -> awq.AwqConfig:
    """AWQ settings for this T3: group 128, or the largest smaller group the widths allow (tiny models)."""
    widths = [in_f for _, in_f in t3_linears(safetensors_header(t3_file)).values()]
    return awq.AwqConfig(group_size=awq.group_size_for(widths))


def cache_path(t3_file: Path) -> Path:
    texts = "\n".join(awq.calibration_texts())
    fields = {
        "format": [awq.FORMAT, awq.FORMAT_VERSION],
        "checkpoint": checkpoint_identity(t3_file),
        "quantization": config_for(t3_file).quantization_config(),
        "calibration": [CALIBRATION_VERSION, CALIBRATION_TOKENS, hashlib.sha256(texts.encode()).hexdigest()],
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return quantized_dir() / f"t3-awq-{digest}.safetensors"


def find(folder: Path, t3_file: Path) -> Path | None:
    """The AWQ weights of a checkpoint folder's T3, if they exist (the folder first, then the cache)."""
    beside = folder / AWQ_FILE
    if beside.is_file():
        return beside
    cached = cache_path(t3_file)
    return cached if cached.is_file() else None


def calibration_device(device: torch.device, t3_file: Path) -> torch.device:
    """Calibrate on `device` when it has room for float32 T3 and its activations, else on the CPU."""
    if device.type != "cuda":
        return device
    header = safetensors_header(t3_file)
    needed = int(1.5 * sum(info.numel * 4 for info in header.values())) + 2**29
    free, _ = torch.cuda.mem_get_info(device)
    return device if free >= needed else torch.device("cpu")


def calibrate(checkpoint: Checkpoint, out: Path, device: torch.device, notify: Notify) -> Path:
    """Calibrate T3 (float32, unfused, on `device`) with the built-in voice over the shipped texts, search
    and fold the scales, quantize and write the AWQ file `out`."""
    from chatterbox_cli.models.conds import load_builtin_conds
    from chatterbox_cli.models.loading import load_t3
    from chatterbox_cli.models.tokenizer import open_tokenizer
    from chatterbox_cli.pipeline import text_tokens

    t3_file = checkpoint.file("t3")
    config = config_for(t3_file)
    conds_file = checkpoint.file("conds")
    if not conds_file.is_file():
        raise CheckpointError(f"AWQ calibration speaks with the built-in voice, but {conds_file} is missing")
    start = time.perf_counter()
    t3 = load_t3(t3_file, device, torch.float32)
    t3.drop_text_head()
    cond = load_builtin_conds(conds_file).t3.to(device)
    tokenizer = open_tokenizer(checkpoint.variant.tokenizer, checkpoint.file("tokenizer")).for_language("en")
    texts = [text_tokens(tokenizer, text, i, t3.config)[0] for i, text in enumerate(awq.calibration_texts())]
    guided = "cfg_weight" not in checkpoint.variant.generation.ignored
    run = awq.t3_calibration_run(t3, cond, texts, max_new_tokens=CALIBRATION_TOKENS, cfg=guided)
    calibration = awq.calibrate(t3, awq.t3_scale_groups(t3), run, config)
    packed = awq.quantize_t3(t3, calibration, config)
    metadata = {
        "source": t3_file.name,
        "source_bytes": str(t3_file.stat().st_size),
        "calibration": f"v{CALIBRATION_VERSION}: {len(texts)} texts, built-in voice, "
        f"{CALIBRATION_TOKENS} speech tokens each, {device.type}",
    }
    # cache entries of several checkpoints share a folder: their config lives in their metadata only
    beside = out.parent != quantized_dir()
    path = awq.save_awq(out, packed, config, metadata, config_beside=beside)
    notify(f"AWQ calibration done in {time.perf_counter() - start:.0f} s → {path}")
    return path


def ensure(checkpoint: Checkpoint, device: torch.device, use_cache: bool, notify: Notify) -> tuple[Path, str]:
    """This checkpoint's AWQ weights and where they came from: found ("hit"), or calibrated now into the
    cache ("miss") or, with the cache off, into a temporary folder that the caller deletes ("off")."""
    found = find(checkpoint.folder, checkpoint.file("t3"))
    if found is not None:
        return found, "hit"
    t3_file = checkpoint.file("t3")
    where = calibration_device(device, t3_file)
    out = cache_path(t3_file) if use_cache else Path(tempfile.mkdtemp(prefix="chatterbox-awq-")) / AWQ_FILE
    notify(
        f"no AWQ weights for {checkpoint.folder} yet: calibrating once, on the {where.type.upper()}; "
        "`chatterbox quantize --method awq` does this ahead of time"
    )
    return calibrate(checkpoint, out, where, notify), "miss" if use_cache else "off"


def load_t3_awq(
    t3: nn.Module, t3_file: Path, awq_file: Path, device: torch.device, dtype: torch.dtype
) -> QuantReport:
    """Fill T3 built on `meta` (text head dropped): its backbone Linears become AwqLinears from `awq_file`
    on `device`, the rest comes from `t3_file` in `dtype`, then the norms the scales were folded into take
    their AWQ values."""
    from safetensors import SafetensorError

    from chatterbox_cli.models.loading import load_module_from_safetensors
    from chatterbox_cli.quant.plan import component_plan, linear_shapes_from_module, which_linears

    try:
        stored = awq.load_awq(awq_file)
    except (ValueError, OSError, SafetensorError, KeyError) as e:
        raise CheckpointError(f"{awq_file} is not usable AWQ weights ({e}); remake it with {_REMAKE}") from e
    linears = {n: t for n, t in stored.packed.items() if "qweight" in t}
    norms = {n: t for n, t in stored.packed.items() if "qweight" not in t}
    shapes = linear_shapes_from_module(t3)
    planned = which_linears(component_plan("t3", "awq"), shapes)
    if sorted(linears) != planned or any(n not in dict(t3.named_modules()) for n in norms):
        raise CheckpointError(f"{awq_file} does not match this T3's layers; remake it with {_REMAKE}")
    for name, tensors in linears.items():
        out_f, in_f = shapes[name]
        if tensors["qweight"].shape != (in_f, out_f // awq.PACK):
            raise CheckpointError(
                f"{awq_file}: {name} is {tuple(tensors['qweight'].shape)} packed, this T3 has "
                f"{out_f}x{in_f}; remake it with {_REMAKE}"
            )
    awq.apply_awq(t3, linears, device)
    load_module_from_safetensors(t3, t3_file, device, dtype, skip_modules=list(linears))
    awq.apply_awq(t3, norms, device)
    total = expected = 0
    kernels: dict[str, int] = {}
    for name in linears:
        layer = t3.get_submodule(name)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        kernels[layer.kernel] = kernels.get(layer.kernel, 0) + 1
        total += sum(b.numel() * b.element_size() for b in layer.buffers())
        expected += awq.runtime_nbytes(layer.out_features, layer.in_features, layer.group_size)
    return QuantReport(len(linears), total, expected, {"awq": len(linears), **kernels}, sorted(linears))


def write_model_folder(checkpoint: Checkpoint, out_dir: Path, device: torch.device, notify: Notify) -> Path:
    """A model folder `out_dir` that `--model` reads: the checkpoint's files (hard links where the file
    system allows, else copies) and its AWQ weights (taken from the cache, or calibrated now)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in checkpoint.variant.all_files:
        source, target = checkpoint.folder / name, out_dir / name
        if not source.exists() or target.exists():
            continue
        try:
            target.hardlink_to(source.resolve())
        except OSError:
            shutil.copy2(source, target)
    found = find(checkpoint.folder, checkpoint.file("t3"))
    target = out_dir / AWQ_FILE
    if found is not None and found != target:
        stored = awq.load_awq(found)
        awq.save_awq(target, stored.packed, stored.config, stored.metadata)
        notify(f"AWQ weights taken from {found}")
    elif found is None:
        calibrate(checkpoint, target, calibration_device(device, checkpoint.file("t3")), notify)
    return target


_REMAKE = "`chatterbox quantize --method awq` (or delete it to calibrate again)"


def quantize_checkpoint(
    request: LoadRequest, output: str | None, force: bool, notify: Notify
) -> dict[str, object]:
    """`chatterbox quantize --method awq`: the checkpoint's AWQ weights into the cache (or, with `output`, a
    model folder), calibrating unless they exist (or `force`). Returns what the CLI prints."""
    from chatterbox_cli import service

    checkpoint = service.resolve(request)
    device = service.resolve_device(request.device)
    t3_file = checkpoint.file("t3")
    start = time.perf_counter()
    if force:
        cache_path(t3_file).unlink(missing_ok=True)
        if output is not None:
            (Path(output) / AWQ_FILE).unlink(missing_ok=True)
    found = find(checkpoint.folder, t3_file)
    if output is not None:
        path = write_model_folder(checkpoint, Path(output), device, notify)
    elif found is not None:
        path = found
        notify(f"AWQ weights exist already: {path} (--force calibrates again)")
    else:
        path = calibrate(checkpoint, cache_path(t3_file), calibration_device(device, t3_file), notify)
    stored = awq.load_awq(path)
    return {
        "method": "awq",
        "path": str(path),
        "model": str(checkpoint.folder),
        "layers": sum("qweight" in t for t in stored.packed.values()),
        "bytes": awq.packed_nbytes(stored.packed),
        "quantization_config": stored.config.quantization_config(),
        "calibration": stored.metadata.get("calibration"),
        "seconds": round(time.perf_counter() - start, 1),
    }
