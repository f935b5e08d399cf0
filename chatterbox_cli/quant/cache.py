"""A disk cache of quantized weights, so that loading a bitsandbytes preset the second time skips the
read-cast-quantize of every planned Linear.

One safetensors file per (component, key) under `<cache dir>/quantized/`. It holds, for each quantized
layer, the tensors of that layer's own `state_dict()` (bitsandbytes' serialisation: int8 weight + SCB for
Linear8bitLt; packed weight + quant-state tensors for Linear4bit; the 16-bit bias), named `<layer>.<key>`.
The header metadata repeats the key and its fields and a CRC-32 of all tensor bytes, so an entry is used only
for exactly the checkpoint, plan, dtype, device and library versions it was made with, and only intact.

The key is a sha256 over a canonical JSON of those fields. A checkpoint file inside a hub cache is a symlink
to `blobs/<sha256 of its content>`: the blob name identifies it. Any other file is identified by its
absolute path, size and mtime_ns, so rewriting it invalidates the entry.

Entries are written atomically (temporary file in the same folder, then os.replace). Every problem is said
through `notify`: an unusable entry is deleted and rebuilt; a failed write leaves the model loaded as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from chatterbox_cli.checkpoint import write_safetensors_atomic
from chatterbox_cli.errors import ChatterboxError
from chatterbox_cli.quant.bnb import (
    QuantizationError,
    QuantReport,
    _set_submodule,
    load_quantized,
    planned_layers,
    quantize_module,
    quantized_linear_from_state,
    quantized_state_keys,
    require_bitsandbytes,
    verify_quantized,
)
from chatterbox_cli.quant.plan import NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE, ComponentPlan

CACHE_FORMAT_VERSION = 1
FORMAT_NAME = "chatterbox-cli quantized weights"
CacheStatus = Literal["hit", "miss", "off"]
Notify = Callable[[str], None]


def cache_root() -> Path:
    """`$CHATTERBOX_CACHE_DIR`, else `$XDG_CACHE_HOME/chatterbox-cli`, else `~/.cache/chatterbox-cli`."""
    env = os.environ
    if env.get("CHATTERBOX_CACHE_DIR"):
        return Path(env["CHATTERBOX_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chatterbox-cli"


def quantized_dir() -> Path:
    return cache_root() / "quantized"


def checkpoint_identity(path: str | Path) -> dict[str, object]:
    """What names the content of a checkpoint file: its hub blob name, else path, size and mtime_ns."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if path.is_symlink() and real.parent.name == "blobs":
        return {"blob": real.name}
    st = real.stat()
    return {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def device_identity(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm_{major}{minor}"
    return device.type


@dataclass(frozen=True)
class CacheKey:
    component: str
    fields_json: str  # canonical JSON of every field the entry depends on
    digest: str  # sha256 of fields_json

    @property
    def path(self) -> Path:
        return quantized_dir() / f"{self.component}-{self.digest}.safetensors"


def cache_key(
    checkpoint_file: str | Path,
    plan: ComponentPlan,
    layers: Sequence[str],
    device: torch.device | str,
    dtype: torch.dtype,
) -> CacheKey:
    """The key of the entry holding `layers` of `checkpoint_file`, quantized per `plan` on `device`."""
    from chatterbox_cli.bitsandbytes_quiet import import_bitsandbytes

    bitsandbytes = import_bitsandbytes()

    fields: dict[str, object] = {
        "format": CACHE_FORMAT_VERSION,
        "checkpoint": checkpoint_identity(checkpoint_file),
        "component": plan.component,
        "mode": plan.mode,
        "layers": sorted(layers),
        # The int8 outlier threshold is a setting of the layer, not of its stored tensors: not in the key.
        "nf4_blocksize": [NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE] if plan.mode == "nf4" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_identity(device),
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return CacheKey(plan.component, text, hashlib.sha256(text.encode()).hexdigest())


class CacheEntryError(ChatterboxError):
    """A cache entry that cannot be used (unreadable, damaged, or made for something else)."""


def _crc(tensor: torch.Tensor, crc: int) -> int:
    return zlib.crc32(tensor.detach().reshape(-1).view(torch.uint8).numpy(), crc)


def write_entry(key: CacheKey, module: nn.Module, layers: Sequence[str], prefix: str = "") -> Path:
    """Write the quantized `layers` (names with `prefix`) of `module` as the entry for `key`, atomically.
    Raises OSError or SafetensorError when the file cannot be written; no partial file is left behind."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    crc = 0
    for name in sorted(layers):
        state = module.get_submodule(name[len(prefix) :]).state_dict()
        for k in sorted(state):
            t = state[k].detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            crc = _crc(t, crc)
            tensors[f"{name}.{k}"] = t
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(CACHE_FORMAT_VERSION),
        "key": key.digest,
        "key_fields": key.fields_json,
        "crc32": str(crc),
    }
    return write_safetensors_atomic(tensors, key.path, metadata)


def read_entry(
    key: CacheKey,
    module: nn.Module,
    plans: Mapping[str, ComponentPlan],
    device: torch.device,
    dtype: torch.dtype,
    prefix: str = "",
) -> dict[str, nn.Module]:
    """The quantized layers of the entry for `key`, rebuilt on `device` one at a time: {layer name (with
    prefix): layer}. `plans` maps each planned layer name to its plan; `module` gives each layer's shape
    and bias. Raises CacheEntryError naming what is wrong unless the entry is exactly what `key` says."""
    bnb = require_bitsandbytes(device)
    layers: dict[str, nn.Module] = {}
    try:
        with safe_open(str(key.path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME or meta.get("format_version") != str(CACHE_FORMAT_VERSION):
                raise CacheEntryError(
                    f"format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                    f"expected {FORMAT_NAME!r} version {CACHE_FORMAT_VERSION}"
                )
            if meta.get("key") != key.digest or meta.get("key_fields") != key.fields_json:
                raise CacheEntryError("it was made for another checkpoint, plan, device or library version")
            expected: dict[str, tuple[str, ...]] = {}
            for name in sorted(plans):
                has_bias = module.get_submodule(name[len(prefix) :]).bias is not None
                expected[name] = tuple(sorted(quantized_state_keys(plans[name].mode, has_bias)))
            wanted = {f"{name}.{k}" for name, keys in expected.items() for k in keys}
            present = set(f.keys())
            if present != wanted:
                missing, extra = sorted(wanted - present), sorted(present - wanted)
                raise CacheEntryError(f"tensors missing: {missing[:3]}, unexpected: {extra[:3]}")
            crc = 0
            for name, keys in expected.items():
                state = {}
                for k in keys:
                    state[k] = f.get_tensor(f"{name}.{k}")
                    crc = _crc(state[k], crc)
                old = module.get_submodule(name[len(prefix) :])
                try:
                    layers[name] = quantized_linear_from_state(
                        bnb, state, plans[name], old.out_features, old.in_features, device, dtype
                    )
                except torch.cuda.OutOfMemoryError:
                    raise  # not the entry's fault: the service steps down to a smaller preset
                except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RuntimeError) as e:
                    raise CacheEntryError(f"layer {name}: {e}") from e
                del state
            if str(crc) != meta.get("crc32"):
                raise CacheEntryError(f"its tensors' CRC-32 is {crc}, the header records {meta.get('crc32')}")
    except (SafetensorError, OSError) as e:
        raise CacheEntryError(f"cannot read it: {e}") from e
    return layers


def _remove(path: Path, notify: Notify) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        notify(f"cannot delete {path} ({e.strerror or e})")


def _try_hit(
    key: CacheKey,
    module: nn.Module,
    plan: ComponentPlan,
    targets: Mapping[str, ComponentPlan],
    device: torch.device,
    dtype: torch.dtype,
    prefix: str,
    notify: Notify,
) -> QuantReport | None:
    """Install the entry's layers into `module` and return their verification report; None (and the entry
    deleted, the user told) if unusable."""
    if not key.path.is_file():
        return None
    try:
        layers = read_entry(key, module, targets, device, dtype, prefix)
        originals = {}
        for name, layer in layers.items():
            originals[name] = module.get_submodule(name[len(prefix) :])
            _set_submodule(module, name[len(prefix) :], layer)
        try:
            report = verify_quantized(module, [plan], device, prefix=prefix)
        except QuantizationError as e:
            for name, old in originals.items():
                _set_submodule(module, name[len(prefix) :], old)
            raise CacheEntryError(str(e)) from e
    except CacheEntryError as e:
        notify(f"the quantized-weight cache entry {key.path} is unusable ({e}); rebuilding it")
        _remove(key.path, notify)
        return None
    return report


def _write(key: CacheKey, module: nn.Module, layers: Sequence[str], prefix: str, notify: Notify) -> None:
    try:
        write_entry(key, module, layers, prefix)
    except (OSError, SafetensorError) as e:
        reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        notify(
            f"cannot write the quantized-weight cache {key.path} ({reason}); loading goes on without a cache"
        )


@dataclass
class CachedQuantization:
    report: QuantReport
    cache: CacheStatus | None  # None: the plan quantizes no layer of this module, nothing to cache
    path: Path | None  # the entry used or written, when the cache is on


def load_quantized_cached(
    module_on_meta: nn.Module,
    safetensors_path: str | Path,
    plan: ComponentPlan,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    use_cache: bool = True,
    notify: Notify,
) -> CachedQuantization:
    """`quant.bnb.load_quantized` + `verify_quantized`, with the planned layers from the cache when it holds
    them (no float weights read for those layers); on a miss the entry is written afterwards."""
    from chatterbox_cli.models.loading import load_module_from_safetensors
    from chatterbox_cli.quant.plan import linear_shapes_from_module

    device = torch.device(device)
    targets = planned_layers([plan], linear_shapes_from_module(module_on_meta))
    if not use_cache or not targets:
        load_quantized(module_on_meta, safetensors_path, [plan], device, dtype)
        report = verify_quantized(module_on_meta, [plan], device)
        return CachedQuantization(report, "off" if targets else None, None)
    key = cache_key(safetensors_path, plan, list(targets), device, dtype)
    report = _try_hit(key, module_on_meta, plan, targets, device, dtype, "", notify)
    if report is not None:  # the rest of the module does not change what was verified
        load_module_from_safetensors(
            module_on_meta, safetensors_path, device, dtype, skip_modules=list(targets)
        )
        return CachedQuantization(report, "hit", key.path)
    load_quantized(module_on_meta, safetensors_path, [plan], device, dtype)
    report = verify_quantized(module_on_meta, [plan], device)
    _write(key, module_on_meta, list(targets), "", notify)
    return CachedQuantization(report, "miss", key.path)


def quantize_module_cached(
    module: nn.Module,
    checkpoint_file: str | Path,
    plan: ComponentPlan,
    device: torch.device | str,
    dtype: torch.dtype,
    prefix: str = "",
    *,
    use_cache: bool = True,
    notify: Notify,
) -> CachedQuantization:
    """`quantize.quantize_module` on an already loaded `module` (whose weights came from `checkpoint_file`),
    with the planned layers swapped for the cached ones when the cache holds them. Only the planned layers
    are put on `device`; verification of the whole module is left to the caller, after it moved the rest."""
    from chatterbox_cli.quant.plan import linear_shapes_from_module

    device = torch.device(device)
    targets = planned_layers([plan], linear_shapes_from_module(module, prefix))
    if not use_cache or not targets:
        quantize_module(module, [plan], device, dtype, prefix=prefix)
        report = verify_quantized(module, [plan], device, prefix)
        return CachedQuantization(report, "off" if targets else None, None)
    key = cache_key(checkpoint_file, plan, list(targets), device, dtype)
    report = _try_hit(key, module, plan, targets, device, dtype, prefix, notify)
    if report is not None:
        return CachedQuantization(report, "hit", key.path)
    quantize_module(module, [plan], device, dtype, prefix=prefix)
    report = verify_quantized(module, [plan], device, prefix)
    _write(key, module, list(targets), prefix, notify)
    return CachedQuantization(report, "miss", key.path)
