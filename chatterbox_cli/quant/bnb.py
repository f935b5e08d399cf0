"""Real bitsandbytes quantization of the Linear layers a plan names, on the target device.

`load_quantized` builds each planned layer straight from its checkpoint tensor (read, cast to 16-bit on the
host, quantized on the device) before the next is read, then loads everything else with
`models.loading.load_module_from_safetensors`. Peak memory stays near the final quantized size.
`verify_quantized` then checks every Linear against the plan and counts the bytes really allocated; a
layer that is not what the plan says (e.g. a Linear4bit still holding a float weight) is an error.
Nothing falls back silently: a missing or unusable bitsandbytes is an error naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from chatterbox_cli.errors import ChatterboxError, CheckpointError, ExitCode
from chatterbox_cli.quant.plan import (
    NF4_BLOCKSIZE,
    ComponentPlan,
    linear_shapes_from_module,
    quantized_linear_nbytes,
    which_linears,
)


class QuantizationError(ChatterboxError):
    """Quantization could not be done as planned (library missing or broken, or the result is wrong)."""

    exit_code = ExitCode.FAILED


Plans = ComponentPlan | Iterable[ComponentPlan]


def _as_list(plans: Plans) -> list[ComponentPlan]:
    return [plans] if isinstance(plans, ComponentPlan) else list(plans)


def planned_layers(plans: Plans, linear_shapes: Mapping[str, tuple[int, int]]) -> dict[str, ComponentPlan]:
    """{Linear name: the component plan that quantizes it}; a layer claimed by two plans is an error."""
    out: dict[str, ComponentPlan] = {}
    for cp in _as_list(plans):
        for name in which_linears(cp, linear_shapes):
            if name in out:
                raise QuantizationError(f"{name} is planned by both {out[name].component} and {cp.component}")
            out[name] = cp
    return out


def require_bitsandbytes(device: torch.device | str) -> ModuleType:
    """Import bitsandbytes and prove it quantizes on `device`; QuantizationError (exit 1) otherwise."""
    from chatterbox_cli.bitsandbytes_quiet import import_bitsandbytes

    device = torch.device(device)
    try:
        bnb = import_bitsandbytes()
    except ImportError as e:
        raise QuantizationError(
            f"bitsandbytes is not installed ({e}); install it with `pip install 'chatterbox-cli[quant]'` "
            "or choose --preset fp16"
        ) from e
    try:
        probe = bnb.nn.Params4bit(
            torch.ones(64, 64, dtype=torch.float16),
            requires_grad=False,
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
        ).to(device)
        if probe.dtype != torch.uint8:
            raise RuntimeError(f"a quantized probe weight came back as {probe.dtype}")
    except (RuntimeError, NotImplementedError, AssertionError, OSError) as e:
        raise QuantizationError(
            f"bitsandbytes {bnb.__version__} cannot quantize on {device} ({e}); install a bitsandbytes "
            "build for this device or choose --preset fp16"
        ) from e
    return bnb


def empty_quantized_linear(
    bnb: ModuleType, out_f: int, in_f: int, has_bias: bool, plan: ComponentPlan, dtype: torch.dtype
) -> nn.Module:
    """The bitsandbytes layer `plan.mode` asks for, on the meta device, weights not yet given."""
    if plan.mode == "nf4":
        return bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=has_bias,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
    if plan.mode == "int8":
        return bnb.nn.Linear8bitLt(
            in_f,
            out_f,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=plan.int8_threshold,
            device="meta",
        )
    raise QuantizationError(f"mode {plan.mode!r} has no bitsandbytes layer")


def make_quantized_linear(
    bnb: ModuleType,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: ComponentPlan,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """A bitsandbytes layer holding `weight` quantized per `plan.mode` on `device` (weight given on the host
    or any device; it is cast to the 16-bit `dtype` first, so dequantized weights come back in it)."""
    out_f, in_f = weight.shape
    layer = empty_quantized_linear(bnb, out_f, in_f, bias is not None, plan, dtype)
    w16 = weight.detach().to(device="cpu", dtype=dtype)
    if plan.mode == "nf4":
        layer.weight = bnb.nn.Params4bit(
            w16,
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            module=layer,
        ).to(device)
    else:
        layer.weight = bnb.nn.Int8Params(w16, requires_grad=False, has_fp16_weights=False).to(device)
    del w16
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return layer.eval()


# The tensors a quantized layer's own state_dict() holds besides `bias` (bitsandbytes 0.50.2 names).
NF4_STATE_KEYS = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
)
INT8_STATE_KEYS = ("weight", "SCB", "weight_format")


def quantized_state_keys(mode: str, has_bias: bool) -> tuple[str, ...]:
    """The state_dict keys of one quantized Linear in `mode` ('nf4' or 'int8')."""
    keys = {"nf4": NF4_STATE_KEYS, "int8": INT8_STATE_KEYS}.get(mode)
    if keys is None:
        raise QuantizationError(f"mode {mode!r} has no bitsandbytes layer")
    return keys + (("bias",) if has_bias else ())


def quantized_linear_from_state(
    bnb: ModuleType,
    state: Mapping[str, torch.Tensor],
    plan: ComponentPlan,
    out_f: int,
    in_f: int,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """Rebuild a quantized layer on `device` from what its state_dict() held (already quantized tensors:
    nothing is quantized again). Raises ValueError when the tensors do not describe such a layer."""
    has_bias = "bias" in state
    wanted = set(quantized_state_keys(plan.mode, has_bias))
    if set(state) != wanted:
        raise ValueError(f"tensors {sorted(state)}, expected {sorted(wanted)}")
    weight = state["weight"]
    layer = empty_quantized_linear(bnb, out_f, in_f, has_bias, plan, dtype)
    if plan.mode == "nf4":
        packed = (out_f * in_f + 1) // 2
        if weight.dtype != torch.uint8 or tuple(weight.shape) != (packed, 1):
            raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)}, expected uint8 ({packed}, 1)")
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(
            weight, stats, requires_grad=False, device=device, module=layer
        )
        qs = layer.weight.quant_state
        if tuple(qs.shape) != (out_f, in_f) or qs.dtype != dtype:
            raise ValueError(
                f"quant state of shape {tuple(qs.shape)} {qs.dtype}, expected ({out_f}, {in_f}) {dtype}"
            )
    else:
        scb, fmt = state["SCB"], state["weight_format"]
        if weight.dtype != torch.int8 or tuple(weight.shape) != (out_f, in_f):
            raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)}, expected int8 ({out_f}, {in_f})")
        if scb.dtype != torch.float32 or tuple(scb.shape) != (out_f,):
            raise ValueError(f"SCB {scb.dtype} {tuple(scb.shape)}, expected float32 ({out_f},)")
        if fmt.numel() != 1 or int(fmt) != 0:
            raise ValueError("weight_format is not 0 (row-major)")
        weight = weight.to(device)
        layer.weight = bnb.nn.Int8Params(
            weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb.to(device)
        )
    if has_bias:
        bias = state["bias"]
        if bias.dtype != dtype or tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias {bias.dtype} {tuple(bias.shape)}, expected {dtype} ({out_f},)")
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return layer.eval()


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_module(
    module: nn.Module,
    plans: Plans,
    device: torch.device | str,
    dtype: torch.dtype,
    prefix: str = "",
) -> list[str]:
    """Replace the planned nn.Linear layers of an already-loaded `module` by bitsandbytes layers quantized on
    `device`, one at a time (each original weight is dropped once its replacement exists). `prefix` is
    prepended to module names to match the plan's checkpoint names (e.g. 'flow.' for a standalone Flow).
    Other parameters are left where they are. Returns the quantized layer names (with prefix)."""
    device = torch.device(device)
    targets = planned_layers(plans, linear_shapes_from_module(module, prefix))
    if not targets:
        return []
    bnb = require_bitsandbytes(device)
    for full, cp in targets.items():
        name = full[len(prefix) :]
        old = module.get_submodule(name)
        if type(old) is not nn.Linear:
            raise QuantizationError(
                f"{full} is a {type(old).__name__}, not a plain nn.Linear; cannot quantize it"
            )
        if old.weight.is_meta:
            raise QuantizationError(
                f"{full} has no weights (meta device); use load_quantized for meta modules"
            )
        new = make_quantized_linear(bnb, old.weight, old.bias, cp, device, dtype)
        _set_submodule(module, name, new)
        del old
    return sorted(targets)


def load_quantized(
    module_on_meta: nn.Module,
    safetensors_path: str | Path,
    plans: Plans,
    device: torch.device | str,
    dtype: torch.dtype,
) -> nn.Module:
    """Fill a module built on the meta device from `safetensors_path` (module names = file names): planned
    Linears become bitsandbytes layers quantized on `device` straight from their tensors; every other tensor
    is loaded by load_module_from_safetensors (cast to `dtype` if floating). Returns the module, eval mode."""
    from chatterbox_cli.models.loading import load_module_from_safetensors, stored_transposed

    path = Path(safetensors_path)
    transposed = stored_transposed(module_on_meta)
    device = torch.device(device)
    shapes = linear_shapes_from_module(module_on_meta)
    targets = planned_layers(plans, shapes)
    if targets:
        bnb = require_bitsandbytes(device)
        from chatterbox_cli.checkpoint import TensorFile

        with TensorFile(path) as f:
            keys = set(f.keys())
            for name, cp in targets.items():
                has_bias = module_on_meta.get_submodule(name).bias is not None
                wanted = [f"{name}.weight"] + ([f"{name}.bias"] if has_bias else [])
                missing = [k for k in wanted if k not in keys]
                if missing or (not has_bias and f"{name}.bias" in keys):
                    raise CheckpointError(
                        f"{path} does not match {type(module_on_meta).__name__} at {name} "
                        f"(missing {missing or 'nothing'}, bias in file: {f'{name}.bias' in keys}); "
                        "is it the right file for this model and version?"
                    )
                flip = f"{name}.weight" in transposed  # stored [in, out] (GPT-2's Conv1D)
                shape = f.shape(f"{name}.weight")
                want = shapes[name][::-1] if flip else shapes[name]
                if shape != want:
                    raise CheckpointError(
                        f"{path}: tensor {name}.weight has shape {shape}, the model expects {want}"
                    )
                weight = f.get_tensor(f"{name}.weight")
                weight = weight.t().contiguous() if flip else weight
                bias = f.get_tensor(f"{name}.bias") if has_bias else None
                _set_submodule(
                    module_on_meta, name, make_quantized_linear(bnb, weight, bias, cp, device, dtype)
                )
                del weight, bias
    load_module_from_safetensors(module_on_meta, path, device, dtype, skip_modules=list(targets))
    return module_on_meta.eval()


@dataclass
class QuantReport:
    quantized_layers: int
    quantized_bytes: int  # weights + quantization state of the quantized Linears (biases excluded)
    expected_bytes: int  # what quant.plan.quantized_linear_nbytes says for the same layers
    by_mode: dict[str, int] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _quant_state_tensors(qs: object) -> list[torch.Tensor]:
    out = [v for v in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))]
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` is on `device` ("cuda" without an index: any GPU, "cuda:1": that one)."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def verify_quantized(
    module: nn.Module, plans: Plans, device: torch.device | str | None = None, prefix: str = ""
) -> QuantReport:
    """Check that exactly the planned Linears are real bitsandbytes layers with quantized weights (on
    `device` if given) and every other Linear is a plain float one; count the quantized bytes. Raises
    QuantizationError listing every difference."""
    device = torch.device(device) if device is not None else None
    try:
        from chatterbox_cli.bitsandbytes_quiet import import_bitsandbytes

        bnb = import_bitsandbytes()
        quant_types: tuple[type, ...] = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        bnb, quant_types = None, ()
    shapes = linear_shapes_from_module(module, prefix)
    targets = planned_layers(plans, shapes)
    problems: list[str] = []
    seen: set[tuple[str, int]] = set()
    total = expected = 0
    by_mode: dict[str, int] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        full = prefix + name
        cp = targets.get(full)
        w = layer.weight
        if cp is None:
            if quant_types and isinstance(layer, quant_types):
                problems.append(f"{full}: {type(layer).__name__} but the plan keeps it 16-bit")
            elif not w.is_floating_point():
                problems.append(f"{full}: plain Linear with a {w.dtype} weight")
            continue
        if bnb is None:
            problems.append(f"{full}: planned {cp.mode} but bitsandbytes is not installed")
            continue
        if cp.mode == "nf4":
            qs = getattr(w, "quant_state", None)
            if not isinstance(layer, bnb.nn.Linear4bit) or not isinstance(w, bnb.nn.Params4bit):
                problems.append(f"{full}: planned nf4, found {type(layer).__name__} / {type(w).__name__}")
                continue
            if w.dtype != torch.uint8 or qs is None:
                problems.append(f"{full}: Linear4bit whose weight is {w.dtype} and not quantized")
                continue
            if qs.quant_type != "nf4" or not qs.nested or qs.blocksize != NF4_BLOCKSIZE:
                problems.append(
                    f"{full}: quant state {qs.quant_type}, nested={qs.nested}, blocksize={qs.blocksize}; "
                    f"planned nf4 double-quant blocksize {NF4_BLOCKSIZE}"
                )
            tensors = [w, *_quant_state_tensors(qs)]
        else:
            scb = getattr(w, "SCB", None)
            if not isinstance(layer, bnb.nn.Linear8bitLt) or not isinstance(w, bnb.nn.Int8Params):
                problems.append(f"{full}: planned int8, found {type(layer).__name__} / {type(w).__name__}")
                continue
            if w.dtype != torch.int8 or scb is None or layer.state.has_fp16_weights:
                problems.append(
                    f"{full}: Linear8bitLt whose weight is {w.dtype} "
                    f"(SCB {'missing' if scb is None else 'set'})"
                )
                continue
            tensors = [w, scb]
        if device is not None and any(not _on(t, device) for t in tensors):
            problems.append(f"{full}: quantized tensors on {w.device}, expected {device}")
        total += _storage_bytes(tensors, seen)
        expected += quantized_linear_nbytes(cp.mode, layer.out_features, layer.in_features)
        by_mode[cp.mode] = by_mode.get(cp.mode, 0) + 1
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise QuantizationError(f"quantization does not match the plan: {shown}")
    return QuantReport(sum(by_mode.values()), total, expected, by_mode, sorted(targets))
