"""GPU memory a preset needs, from the checkpoint's safetensors headers alone (no weights are read).

total = weights + KV cache + workspace + CUDA context + margin, where
  weights     per tensor: quantized Linears at exactly what bitsandbytes allocates (see
              `quantized_linear_nbytes`), every other float tensor at 2 bytes (16-bit), integers as stored;
  KV cache    T3's preallocated keys and values for prompt + max_tokens positions, 2 rows per utterance with
              CFG, 16-bit;
  workspace   the activation peak on top of weights and KV cache. T3 and S3Gen run one after the other and
              T3's cache is freed when decoding ends, so workspace = max(T3 activations,
              S3Gen activations - KV cache);
  context     the CUDA context's process memory (measured when a GPU is present, else a stated default);
  margin      MARGIN_FRACTION of weights + KV + workspace, for the caching allocator's slack.
Activation constants are marked with their calibration status; see benchmarks/memory.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatterbox_cli.checkpoint import DTYPE_BYTES, TensorInfo, safetensors_header
from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.presets import (
    COMPONENT_SOURCES,
    NF4_BLOCKSIZE,
    NF4_NESTED_BLOCKSIZE,
    Component,
    ComponentPlan,
    QuantPlan,
    linear_shapes_from_header,
    plan_for,
    preset_names,
    which_linears,
)

GiB = 1024**3
MiB = 1024**2

# ---- config facts the headers cannot tell (the one place they live) ------------------------------------
try:  # T3's head count is a config fact; its KV width is read from the k_proj shape
    from chatterbox_cli.models.t3 import T3Config as _T3Config

    T3_HEADS = _T3Config().n_heads
except ImportError:  # pragma: no cover - only while the model package is incomplete
    T3_HEADS = 16
ACT_BYTES = 2  # activations, KV cache and non-quantized weights are 16-bit on the GPU
TEXT_TOKENS_DEFAULT = 300  # text tokens per chunk assumed for the prompt length (a long chunk)
T3_PROMPT_EXTRA = 3  # start-text, stop-text and start-speech tokens around the text
S3GEN_PROMPT_TOKENS = 250  # S3Gen's reference-voice prompt: up to 10 s of speech at 25 tokens/s
TOKEN_MEL_RATIO = 2  # mel frames (50 Hz) per speech token (25 Hz)
MEL_HOP_SAMPLES = 480  # 24 kHz samples per mel frame
FLOW_ENC_HEADS = 8
FLOW_EST_HEADS = 8
FLOW_EST_CHANNELS = 256
HIFT_ISTFT_HOP = 4
HIFT_LAST_CHANNELS = 64  # 512 base channels halved at each of the 3 upsampling stages
HIFT_HARMONICS = 9  # sine source: fundamental + 8 harmonics

# ---- activation constants: "uncalibrated" until benchmarks/memory.py has measured them on a GPU ---------
CALIBRATION = "uncalibrated"
T3_LIVE_HIDDEN = 6  # hidden-sized activations alive at once in a prefill layer (x, norm, q, k, v, attn out)
T3_LIVE_MLP = 3  # intermediate-sized ones (gate, up, act*up)
T3_SCORE_BYTES = 4  # attention scores materialised in fp32 (worst case: no fused SDPA kernel)
FLOW_ENC_SCORE_TENSORS = 3  # relative-position attention: content scores, position scores, softmax
FLOW_EST_SCORE_TENSORS = 2  # scores and softmax
FLOW_EST_LIVE_CHANNELS = 8  # channel-sized [B, C, L] tensors alive in the U-Net (skips, resnet, FF x4)
HIFT_LIVE_TENSORS = 6  # [64, frames] tensors alive in the last stage (3 parallel resblocks + sums)
MARGIN_FRACTION = 0.10

# CUDA context when it cannot be measured (no GPU yet, or estimate before init). Consumer cards measure
# 0.3-0.5 GB; the H100 0.77 GB (DESIGN.md). The larger consumer figure, stated as a default.
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MiB

REPORT_COMPONENTS = ("t3", "s3gen", "voice_encoder")
# Components in each report entry; voice_encoder stands for the whole voice-preparation set.
_REPORT_PARTS: dict[str, tuple[Component, ...]] = {
    "t3": ("t3",),
    "s3gen": ("flow", "mel2wav"),
    "voice_encoder": ("voice_encoder", "s3tokenizer", "speaker_encoder"),
}
CHECKPOINT_FILES = ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors")


def quantized_linear_nbytes(mode: str, out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes 0.50.2 allocates for one quantized Linear's weight and quantization state
    (bias excluded: it stays a 16-bit tensor). Checked against real layers in tests/test_quantize.py."""
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


