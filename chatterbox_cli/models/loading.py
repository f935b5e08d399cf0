"""Put safetensors weights into a model built on the `meta` device, one tensor at a time.

The model is constructed without memory (`with torch.device("meta"): model = Cls(config)`), then each
tensor is read from the file, cast (floating point only) and moved to the target device before the next
one is read. Peak host memory is the final weights plus one tensor in flight — no second full copy.

Non-persistent buffers (derived tables such as RoPE cos/sin) are not in checkpoints: after loading, every
submodule that defines `init_non_persistent_buffers(device)` is asked to recompute its own.

A module whose checkpoint stores some weights transposed (GPT-2's Conv1D, [in, out]) or holds tensors it
never uses says so in `stored_transposed` (names) and `stored_unused` ({name: shape}) attributes: those are
transposed as they are read, and the unused ones are checked for presence but not read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from chatterbox_cli.checkpoint import TensorFile, TensorInfo, safetensors_header
from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.models.t3 import T3, T3Config, t3_tensor_shapes


def stored_transposed(module: nn.Module) -> frozenset[str]:
    """The names of `module`'s weights its checkpoint stores transposed (see the module docstring)."""
    return getattr(module, "stored_transposed", frozenset())


def _names_preview(names: set[str], limit: int = 8) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    return shown + (f" ... ({len(ordered) - limit} more)" if len(ordered) > limit else "")


def _place(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # state_dict() listed it, so this cannot happen for standard modules
        raise AssertionError(f"{name} is neither a parameter nor a buffer")


def load_module_from_safetensors(
    module_on_meta: nn.Module,
    path: str | Path,
    device: torch.device | str,
    dtype: torch.dtype,
    skip_modules: Collection[str] = (),
) -> nn.Module:
    """Fill `module_on_meta` with the tensors of `path` (strict), on `device`; float tensors become `dtype`.

    Tensors of the submodules named in `skip_modules` are neither read nor checked: the caller has already
    filled those submodules (quant.bnb.load_quantized puts quantized layers there).

    Raises CheckpointError naming missing or unexpected tensor names and shape mismatches. Returns the same
    module, switched to eval mode.
    """
    path = Path(path)
    device = torch.device(device)
    skip = tuple(f"{m}." for m in skip_modules)
    transposed = stored_transposed(module_on_meta)
    unused: dict[str, tuple[int, ...]] = getattr(module_on_meta, "stored_unused", {})
    expected = {
        name: tuple(t.shape)[::-1] if name in transposed else tuple(t.shape)
        for name, t in module_on_meta.state_dict(keep_vars=True).items()
        if not name.startswith(skip)
    }
    with TensorFile(path) as f:
        present = {k for k in f.keys() if not k.startswith(skip)}  # noqa: SIM118
        missing = (set(expected) | set(unused)) - present
        unexpected = present - set(expected) - set(unused)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s): {_names_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensor(s): {_names_preview(unexpected)}")
            raise CheckpointError(
                f"{path} does not match {type(module_on_meta).__name__}: {'; '.join(parts)}. "
                "Is it the right file for this model and version?"
            )
        for name in expected | unused:
            shape = f.shape(name)
            if shape != (expected | unused)[name]:
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {shape}, the model expects {expected[name]}. "
                    "Is it the right file for this model and version?"
                )
        for name in expected:
            tensor = f.get_tensor(name)
            if name in transposed:
                tensor = tensor.t()
            target = dtype if tensor.is_floating_point() else tensor.dtype
            _place(module_on_meta, name, tensor.to(device=device, dtype=target).contiguous())
            del tensor

    for sub in module_on_meta.modules():
        init = getattr(sub, "init_non_persistent_buffers", None)
        if callable(init):
            init(device)
    leftovers = [
        n for n, t in (*module_on_meta.named_parameters(), *module_on_meta.named_buffers()) if t.is_meta
    ]
    if leftovers:
        raise RuntimeError(
            f"{type(module_on_meta).__name__} still has meta tensors after loading: {leftovers[:8]}; "
            "their module needs an init_non_persistent_buffers(device) method"
        )
    return module_on_meta.eval()


def infer_t3_config(header: dict[str, TensorInfo]) -> T3Config:
    """The known T3 config whose tensor shapes equal those in the file's header. The text vocabulary is
    read from `text_emb.weight` (704 English, 2,454 multilingual, 50,276 Turbo); the rest must match a known
    backbone."""
    shapes = {name: info.shape for name, info in header.items()}
    text_emb = shapes.get("text_emb.weight")
    vocab = {"text_vocab_size": text_emb[0]} if text_emb else {}
    wte = shapes.get("tfmr.wte.weight")  # GPT-2's own token table (Turbo), unused
    for candidate in (T3Config.english(), T3Config.tiny(), T3Config.turbo(), T3Config.tiny_turbo()):
        candidate = replace(candidate, **vocab)
        if wte and candidate.backbone == "gpt2":
            candidate = replace(candidate, backbone_vocab_size=wte[0])
        if t3_tensor_shapes(candidate) == shapes:
            return candidate
    english = t3_tensor_shapes(replace(T3Config.english(), **vocab))
    differ = {n for n in set(english) | set(shapes) if english.get(n) != shapes.get(n)}
    raise CheckpointError(
        f"T3 checkpoint does not match the Chatterbox T3 model ({len(differ)} tensor(s) differ, e.g. "
        f"{_names_preview(differ, 4)}); only the English, multilingual and Turbo Chatterbox T3 are supported"
    )


def load_t3(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: T3Config | None = None,
) -> T3:
    """Build T3 on `meta` and load `t3_cfg.safetensors` into it on `device` / `dtype`."""
    if config is None:
        config = infer_t3_config(safetensors_header(Path(path)))
    with torch.device("meta"):
        model = T3(config)
    load_module_from_safetensors(model, path, device, dtype)
    return model
