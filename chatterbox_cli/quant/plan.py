"""Quantization plans: which Linear layers of which component are quantized, how, and how many bytes each
takes on the device.

One function, `which_linears`, decides which layers a plan quantizes, and one, `quantized_linear_nbytes`,
what each takes. `estimate.py` applies them to the checkpoint's header shapes, `quant/bnb.py` and
`quant/awq_store.py` to the module being loaded, so the bytes the estimate promises are the bytes the
loader produces. The presets (presets.py) name combinations of these plans.

bitsandbytes replaces `nn.Linear` only. Per component:
  t3               210 backbone Linears (q/k/v/o, gate/up/down; 503 M of T3's 532 M params) can be quantized.
  flow             conformer encoder (34.6 M params in Linears) and estimator transformer (63.8 M) Linears.
  mel2wav (HiFT)   convolutions only; its two Linears have 512 and 9 weights. Nothing to quantize.
  voice_encoder    an LSTM plus one 256x256 projection. Nothing worth quantizing.
  s3tokenizer,     voice-preparation only (loaded to prepare a voice, then freed); kept 16-bit.
  speaker_encoder
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch

from chatterbox_cli.checkpoint import TensorInfo
from chatterbox_cli.errors import UsageError

Component = Literal["t3", "flow", "mel2wav", "voice_encoder", "s3tokenizer", "speaker_encoder"]
Mode = Literal["16bit", "int8", "nf4", "awq"]

COMPONENTS: tuple[Component, ...] = (
    "t3",
    "flow",
    "mel2wav",
    "voice_encoder",
    "s3tokenizer",
    "speaker_encoder",
)
MODES: tuple[Mode, ...] = ("16bit", "int8", "nf4", "awq")

# Where each component's tensors live in the official checkpoint: (file role, name prefix); the file of
# each role is the variant's (variants.Variant.files: t3_cfg.safetensors or t3_mtl23ls_v2.safetensors, ...).
COMPONENT_SOURCES: dict[Component, tuple[str, str]] = {
    "t3": ("t3", ""),
    "flow": ("s3gen", "flow."),
    "mel2wav": ("s3gen", "mel2wav."),
    "s3tokenizer": ("s3gen", "tokenizer."),
    "speaker_encoder": ("s3gen", "speaker_encoder."),
    "voice_encoder": ("ve", ""),
}

# --- Rules that keep layers 16-bit, with the measurement behind each ------------------------------------
# Measured with `python benchmarks/memory.py --layer-errors` (CPU, bitsandbytes 0.50.2, torch 2.13,
# random weights std 0.02, 32 random input rows, eval mode; relative Frobenius error of the output vs fp32):
#   layer (out x in)                  bf16    nf4     int8 (thr 0)  int8 thr 0, 1% outlier inputs  thr 6.0
#   t3 q/k/v/o 1024x1024              0.29%   9.1%    1.16%         3.77%                          0.97%
#   t3 gate/up 4096x1024              0.29%   9.2%    1.14%         3.88%                          0.95%
#   t3 down 1024x4096                 0.29%   9.2%    1.27%         5.04%                          1.08%
#   flow.encoder attn 512x512         0.29%   9.3%    1.10%         3.49%                          0.91%
#   flow.decoder attn 512x256         0.29%   9.3%    1.04%         2.77%                          0.87%
#   t3 cond_enc.emotion_adv_fc 1024x1 0.30%   (cpu)   6.7e6 %       -                              6.1e5 %
# The per-layer error is the same for every shape with in_features >= 64: it does not argue for or against
# any particular large layer. What differs is (a) where the error goes and (b) what a layer saves.

# Layers with fewer input features than this stay 16-bit: int8 with in_features=1 (emotion_adv_fc) gave a
# relative error of 6.7e6 % (bitsandbytes' row-wise activation quantization breaks down), and bitsandbytes'
# CPU nf4 path rejects odd tiny shapes (m_source 1x9). The affected layers hold < 2 kB of weights.
MIN_IN_FEATURES = 64
# Layers with fewer weights than this stay 16-bit: in the English checkpoint the Linears below 65,536
# weights (emotion_adv_fc, encoder_proj, spk_embed_affine_layer, f0 classifier, m_source, quantizer
# project_down) hold 68 k weights together; quantizing them saves < 0.1 MB and adds kernel launches.
MIN_QUANT_PARAMS = 65_536
# LLM.int8() outlier threshold. With 1 % of input features 20x larger than the rest (outlier features as
# Llama-style residual streams develop), threshold 0 gave 3.8-5.0 % error, threshold 6.0 gave 0.9-1.1 %
# (table above). But on the H100 (2026-11-25, benchmarks/memory.py) threshold 6.0 decoded T3 at 6.5 tokens/s
# against 35.6 for fp16: the outlier split runs on the host every step and cannot be captured in a CUDA
# graph. Threshold 0 (plain int8 matmul with row-wise scales) keeps int8 usable; its 1.2 % error on inputs
# without outlier features is 4x nf4's 9 %.
INT8_THRESHOLD = 0.0
# nf4 settings (bitsandbytes defaults, stated here because estimate.py computes bytes from them).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256

# Token-deciding heads and the conditioning encoder stay 16-bit in every preset. Their error is not
# averaged away by a residual stream: the head's output *is* the sampling distribution. Measured
# (same setup, logits scaled to std 2, softmax at temperature 0.8, 64 rows):
#   speech_head 8194x1024: KL to fp32  bf16 0.0001, int8 0.0003, nf4 0.026 nats; top-1 agreement
#                          97 % / 100 % / 81 %
#   text_head 704x1024:    KL 0.0001 / 0.0002 / 0.024 nats; top-1 100 % / 97 % / 78 %
# The savings are small: speech_head nf4 would save 12.6 MB of T3's ~320 MB at nf4 (4 %), text_head 1 MB,
# cond_enc (4.5 M params, run once per utterance) 6.6 MB.
T3_KEEP_16BIT = ("text_head", "speech_head", "cond_enc.*")
T3_BACKBONE = (
    "tfmr.layers.*.self_attn.*_proj",  # Llama (English, multilingual)
    "tfmr.layers.*.mlp.*_proj",
    "tfmr.h.*.attn.c_*",  # GPT-2 (Turbo)
    "tfmr.h.*.mlp.c_*",
)
FLOW_LINEARS = ("flow.encoder.*", "flow.decoder.*")

# Module names whose 2-D `.weight` is an embedding table, not a Linear (only needed when working from a
# safetensors header, which carries names and shapes but not module types).
_EMBEDDING_WEIGHT = re.compile(
    r"(^|\.)(embed_tokens|text_emb|speech_emb|emb|input_embedding|embedding)\.weight$"
)


@dataclass(frozen=True)
class ComponentPlan:
    """How one component is stored. `include`/`exclude` are fnmatch patterns over Linear layer names
    (qualified names as in the component's checkpoint file, without `.weight`)."""

    component: Component
    mode: Mode = "16bit"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = MIN_QUANT_PARAMS
    min_in_features: int = MIN_IN_FEATURES
    int8_threshold: float = INT8_THRESHOLD

    @property
    def quantized(self) -> bool:
        return self.mode != "16bit"


@dataclass(frozen=True)
class QuantPlan:
    preset: str
    components: Mapping[Component, ComponentPlan]

    def __getitem__(self, component: Component) -> ComponentPlan:
        return self.components[component]

    def describe(self) -> str:
        return ", ".join(f"{c}={p.mode}" for c, p in self.components.items())


# Which Linears each component's quantized mode applies to, and which it must leave alone.
_COMPONENT_PATTERNS: dict[Component, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "t3": (T3_BACKBONE, T3_KEEP_16BIT),
    "flow": (FLOW_LINEARS, ()),
    "mel2wav": (("mel2wav.*",), ()),
    "voice_encoder": (("*",), ()),
    "s3tokenizer": (("tokenizer.*",), ()),
    "speaker_encoder": (("speaker_encoder.*",), ()),
}


def component_plan(component: Component, mode: Mode) -> ComponentPlan:
    if component not in _COMPONENT_PATTERNS:
        raise UsageError(f"unknown component {component!r}; components: {', '.join(COMPONENTS)}")
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r} for {component}; modes: {', '.join(MODES)}")
    if mode == "awq" and component != "t3":
        raise UsageError(f"mode 'awq' is for T3 only (it is calibrated on T3's activations), not {component}")
    include, exclude = _COMPONENT_PATTERNS[component]
    if mode == "awq":  # calibration quantizes every backbone Linear (quant.awq.t3_scale_groups), small or not
        return ComponentPlan(component, mode, include, exclude, min_params=0)
    return ComponentPlan(component, mode, include, exclude)