@dataclass
class ComponentEstimate:
    weights_bytes: int
    quantized_linear_bytes: int
    other_bytes: int
    quantized_layers: int
    mode: str


def component_weights(
    header: Mapping[str, TensorInfo], plan: ComponentPlan, prefix: str
) -> tuple[ComponentEstimate, list[str]]:
    """Weight bytes of one component's tensors (names starting with `prefix`) under `plan`; also returns the
    quantized layer names."""
    tensors = {n: i for n, i in header.items() if n.startswith(prefix)}
    linears = which_linears(plan, linear_shapes_from_header(tensors))
    quant_weights = {f"{name}.weight" for name in linears}
    q_bytes = 0
    other = 0
    for name, info in tensors.items():
        if name in quant_weights:
            q_bytes += quantized_linear_nbytes(plan.mode, info.shape[0], info.shape[1])
        elif info.dtype in ("F64", "F32", "F16", "BF16"):
            other += info.numel * ACT_BYTES
        else:
            other += info.numel * DTYPE_BYTES[info.dtype]
    mode = plan.mode if linears else "16bit"
    return ComponentEstimate(q_bytes + other, q_bytes, other, len(linears), mode), linears


@dataclass(frozen=True)
class T3Shape:
    n_layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    cond_len: int
    speech_vocab: int


def t3_shape(header: Mapping[str, TensorInfo]) -> T3Shape:
    layers = {int(m.group(1)) for n in header if (m := re.match(r"tfmr\.layers\.(\d+)\.", n))}
    try:
        q = header["tfmr.layers.0.self_attn.q_proj.weight"].shape
        k = header["tfmr.layers.0.self_attn.k_proj.weight"].shape
        gate = header["tfmr.layers.0.mlp.gate_proj.weight"].shape
        queries = header["cond_enc.perceiver.pre_attention_query"].shape
        speech_vocab = header["speech_head.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(
            f"t3_cfg.safetensors lacks tensor {e}; is it a Chatterbox T3 checkpoint?"
        ) from e
    # speaker embedding + perceiver outputs + emotion scalar
    return T3Shape(len(layers), q[1], k[0], gate[0], 1 + queries[-2] + 1, speech_vocab)


def kv_cache_bytes(shape: T3Shape, max_tokens: int, batch: int, cfg: bool, text_tokens: int) -> int:
    positions = shape.cond_len + text_tokens + T3_PROMPT_EXTRA + max_tokens
    rows = batch * (2 if cfg else 1)
    return 2 * shape.n_layers * rows * positions * shape.kv_dim * ACT_BYTES


def t3_workspace_bytes(shape: T3Shape, max_tokens: int, batch: int, cfg: bool, text_tokens: int) -> int:
    """Prefill is the activation peak of T3: all prompt positions go through each layer at once."""
    rows = batch * (2 if cfg else 1)
    prompt = shape.cond_len + text_tokens + T3_PROMPT_EXTRA
    capacity = prompt + max_tokens
    layer = rows * prompt * (T3_LIVE_HIDDEN * shape.hidden + T3_LIVE_MLP * shape.intermediate) * ACT_BYTES
    scores = rows * T3_HEADS * prompt * capacity * T3_SCORE_BYTES
    logits = rows * shape.speech_vocab * 4 * 4  # fp32 logits, CFG mix, penalties, probabilities
    return layer + scores + logits


