"""Memory presets: named combinations of per-component quantization modes (quant/plan.py), and how each
runs (the vocoder parked, T3 and S3Gen taking turns, the first chunk's early piece). The chooser and the
out-of-memory step-down go through them in order of fidelity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from chatterbox_cli.errors import UsageError
from chatterbox_cli.quant.plan import COMPONENTS, Component, Mode, QuantPlan, component_plan

# The first chunk's early piece (Preset.early_tokens): 48 speech tokens, 1.6 s of audio after the flow's
# lookahead, come out while T3 decodes the rest of the chunk.
EARLY_TOKENS = 48


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fidelity: int  # the chooser and the OOM step-down try higher first: closer to 32 bits, then faster
    modes: Mapping[Component, Mode] = field(default_factory=dict)
    unavailable_reason: str | None = None
    # HiFT (fp32, ~80 MB) waits in host memory while T3 decodes, so it does not add to T3's peak; it moves
    # to the GPU for each S3Gen call (a few ms). For the presets that exist to fit small cards.
    park_vocoder: bool = False
    # T3 and S3Gen take turns on the GPU: whichever is not running waits in host memory, moved over PCIe at
    # each group of chunks (and around the first chunk's early piece, while its KV cache stays). GPU memory
    # is then the larger of the two turns instead of their sum. The step below the all-resident presets.
    take_turns: bool = False
    # Speech tokens of the first chunk rendered early, while T3 decodes the rest (pipeline.synthesize), on
    # a GPU; 0: none. Fewer where decoding is slower, so that first audio comes as soon: bitsandbytes int8
    # decodes at about half fp16's speed (README, Performance).
    early_tokens: int = EARLY_TOKENS

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fp16", "all weights 16-bit (bf16 where the GPU supports it, else fp16)", 4, {}),
        Preset(
            "bnb-8bit",
            "T3 backbone and S3Gen flow Linears int8 (bitsandbytes Linear8bitLt), the rest 16-bit",
            3,
            {"t3": "int8", "flow": "int8"},
            park_vocoder=True,
            early_tokens=24,
        ),
        # Between int8 and nf4: 4-bit weights like nf4 (3 % more bytes), placed by calibration, on torch's
        # int4 kernels (faster than bitsandbytes' nf4: README, AWQ); the flow stays 16-bit (no bitsandbytes).
        # An auto candidate only where its weights exist (quant/awq_store.py).
        Preset(
            "awq",
            "T3 backbone Linears 4-bit AWQ (calibrated once per checkpoint), the rest 16-bit",
            2,
            {"t3": "awq"},
            park_vocoder=True,
        ),
        Preset(
            "bnb-4bit",
            "T3 backbone Linears nf4, double quant (bitsandbytes Linear4bit), flow Linears int8, rest 16-bit",
            1,
            {"t3": "nf4", "flow": "int8"},
            park_vocoder=True,
        ),
        Preset(
            "bnb-4bit-swap",
            "as bnb-4bit, with T3 and S3Gen taking turns on the GPU (the idle one waits in host memory)",
            0,
            {"t3": "nf4", "flow": "int8"},
            take_turns=True,
        ),
    )
}


def preset_names(available_only: bool = True) -> list[str]:
    """Preset names, highest fidelity first."""
    ps = sorted(PRESETS.values(), key=lambda p: -p.fidelity)
    return [p.name for p in ps if p.available or not available_only]


def get_preset(name: str) -> Preset:
    """The named preset; UsageError if unknown or not available on this installation."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())} (or auto)")
    preset = PRESETS[name]
    if not preset.available:
        raise UsageError(f"preset {name!r} is not available: {preset.unavailable_reason}")
    return preset


def preset_of(plan: QuantPlan) -> Preset | None:
    """The preset a plan was made from (its name before any `+overrides`)."""
    return PRESETS.get(plan.preset.partition("+")[0])


def plan_for(preset: str, overrides: Mapping[str, str] | None = None) -> QuantPlan:
    """The per-component plan of a preset, optionally with some components' modes overridden
    (e.g. {"flow": "16bit"}). Raises UsageError for unknown/unavailable presets, components or modes."""
    p = get_preset(preset)
    modes: dict[Component, Mode] = {c: p.modes.get(c, "16bit") for c in COMPONENTS}
    for comp, mode in (overrides or {}).items():
        if comp not in modes:
            raise UsageError(f"unknown component {comp!r} in plan; components: {', '.join(COMPONENTS)}")
        modes[comp] = mode  # type: ignore[assignment]
    name = preset if not overrides else f"{preset}+" + ",".join(f"{c}={m}" for c, m in overrides.items())
    return QuantPlan(name, {c: component_plan(c, m) for c, m in modes.items()})


def sixteen_bit_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it (compute capability >= 8.0) and on CPU, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16