def parse_plan_spec(spec: str) -> dict[str, str]:
    """'t3=nf4,flow=int8' -> {'t3': 'nf4', 'flow': 'int8'} (validated by plan_for)."""
    out: dict[str, str] = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        comp, sep, mode = part.partition("=")
        if not sep or not comp.strip() or not mode.strip():
            raise UsageError(f"bad plan entry {part!r}; write component=mode, e.g. t3=nf4,flow=int8")
        out[comp.strip()] = mode.strip()
    return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def which_linears(plan: ComponentPlan, linear_shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Names of the Linear layers `plan` quantizes. `linear_shapes` maps Linear layer names to their
    weight shape (out_features, in_features); see `linear_shapes_from_header` / `_from_module`."""
    if not plan.quantized:
        return []
    chosen = []
    for name, (out_f, in_f) in linear_shapes.items():
        if not _matches(name, plan.include) or _matches(name, plan.exclude):
            continue
        if in_f < plan.min_in_features or out_f * in_f < plan.min_params:
            continue
        chosen.append(name)
    return sorted(chosen)


def linear_shapes_from_header(
    header: Mapping[str, TensorInfo], prefix: str = ""
) -> dict[str, tuple[int, int]]:
    """Linear layers in a safetensors header: 2-D `<layer>.weight` tensors that are not embedding tables.
    `prefix` restricts to one component's tensors (e.g. 'flow.')."""
    out = {}
    for name, info in header.items():
        if not name.startswith(prefix) or not name.endswith(".weight") or len(info.shape) != 2:
            continue
        if _EMBEDDING_WEIGHT.search(name):
            continue
        out[name[: -len(".weight")]] = (int(info.shape[0]), int(info.shape[1]))
    return out


def linear_shapes_from_module(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, int]]:
    """Every nn.Linear (bitsandbytes layers included: they subclass it) by qualified name, with `prefix`
    prepended so names match the checkpoint file the module is loaded from."""
    return {
        prefix + name: (m.out_features, m.in_features)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def with_component(plan: QuantPlan, component: Component, mode: Mode) -> QuantPlan:
    comps = dict(plan.components)
    comps[component] = component_plan(component, mode)
    return replace(plan, components=comps, preset=f"{plan.preset}+{component}={mode}")


def quantized_linear_nbytes(mode: str, out_features: int, in_features: int, awq_group: int = 128) -> int:
    """Bytes one quantized Linear's weight and quantization state take on the device (bias excluded: it
    stays a 16-bit tensor): bitsandbytes 0.50.2's int8 and nf4 (checked against real layers in
    tests/test_quantize.py), AWQ's with groups of `awq_group` inputs (quant.awq.runtime_nbytes)."""
    if mode == "awq":
        from chatterbox_cli.quant.awq import runtime_nbytes

        return runtime_nbytes(out_features, in_features, awq_group)
    n = out_features * in_features
    if mode == "int8":
        return n + 4 * out_features  # int8 weight + fp32 row scales (SCB)
    if mode == "nf4":
        blocks = math.ceil(n / NF4_BLOCKSIZE)
        nested_blocks = math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
        return (
            math.ceil(n / 2)  # two 4-bit codes per byte
            + blocks  # absmax per block, itself quantized to 8 bits (double quant)
            + 4 * nested_blocks  # fp32 absmax of the absmax
            + 4 * 256  # fp32 code book of the 8-bit absmax
            + 4 * 16  # fp32 nf4 code book
            + 4  # fp32 offset (mean of the absmax, subtracted before its quantization)
        )
    raise ValueError(f"no quantized size for mode {mode!r}")