def s3gen_workspace_bytes(max_tokens: int, batch: int, cfg: bool) -> int:
    """Peak of flow (encoder, then the CFM estimator) or HiFT, whichever is larger; they run in sequence."""
    frames = (S3GEN_PROMPT_TOKENS + max_tokens) * TOKEN_MEL_RATIO
    enc = batch * (FLOW_ENC_HEADS * frames * frames * ACT_BYTES * FLOW_ENC_SCORE_TENSORS)
    est_rows = batch * (2 if cfg else 1)
    est = est_rows * (
        FLOW_EST_HEADS * frames * frames * ACT_BYTES * FLOW_EST_SCORE_TENSORS
        + FLOW_EST_LIVE_CHANNELS * 4 * FLOW_EST_CHANNELS * frames * ACT_BYTES
    )
    samples = max_tokens * TOKEN_MEL_RATIO * MEL_HOP_SAMPLES
    hift = batch * (
        HIFT_LIVE_TENSORS * HIFT_LAST_CHANNELS * (samples // HIFT_ISTFT_HOP) * ACT_BYTES
        + 2 * HIFT_HARMONICS * samples * 4  # fp32 sine source and its noise
    )
    return max(enc, est, hift)


@dataclass
class PresetEstimate:
    components: dict[str, ComponentEstimate]
    kv_cache_bytes: int
    workspace_bytes: int
    cuda_context_bytes: int
    margin_bytes: int
    total_bytes: int
    fits: bool | None
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "components": {k: asdict(v) for k, v in self.components.items()},
            "kv_cache_bytes": self.kv_cache_bytes,
            "workspace_bytes": self.workspace_bytes,
            "cuda_context_bytes": self.cuda_context_bytes,
            "margin_bytes": self.margin_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "details": self.details,
        }


@dataclass
class EstimateReport:
    free_bytes: int | None
    presets: dict[str, PresetEstimate]
    chosen: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "free_bytes": self.free_bytes,
            "presets": {k: v.to_dict() for k, v in self.presets.items()},
            "chosen": self.chosen,
            "reason": self.reason,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def read_headers(checkpoint_folder: str | Path) -> dict[str, dict[str, TensorInfo]]:
    folder = Path(checkpoint_folder)
    headers = {}
    for name in CHECKPOINT_FILES:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing; the checkpoint folder needs {', '.join(CHECKPOINT_FILES)}"
            )
        headers[name] = safetensors_header(path)
    return headers


def estimate_plan(
    headers: Mapping[str, Mapping[str, TensorInfo]],
    plan: QuantPlan,
    *,
    max_tokens: int = 1000,
    batch: int = 1,
    cfg_weight: float = 0.5,
    free_bytes: int | None = None,
    text_tokens: int = TEXT_TOKENS_DEFAULT,
    cuda_context_bytes: int | None = None,
    prepare_voice: bool = False,
) -> PresetEstimate:
    """The estimate for one plan, from already-read headers ({file name: header})."""
    if max_tokens < 1 or batch < 1 or text_tokens < 0 or cfg_weight < 0:
        raise UsageError("max_tokens and batch must be >= 1, text_tokens and cfg_weight >= 0")
    parts: dict[Component, ComponentEstimate] = {}
    for comp, (file, prefix) in COMPONENT_SOURCES.items():
        parts[comp], _ = component_weights(headers[file], plan[comp], prefix)
    components = {}
    for key, members in _REPORT_PARTS.items():
        ests = [parts[m] for m in members]
        modes = {e.mode for e in ests}
        mode = modes.pop() if len(modes) == 1 else ",".join(f"{m}={parts[m].mode}" for m in members)
        components[key] = ComponentEstimate(
            sum(e.weights_bytes for e in ests),
            sum(e.quantized_linear_bytes for e in ests),
            sum(e.other_bytes for e in ests),
            sum(e.quantized_layers for e in ests),
            mode,
        )
    cfg = cfg_weight > 0
    shape = t3_shape(headers["t3_cfg.safetensors"])
    kv = kv_cache_bytes(shape, max_tokens, batch, cfg, text_tokens)
    t3_ws = t3_workspace_bytes(shape, max_tokens, batch, cfg, text_tokens)
    s3_ws = s3gen_workspace_bytes(max_tokens, batch, cfg)
    workspace = max(t3_ws, s3_ws - kv)
    resident = components["t3"].weights_bytes + components["s3gen"].weights_bytes
    voice_prep = components["voice_encoder"].weights_bytes
    weights = resident + (voice_prep if prepare_voice else 0)
    context = DEFAULT_CUDA_CONTEXT_BYTES if cuda_context_bytes is None else int(cuda_context_bytes)
    margin = int(MARGIN_FRACTION * (weights + kv + workspace))
    total = weights + kv + workspace + context + margin
    details: dict[str, object] = {
        "plan": plan.describe(),
        "parts": {c: asdict(e) for c, e in parts.items()},
        "t3_workspace_bytes": t3_ws,
        "s3gen_workspace_bytes": s3_ws,
        "voice_prep_bytes": voice_prep,
        "voice_prep_counted": prepare_voice,
        "cuda_context_measured": cuda_context_bytes is not None,
        "margin_fraction": MARGIN_FRACTION,
        "calibration": CALIBRATION,
        "max_tokens": max_tokens,
        "text_tokens": text_tokens,
        "batch": batch,
        "cfg": cfg,
    }
    fits = None if free_bytes is None else total <= free_bytes
    return PresetEstimate(components, kv, workspace, context, margin, total, fits, details)


