"""GPU memory a preset needs, from the checkpoint's safetensors headers alone (no weights are read).

total = weights + KV cache + workspace + CUDA context + margin, where
  weights     per tensor: quantized Linears at exactly what their kernels hold (see
              quant.plan.quantized_linear_nbytes), every other float tensor at 2 bytes (16-bit),
              integers as stored;
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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatterbox_cli.checkpoint import DTYPE_BYTES, TensorInfo, tensor_infos
from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.presets import EARLY_TOKENS, plan_for, preset_names, preset_of
from chatterbox_cli.quant.plan import (
    COMPONENT_SOURCES,
    Component,
    ComponentPlan,
    QuantPlan,
    linear_shapes_from_header,
    quantized_linear_nbytes,
    which_linears,
)
from chatterbox_cli.variants import ENGLISH, Variant, variant_of_folder

GiB = 1024**3
MiB = 1024**2

# ---- config facts the headers cannot tell (the one place they live) ------------------------------------
try:  # T3's head count is a config fact; its KV width is read from the k_proj shape
    from chatterbox_cli.models.t3 import T3Config as _T3Config

    T3_HEADS = _T3Config().n_heads
except ImportError:  # pragma: no cover - only while the model package is incomplete
    T3_HEADS = 16
ACT_BYTES = 2  # activations, KV cache and non-quantized weights are 16-bit on the GPU
FLOAT_BYTES = {"mel2wav": 4}  # except HiFT, kept in fp32 (service._load_s3gen says why)
TEXT_TOKENS_DEFAULT = 300  # text tokens per chunk assumed for the prompt length (a long chunk)
T3_PROMPT_EXTRA = 3  # start-text, stop-text and start-speech tokens around the text
S3GEN_PROMPT_TOKENS = 250  # S3Gen's reference-voice prompt: up to 10 s of speech at 25 tokens/s
TOKEN_MEL_RATIO = 2  # mel frames (50 Hz) per speech token (25 Hz)
MEL_HOP_SAMPLES = 480  # 24 kHz samples per mel frame
MEL_BINS = 80
FLOW_ENC_DIM = 512
FLOW_ENC_FF = 2048
FLOW_ENC_HEADS = 8
FLOW_EST_CHANNELS = 256
HIFT_ISTFT_HOP = 4
HIFT_LAST_CHANNELS = 64  # 512 base channels halved at each of the 3 upsampling stages
HIFT_SPEC_CHANNELS = 18  # real and imaginary parts of the source's 9-bin STFT
HIFT_HARMONICS = 9  # sine source: fundamental + 8 harmonics

# ---- calibration: measured peak workspace / formula, one 1,000-token utterance with CFG, batch 1 ----------
# `python benchmarks/calibrate_estimate.py memory.json` prints these from a benchmarks/memory.py run (fp16).
CALIBRATION = "NVIDIA H100 80GB HBM3, torch 2.11+cu130, 2026-11-25"
T3_WORKSPACE_SCALE = 0.46  # 38.4 MB measured / 82.8 MB counted: SDPA materialises no scores in prefill
S3GEN_WORKSPACE_SCALE = 1.42  # 197.4 MB measured / 138.8 MB counted: cuDNN conv workspaces in fp32 HiFT
# ---- activation counts (the formulas' shape terms) -------------------------------------------------------
T3_LIVE_HIDDEN = 6  # hidden-sized activations alive at once in a prefill layer (x, norm, q, k, v, attn out)
T3_LIVE_MLP = 3  # intermediate-sized ones (gate, up, act*up)
T3_SCORE_BYTES = 4  # attention scores materialised in fp32 (worst case: no fused SDPA kernel)
# S3Gen (see s3gen_stage_bytes; counts checked on CPU with a live-tensor tracker, fp32, 400-750 tokens)
FLOW_ENC_LIVE_ROWS = 8  # [B, T, 512] in an attention layer: x, its norm, q, k, v, q+u, q+v, output
FLOW_ENC_POS_TENSORS = 2  # [2T-1, 512]: the relative sinusoids and their projection
FLOW_ENC_BIAS_TENSORS = 2  # [B, H, n, T] per query block: the bias, and a kernel-side copy (CUDA pads it)
FLOW_ENC_FF_LIVE_ROWS = 2  # [B, T, 512] in a feed-forward layer (x, its norm), beside two [B, T, 2048]
FLOW_EST_LIVE_CHANNELS = 13  # [2B, T, 256]-units alive in a U-Net transformer (h, resnet out, x, norm,
#                              q, k, v, attention out at 2 units each, projection); SDPA is fused
FLOW_EST_MEL_TENSORS = 6  # [2B, 80, T] in the Euler loop (x twice, mu, cond, velocity, x_t)
HIFT_LIVE_TENSORS = 5  # [B, 64, span] in the last stage's resblocks: input, sum, running x, conv, Snake
HIFT_ISTFT_ROW_BYTES = 144  # per last-stage position of one row: fp32 magnitude, phase, complex spectrum
MARGIN_FRACTION = 0.10

# CUDA context when it cannot be measured (no GPU yet, or estimate before init). Consumer cards measure
# 0.3-0.5 GB; the H100 0.77 GB (DESIGN.md). The larger consumer figure, stated as a default.
DEFAULT_CUDA_CONTEXT_BYTES = 500 * MiB
# What the CUDA libraries add to a context measured at start once they are used (cuBLAS and cuDNN handles,
# lazily loaded kernels): NVML's process memory less torch's reserved memory was 0.70 GiB after a chunk for
# every preset, against 0.60 GiB for the context alone (benchmarks/small_card.py, H100, 2026-12-06).
CUDA_LIBRARIES_BYTES = 100 * MiB

REPORT_COMPONENTS = ("t3", "s3gen", "voice_encoder")
# Components in each report entry; voice_encoder stands for the whole voice-preparation set.
_REPORT_PARTS: dict[str, tuple[Component, ...]] = {
    "t3": ("t3",),
    "s3gen": ("flow", "mel2wav"),
    "voice_encoder": ("voice_encoder", "s3tokenizer", "speaker_encoder"),
}
WEIGHT_ROLES = ("t3", "s3gen", "ve")  # the variant files whose tensor shapes the estimate reads


@dataclass
class ComponentEstimate:
    weights_bytes: int
    quantized_linear_bytes: int
    other_bytes: int
    quantized_layers: int
    mode: str
    resident: bool = True  # False: in host memory while T3 decodes (presets.Preset.take_turns)


def component_weights(
    header: Mapping[str, TensorInfo], plan: ComponentPlan, prefix: str, float_bytes: int = ACT_BYTES
) -> tuple[ComponentEstimate, list[str]]:
    """Weight bytes of one component's tensors (names starting with `prefix`) under `plan`; also returns the
    quantized layer names."""
    tensors = {n: i for n, i in header.items() if n.startswith(prefix)}
    shapes = linear_shapes_from_header(tensors)
    linears = which_linears(plan, shapes)
    quant_weights = {f"{name}.weight" for name in linears}
    group = 128
    if plan.mode == "awq" and linears:
        from chatterbox_cli.quant.awq import group_size_for

        group = group_size_for([shapes[n][1] for n in linears])
    q_bytes = 0
    other = 0
    for name, info in tensors.items():
        if name in quant_weights:
            q_bytes += quantized_linear_nbytes(plan.mode, info.shape[0], info.shape[1], group)
        elif info.dtype in ("F64", "F32", "F16", "BF16"):
            other += info.numel * float_bytes
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
    """T3's dimensions from its config, which is read from the header (models.loading.infer_t3_config)."""
    from chatterbox_cli.models.loading import infer_t3_config

    c = infer_t3_config(dict(header))
    kv_dim = c.n_heads * c.head_dim
    return T3Shape(c.n_layers, c.hidden_size, kv_dim, c.intermediate_size, c.cond_len, c.speech_vocab_size)


def t3_as_loaded(header: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The T3 header as the service puts its tensors on the GPU: weights stored transposed (GPT-2's Conv1D)
    in nn.Linear's [out, in], tensors never loaded (models/loading.py; the text head, T3.drop_text_head)
    or kept in host memory (the text embedding, T3.keep_text_table_on_host) left out."""
    from chatterbox_cli.models.loading import infer_t3_config
    from chatterbox_cli.models.t3 import TEXT_HEAD, TEXT_TABLE, stored_transposed, stored_unused

    config = infer_t3_config(dict(header))
    flipped, unused = stored_transposed(config), {*stored_unused(config), TEXT_HEAD, TEXT_TABLE}
    return {
        name: TensorInfo(info.dtype, info.shape[::-1]) if name in flipped else info
        for name, info in header.items()
        if name not in unused
    }


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
    return int(T3_WORKSPACE_SCALE * (layer + scores + logits))


def s3gen_stage_bytes(
    max_tokens: int, batch: int, prompt_tokens: int = S3GEN_PROMPT_TOKENS, act_bytes: int = ACT_BYTES
) -> dict[str, int]:
    """Bytes of the tensors alive at the peak of each S3Gen stage, for `batch` rows of `max_tokens` tokens.

    encoder    the upsampling Conformer at T = 2 * (prompt + tokens) frames; attention runs in query blocks
               of n rows whose raw position scores [B, H, n, T+n-1] fit ATTN_BLOCK_BYTES (conformer.py);
               B is the flow's rows, the batch with its blank rows (s3gen.flow_batch_rows);
    estimator  one Euler step of the CFM U-Net on 2B rows (the flow's own CFG, always on), fused SDPA;
    hift       the vocoder on 2 * tokens mel frames; it runs one row at a time (its last stage at 120
               positions per frame): the decoder on one chunk of DECODE_CHUNK_BYTES (hifigan.py) with its
               context beside the row's 18-channel spectra, or the row's iSTFT, or making its float32
               source (on CUDA rows of one length together, up to DECODE_CHUNK_BYTES of it); plus the
               batch's float32 waveform and source outputs. (One generator for a whole batch would add
               its [B, 9, samples] float32 noise; per-row generators draw row by row.)
    """
    from chatterbox_cli.models.s3gen.conformer import ATTN_BLOCK_BYTES, query_block_size
    from chatterbox_cli.models.s3gen.hifigan import DECODE_CHUNK_BYTES, DECODE_CONTEXT_FRAMES, SOURCE_ROWS
    from chatterbox_cli.models.s3gen.s3gen import flow_batch_rows

    e = act_bytes
    flow = flow_batch_rows(batch)
    frames = (prompt_tokens + max_tokens) * TOKEN_MEL_RATIO
    n = query_block_size(flow, FLOW_ENC_HEADS, frames, e, ATTN_BLOCK_BYTES)
    pos = FLOW_ENC_POS_TENSORS * (2 * frames - 1) * FLOW_ENC_DIM * e
    block = flow * FLOW_ENC_HEADS * n * ((frames + n - 1) + FLOW_ENC_BIAS_TENSORS * frames) * e
    attention = FLOW_ENC_LIVE_ROWS * flow * frames * FLOW_ENC_DIM * e + pos + block
    feed_forward = flow * frames * (FLOW_ENC_FF_LIVE_ROWS * FLOW_ENC_DIM + 2 * FLOW_ENC_FF) * e + pos
    rows = 2 * flow
    estimator = (
        rows * frames * (FLOW_EST_LIVE_CHANNELS * FLOW_EST_CHANNELS + FLOW_EST_MEL_TENSORS * MEL_BINS) * e
    )
    mel_frames = max_tokens * TOKEN_MEL_RATIO
    samples = mel_frames * MEL_HOP_SAMPLES
    rate = MEL_HOP_SAMPLES // HIFT_ISTFT_HOP
    positions = samples // HIFT_ISTFT_HOP + 1
    h = FLOAT_BYTES["mel2wav"]  # HiFT runs in float32
    chunk = max(2 * DECODE_CONTEXT_FRAMES, DECODE_CHUNK_BYTES // (HIFT_LAST_CHANNELS * rate * h))
    span = min(positions, rate * (chunk + 2 * DECODE_CONTEXT_FRAMES) + 1)
    spectrum = positions * HIFT_SPEC_CHANNELS * h  # [1, 18, positions]
    # chunked: the source's STFT, and the decoded chunks so far (views of spans with their context)
    spectra = spectrum if span == positions else int(spectrum * (1 + (span - 1) / (rate * chunk)))
    decode = span * HIFT_LIVE_TENSORS * HIFT_LAST_CHANNELS * h + spectra
    istft = spectrum + HIFT_ISTFT_ROW_BYTES * positions + samples * 4  # and the row's waveform
    row_source = samples * 4  # the row's float32 excitation, alive while it is decoded
    outputs = 2 * batch * samples * 4  # float32 waveform and source of every row
    row = SOURCE_ROWS * samples * 4
    source = max(row, min(batch * row, DECODE_CHUNK_BYTES))  # hifigan.HiFTGenerator._source_groups
    return {
        "encoder": max(attention, feed_forward),
        "estimator": estimator,
        "hift": outputs + max(decode + row_source, istft + row_source, source),
    }


def s3gen_workspace_bytes(max_tokens: int, batch: int, cfg: bool) -> int:
    """Peak of the S3Gen stages (they run in sequence). `cfg` is T3's guidance: S3Gen's flow always runs
    its own conditional and unconditional rows, so it does not change S3Gen's workspace."""
    del cfg
    return int(S3GEN_WORKSPACE_SCALE * max(s3gen_stage_bytes(max_tokens, batch).values()))


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
    # why the chooser passes this preset over whatever it needs (AWQ without its weights yet), else None
    missing: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "components": {k: asdict(v) for k, v in self.components.items()},
            "kv_cache_bytes": self.kv_cache_bytes,
            "workspace_bytes": self.workspace_bytes,
            "cuda_context_bytes": self.cuda_context_bytes,
            "margin_bytes": self.margin_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "missing": self.missing,
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


def _folder_variant(folder: Path) -> Variant:
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return variant_of_folder(present) or ENGLISH


def read_headers(
    checkpoint_folder: str | Path, variant: Variant | None = None
) -> dict[str, dict[str, TensorInfo]]:
    """Tensor shapes of the weight files, by role ("t3", "s3gen", "ve"), for `variant` (None: the one
    whose files the folder holds, English if neither). Reads headers (.safetensors) or maps (.pt)."""
    folder = Path(checkpoint_folder)
    variant = variant or _folder_variant(folder)
    headers = {}
    for role in WEIGHT_ROLES:
        path = folder / variant.file(role)
        if not path.is_file():
            needs = ", ".join(variant.file(r) for r in WEIGHT_ROLES)
            raise CheckpointError(f"{path} is missing; the {variant.name} checkpoint folder needs {needs}")
        headers[role] = tensor_infos(path)
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
    """The estimate for one plan, from already-read headers ({file role: header}, see read_headers)."""
    for name, value, least in (
        ("max_tokens", max_tokens, 1),
        ("batch", batch, 1),
        ("text_tokens", text_tokens, 0),
        ("cfg_weight", cfg_weight, 0),
    ):
        if not least <= value < math.inf:
            raise UsageError(f"{name} must be a finite number >= {least}, got {value}")
    parts: dict[Component, ComponentEstimate] = {}
    loaded = {**headers, "t3": t3_as_loaded(headers["t3"])}  # as the model holds the T3 tensors
    for comp, (role, prefix) in COMPONENT_SOURCES.items():
        float_bytes = FLOAT_BYTES.get(comp, ACT_BYTES)
        parts[comp], _ = component_weights(loaded[role], plan[comp], prefix, float_bytes)
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
    shape = t3_shape(headers["t3"])
    kv = kv_cache_bytes(shape, max_tokens, batch, cfg, text_tokens)
    t3_ws = t3_workspace_bytes(shape, max_tokens, batch, cfg, text_tokens)
    s3_ws = s3gen_workspace_bytes(max_tokens, batch, cfg)
    # The peak is T3's (KV cache + workspace) or S3Gen's, over the resident weights; a parked vocoder is
    # off the GPU during T3. When T3 and S3Gen take turns, both turns hold the weight arena (turns.Turns: as
    # large as the larger of the two), the T3 turn T3's KV cache and prefill on top, the S3Gen turn S3Gen's
    # workspace: the larger of the two, counted as the arena and KV cache plus the S3Gen turn's excess as
    # workspace.
    preset = preset_of(plan)
    take_turns = preset is not None and preset.take_turns
    parked = parts["mel2wav"].weights_bytes if preset is not None and preset.park_vocoder else 0
    t3_weights, s3gen_weights = components["t3"].weights_bytes, components["s3gen"].weights_bytes
    # The first chunk's early piece is rendered while that chunk's KV cache waits on the GPU (vocoder on the
    # GPU); taking turns, with S3Gen in T3's place.
    early_tokens = preset.early_tokens if preset is not None else EARLY_TOKENS
    early_kv = kv_cache_bytes(shape, max_tokens, 1, cfg, text_tokens)
    early = early_kv + s3gen_workspace_bytes(early_tokens, 1, cfg) if early_tokens else 0
    if take_turns:
        resident = max(t3_weights, s3gen_weights)
        workspace = max(t3_ws, max(s3_ws, early) - kv, 0)
        components["s3gen"].resident = False
    else:
        workspace = max(t3_ws - parked, s3_ws - kv, early - kv, 0)
        resident = t3_weights + s3gen_weights
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
        "vocoder_parked_bytes": parked,
        "take_turns": take_turns,
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
    variant: Variant | None = None,
) -> EstimateReport:
    """Estimate one preset (or "all" available presets) for the checkpoint in `checkpoint_folder` (of
    `variant`; None: see read_headers), and pick the highest-fidelity one that fits `free_bytes` (None: no
    GPU)."""
    headers = read_headers(checkpoint_folder, variant)
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
    if "awq" in presets:
        from chatterbox_cli.quant import awq_store

        folder = Path(checkpoint_folder)
        if awq_store.find(folder, folder / (variant or _folder_variant(folder)).file("t3")) is None:
            presets["awq"].missing = "no AWQ weights yet (chatterbox quantize --method awq)"
    report = EstimateReport(free_bytes, presets)
    report.chosen, report.reason = choose(report)
    return report


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def choose(report: EstimateReport) -> tuple[str | None, str]:
    """The highest-fidelity preset of the report that fits and has what it needs, and a one-line reason."""
    if report.free_bytes is None:
        return None, "no GPU: CPU"
    free = _gib(report.free_bytes)
    for name in preset_names():
        est = report.presets.get(name)
        if est is not None and est.fits and est.missing is None:
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