def estimate(
    checkpoint_folder: str | Path,
    preset: str = "all",
    *,
    max_tokens: int = 1000,
    batch: int = 1,
    cfg_weight: float = 0.5,
    free_bytes: int | None = None,
    text_tokens: int = TEXT_TOKENS_DEFAULT,
    cuda_context_bytes: int | None = None,
    prepare_voice: bool = False,
    overrides: Mapping[str, str] | None = None,
) -> EstimateReport:
    """Estimate one preset (or "all" available presets) for the checkpoint in `checkpoint_folder`, and pick
    the highest-fidelity one that fits `free_bytes` (None: no GPU)."""
    headers = read_headers(checkpoint_folder)
    names = preset_names() if preset == "all" else [preset]
    presets = {}
    for name in names:
        presets[name] = estimate_plan(
            headers,
            plan_for(name, overrides),
            max_tokens=max_tokens,
            batch=batch,
            cfg_weight=cfg_weight,
            free_bytes=free_bytes,
            text_tokens=text_tokens,
            cuda_context_bytes=cuda_context_bytes,
            prepare_voice=prepare_voice,
        )
    report = EstimateReport(free_bytes, presets)
    report.chosen, report.reason = choose(report)
    return report


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def choose(report: EstimateReport) -> tuple[str | None, str]:
    """The highest-fidelity preset of the report that fits, and a one-line reason."""
    if report.free_bytes is None:
        return None, "no GPU: CPU"
    free = _gib(report.free_bytes)
    for name in preset_names():
        est = report.presets.get(name)
        if est is not None and est.fits:
            return name, f"{free} free; {name} needs {_gib(est.total_bytes)} → {name}"
    if not report.presets:
        return None, f"{free} free; no preset estimated → CPU"
    smallest = min(report.presets.items(), key=lambda kv: kv[1].total_bytes)
    return None, f"{free} free; even {smallest[0]} needs {_gib(smallest[1].total_bytes)} → CPU"


def measure_cuda_context_bytes(device_index: int = 0) -> int | None:
    """Process memory the CUDA context takes on `device_index`: NVML's figure for this process minus what
    torch's allocator has reserved. Initialises CUDA; None when there is no GPU or NVML cannot tell."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    torch.zeros(1, device=f"cuda:{device_index}")  # creates the context
    torch.cuda.synchronize(device_index)
    used = nvml_process_bytes(device_index, os.getpid())
    if used is None:
        return None
    return max(0, used - torch.cuda.memory_reserved(device_index))


def nvml_process_bytes(device_index: int, pid: int) -> int | None:
    """GPU memory NVML attributes to `pid` on the device with torch index `device_index`."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = _nvml_handle_for_torch_device(pynvml, device_index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
            return None
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def _nvml_handle_for_torch_device(pynvml, device_index: int):  # noqa: ANN001, ANN202
    """NVML handle of torch's device `device_index`, matched by UUID (CUDA_VISIBLE_DEVICES may renumber)."""
    import torch

    if torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(device_index).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except (AttributeError, RuntimeError, pynvml.NVMLError):
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)
