"""AWQ: activation-aware 4-bit weight quantization (Lin et al., 2023, arXiv:2306.00978) for T3's Llama
backbone, with its on-disk format and its kernels.

The idea. A Linear's output error from quantizing its weight W [out, in] is dominated by the input channels
whose activations are large. For any positive per-input-channel vector s,
    W x = (W diag(s)) (x / s),
so the columns of salient channels can be scaled up before quantization (and their inputs down) without
changing the float function: those columns then use more of the 4-bit grid. The division x / s is folded
exactly into whatever produces x: the RMSNorm weight before q/k/v and gate/up, v's output rows before o
(attention mixes value rows linearly, per channel), up's output rows before down (silu(gate) * up is
linear in up). Per group of Linears sharing an input, s = mean|x|^alpha per channel (normalised so that
max(s) * min(s) = 1), with alpha picked from a grid by the output error on calibration rows; alpha = 0 is
plain round-to-nearest, so the search never picks worse than that on its sample. Then each output row's
per-group range is shrunk by the ratio (from a grid) that minimises that group's share of the output
error, and the weight is quantized asymmetrically, group-wise along the input dimension.

Order of work: one calibration pass over the float model records, per group of Linears sharing an input,
the mean |x| per channel and a uniform sample of input rows (`Calibration`). All searches happen in the
original coordinates (a group's fold only changes its own Linears' input columns and the rows of the
Linear or norm before it, and row scaling commutes with per-row quantization), all folds are applied, then
each Linear is clipped and quantized with its sample divided by its group's s.

On disk: AutoAWQ's "GEMM" layout, which other tools read, per Linear `<name>.qweight`, `.qzeros`, `.scales`
(see `pack_gemm`), plus the 16-bit `<norm>.weight` tensors the scales were folded into (they differ from
the checkpoint's). The quantization config is stored in the safetensors metadata (`quantization_config`,
JSON; what `load_awq` reads) and written beside the file as `quantization_config.json` for tools that look
for it there.

At run time `AwqLinear` repacks the stored layout once for its kernel: core torch's tinygemm
`_weight_int4pack_mm` on sm80+ GPUs, `_weight_int4pack_mm_for_cpu` on the CPU (both with bf16
activations), on older GPUs (sm75: Turing) a Triton GEMV for up to 4 rows (quant/awq_triton.py) and
dequantize-then-matmul for more, else dequantize-then-matmul.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from chatterbox_cli.models.conds import T3Cond
    from chatterbox_cli.models.t3 import T3

FORMAT = "chatterbox-cli-awq"
FORMAT_VERSION = "1"
CONFIG_FILE = "quantization_config.json"  # written beside the safetensors file
PACKED_KEYS = ("qweight", "qzeros", "scales")
PACK = 8  # 4-bit values per int32
# AutoAWQ's GEMM layout packs 8 consecutive output columns c0..c7 into one int32, nibble i (bits 4i..4i+3)
# holding column AWQ_ORDER[i]: the even columns in the low half-word, then the odd ones. Its inverse gives,
# per column, the nibble that holds it.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(c) for c in range(PACK))  # (0, 4, 1, 5, 2, 6, 3, 7)
KERNELS = ("int4pack-cuda", "int4pack-cpu", "triton-gemv", "dequant-matmul")
TINYGEMM_GROUPS = (32, 64, 128, 256)  # group sizes both int4pack kernels take


@dataclass(frozen=True)
class AwqConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    alpha_grid: tuple[float, ...] = tuple(i / 19 for i in range(20))  # 20 points in [0, 1]
    clip_grid: tuple[float, ...] = tuple(1 - i / 40 for i in range(21))  # max/min shrunk to 100 % ... 50 %
    # q and k feed a softmax through their dot products, which a per-row output MSE does not measure;
    # their ranges are not clipped (GPT-2's c_attn holds q, k and v in one weight).
    no_clip: tuple[str, ...] = ("q_proj", "k_proj", "c_attn")
    sample_rows: int = 512  # input rows kept per group for the searches
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bits != 4 or not self.zero_point:
            raise ValueError("AWQ here is 4-bit with zero points (asymmetric) only")
        if self.group_size < PACK or self.group_size % PACK:
            raise ValueError(f"group_size must be a multiple of {PACK}, got {self.group_size}")
        if 0.0 not in self.alpha_grid or 1.0 not in self.clip_grid:
            raise ValueError("the grids must hold alpha 0 and clip ratio 1 (round-to-nearest, no clipping)")

    def quantization_config(self) -> dict[str, object]:
        """The config other tools read (the `quantization_config` of an AutoAWQ GEMM checkpoint)."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": "gemm",
        }

    @classmethod
    def from_quantization_config(cls, config: Mapping[str, object]) -> AwqConfig:
        method, version = config.get("quant_method"), str(config.get("version", "gemm")).lower()
        if method != "awq" or version != "gemm":
            raise ValueError(f"not an AWQ GEMM config: quant_method {method!r}, version {version!r}")
        return cls(
            bits=int(config["bits"]),  # type: ignore[call-overload]
            group_size=int(config["group_size"]),  # type: ignore[call-overload]
            zero_point=bool(config.get("zero_point", True)),
        )


# --- 4-bit group quantization --------------------------------------------------------------------------


def quantize_groups(
    w: Tensor, group: int, clip: Tensor | float = 1.0, bits: int = 4
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest over groups of `group` input channels: w [out, in] ->
    q uint8 [out, in] in 0..15, scales float32 [out, in/group] (values fp16 can hold, as stored),
    zeros uint8 [out, in/group], with w ~ (q - zero) * scale.

    The grid spans each group's [min, max] widened to include 0 (so the zero point is one of the 16
    levels); `clip` [out, in/group] (or one number) shrinks that range before the grid is laid.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the group size {group}")
    top = (1 << bits) - 1
    g = w.detach().float().reshape(out_f, in_f // group, group)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    hi, lo = g.amax(-1).clamp(min=0) * clip, g.amin(-1).clamp(max=0) * clip
    scales = ((hi - lo) / top).clamp(min=1e-5).half().float()
    zeros = torch.round(-lo / scales).clamp(0, top)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, top)
    return q.reshape(out_f, in_f).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize(q: Tensor, scales: Tensor, zeros: Tensor, group: int) -> Tensor:
    """(q - zero) * scale as float32 [out, in]. Exact: |q - zero| <= 15 times an fp16 scale fits float32."""
    out_f, in_f = q.shape
    g = q.float().reshape(out_f, in_f // group, group)
    return ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


def fake_quantize(w: Tensor, group: int, clip: Tensor | float = 1.0) -> Tensor:
    """w quantized and dequantized (float32)."""
    return dequantize(*quantize_groups(w, group, clip), group)


# --- AutoAWQ GEMM layout -------------------------------------------------------------------------------


def _pack_columns(values: Tensor) -> Tensor:
    """[rows, cols] of 4-bit values -> int32 [rows, cols / 8] in AWQ nibble order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns are not a multiple of {PACK}")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)
    word = torch.zeros(rows, cols // PACK, dtype=torch.int64, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):
        word |= (v[..., column] & 0xF) << (4 * nibble)
    # the same 32 bits as a signed int32 (nibble 7 reaches the sign bit)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def _unpack_columns(words: Tensor) -> Tensor:
    """int32 [rows, n] in AWQ nibble order -> uint8 [rows, 8n]."""
    shifts = torch.tensor([4 * AWQ_NIBBLE_OF_COLUMN[c] for c in range(PACK)], device=words.device)
    values = (words[..., None].to(torch.int64) >> shifts) & 0xF
    return values.reshape(words.shape[0], -1).to(torch.uint8)


def pack_gemm(q: Tensor, scales: Tensor, zeros: Tensor) -> dict[str, Tensor]:
    """AutoAWQ GEMM tensors of one Linear from q [out, in], scales and zeros [out, in/group]:
    qweight int32 [in, out/8], qzeros int32 [in/group, out/8] (both in AWQ nibble order along the output
    dim), scales fp16 [in/group, out]."""
    return {
        "qweight": _pack_columns(q.t()),
        "qzeros": _pack_columns(zeros.t()),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def unpack_gemm(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Inverse of pack_gemm: q uint8 [out, in], scales fp16 [out, in/group], zeros uint8 [out, in/group],
    and the group size."""
    in_f, groups = qweight.shape[0], qzeros.shape[0]
    out_f = qweight.shape[1] * PACK
    if in_f % groups or tuple(scales.shape) != (groups, out_f) or qzeros.shape[1] * PACK != out_f:
        raise ValueError(
            f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not describe one AWQ GEMM layer"
        )
    q = _unpack_columns(qweight).t().contiguous()
    zeros = _unpack_columns(qzeros).t().contiguous()
    return q, scales.t().contiguous(), zeros, in_f // groups


# --- calibration ---------------------------------------------------------------------------------------


def calibration_texts() -> list[str]:
    """The shipped calibration sentences (short and long, one per line)."""
    text = resources.files("chatterbox_cli.quant").joinpath("calibration_texts.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class ChannelStats:
    """What one Linear's inputs looked like: sum |x| per input channel over `count` rows, and a uniform
    sample of at most `Calibration.sample_rows` rows (the rows with the smallest random keys: every row
    seen is equally likely to be kept)."""

    abs_sum: Tensor  # float64 [in]
    count: int
    rows: Tensor  # float32 [<= sample_rows, in]
    keys: Tensor  # float32 [<= sample_rows]

    @property
    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


class _Recorder(nn.Module):
    """Stands in for a Linear while calibrating: records its input, then runs it. Not an nn.Linear, so the
    backbone's fast paths that bypass a Linear's forward (add_linear_) call it."""

    def __init__(self, linear: nn.Module, record: Callable[[Tensor], None]) -> None:
        super().__init__()
        self.linear = linear
        self.record = record

    def forward(self, x: Tensor) -> Tensor:
        self.record(x)
        return self.linear(x)


class Calibration:
    """Per-Linear input statistics, recorded while a callable runs the model."""

    def __init__(self, sample_rows: int = 512, seed: int = 0) -> None:
        self.sample_rows = sample_rows
        self.stats: dict[str, ChannelStats] = {}
        self._gen = torch.Generator().manual_seed(seed)

    def __getitem__(self, name: str) -> ChannelStats:
        if name not in self.stats:
            raise KeyError(f"no calibration data for {name}; record it first")
        return self.stats[name]

    def add(self, name: str, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        keys = torch.rand(rows.shape[0], generator=self._gen)
        old = self.stats.get(name)
        if old is None:
            old = ChannelStats(torch.zeros(rows.shape[1], dtype=torch.float64), 0, rows[:0], keys[:0])
        rows, keys = torch.cat((old.rows, rows)), torch.cat((old.keys, keys))
        if keys.numel() > self.sample_rows:
            keys, keep = keys.topk(self.sample_rows, largest=False)
            rows = rows[keep]
        abs_sum = old.abs_sum + x.detach().reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64).cpu()
        self.stats[name] = ChannelStats(abs_sum, old.count + x.numel() // x.shape[-1], rows, keys)

    @contextmanager
    def recording(self, module: nn.Module, names: Sequence[str]) -> Iterator[None]:
        """Inside the block, the named Linears of `module` record their inputs."""
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for name in names:
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                linear = getattr(parent, attr)
                setattr(parent, attr, _Recorder(linear, lambda x, name=name: self.add(name, x)))
                swapped.append((parent, attr, linear))
            yield
        finally:
            for parent, attr, linear in reversed(swapped):
                setattr(parent, attr, linear)

    def collect(self, module: nn.Module, names: Sequence[str], run: Callable[[], object]) -> Calibration:
        """Run `run()` (which runs `module`) with the named Linears recording; returns self."""
        with torch.no_grad(), self.recording(module, names):
            run()
        return self


# --- which layers share an input, and folding -----------------------------------------------------------


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the module that makes it (a norm, or a Linear whose output
    rows are that input's channels); None where nothing linear makes it (GPT-2's GELU before its MLP's
    c_proj, its attention's c_proj behind a fused q|k|v): then no scales, only the clip search."""

    prev: str | None
    linears: tuple[str, ...]

    @property
    def source(self) -> str:
        """The Linear whose input calibration records for the group."""
        return self.linears[0]


def llama_scale_groups(backbone: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The four groups of each Llama decoder layer of `backbone` (module names prefixed with `prefix`)."""
    groups = []
    for i, layer in enumerate(backbone.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "qkv_weight", None) is not None or getattr(mlp, "gate_up_weight", None) is not None:
            raise ValueError("calibrate and quantize before fuse_projections: fused q/k/v bypass the Linears")
        if attn.v_proj.out_features != attn.o_proj.in_features:
            # grouped-query attention: one v channel feeds several o channels, and v->o needs a repeat
            raise ValueError("v_proj and o_proj widths differ (grouped-query attention): v->o cannot fold")
        p = f"{prefix}layers.{i}."
        groups += [
            ScaleGroup(
                p + "input_layernorm", tuple(p + f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
            ),
            ScaleGroup(p + "self_attn.v_proj", (p + "self_attn.o_proj",)),
            ScaleGroup(p + "post_attention_layernorm", (p + "mlp.gate_proj", p + "mlp.up_proj")),
            ScaleGroup(p + "mlp.up_proj", (p + "mlp.down_proj",)),
        ]
    return groups


def gpt2_scale_groups(backbone: nn.Module, prefix: str) -> list[ScaleGroup]:
    """Each GPT-2 block of `backbone`: ln_1 -> c_attn and ln_2 -> c_fc are scaled; attn.c_proj (its v rows
    live inside the fused c_attn, beside q and k) and mlp.c_proj (after a GELU) are only clipped."""
    groups = []
    for i in range(len(backbone.h)):
        p = f"{prefix}h.{i}."
        groups += [
            ScaleGroup(p + "ln_1", (p + "attn.c_attn",)),
            ScaleGroup(None, (p + "attn.c_proj",)),
            ScaleGroup(p + "ln_2", (p + "mlp.c_fc",)),
            ScaleGroup(None, (p + "mlp.c_proj",)),
        ]
    return groups


def t3_scale_groups(t3: T3) -> list[ScaleGroup]:
    if t3.config.backbone == "gpt2":
        return gpt2_scale_groups(t3.tfmr, "tfmr.")
    return llama_scale_groups(t3.tfmr, "tfmr.")


@torch.no_grad()
def fold_scales(module: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """Divide what produces the group's input by s (a norm's weight and bias, or a Linear's output rows)
    and multiply the group's Linears' input columns by s: the float function is unchanged."""
    if group.prev is None:
        return
    prev = module.get_submodule(group.prev)
    rows = isinstance(prev, nn.Linear)
    for p in (prev.weight, getattr(prev, "bias", None)):
        if p is not None:
            p.div_((s[:, None] if rows and p.dim() == 2 else s).to(p))
    for name in group.linears:
        weight = module.get_submodule(name).weight
        weight.mul_(s.to(weight))


# --- searches ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleSearch:
    scales: Tensor  # float32 [in]
    alpha: float
    error: float  # mean squared output error at the chosen alpha, on the sampled rows
    rtn_error: float  # the same at alpha 0 (plain round-to-nearest)


def search_scales(x_mean: Tensor, rows: Tensor, weights: Sequence[Tensor], config: AwqConfig) -> ScaleSearch:
    """The per-input-channel s = x_mean^alpha (alpha from the grid) that minimises the summed output error
    of the weights quantized with their columns times s, on `rows` divided by s."""
    w = torch.cat([t.detach().float() for t in weights])
    x = rows.to(w.device, torch.float32)
    reference = x @ w.t()
    x_mean = x_mean.to(w.device, torch.float32)
    x_mean = x_mean.clamp(min=1e-4 * float(x_mean.max().clamp(min=1e-30)))
    best: tuple[float, float, Tensor] | None = None
    rtn = math.inf
    for alpha in config.alpha_grid:
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        effective = fake_quantize(w * s, config.group_size) / s
        error = float((x @ effective.t() - reference).pow(2).mean())
        if alpha == 0.0:
            rtn = error
        if best is None or error < best[1]:
            best = (alpha, error, s)
    assert best is not None
    return ScaleSearch(best[2], best[0], best[1], rtn)


def search_clip(w: Tensor, rows: Tensor, config: AwqConfig, chunk: int = 256) -> Tensor:
    """Per (output row, group) ratio [out, in/group] from the clip grid that minimises that group's share
    of the output error, sum over rows of (x_g . (w_g - Q(w_g)))^2."""
    out_f, in_f = w.shape
    g = config.group_size
    x = rows.to(w.device, torch.float32).reshape(-1, in_f // g, g)
    best = torch.ones(out_f, in_f // g, device=w.device)
    for start in range(0, out_f, chunk):
        wc = w[start : start + chunk].detach().float()
        grouped = wc.reshape(wc.shape[0], -1, g)
        lowest = torch.full(grouped.shape[:2], math.inf, device=w.device)
        for ratio in config.clip_grid:
            diff = grouped - fake_quantize(wc, g, ratio).reshape(grouped.shape)
            error = torch.einsum("nkg,okg->okn", x, diff).pow(2).sum(-1)
            better = error < lowest
            lowest = torch.where(better, error, lowest)
            best[start : start + chunk][better] = ratio
    return best


# --- the whole model -----------------------------------------------------------------------------------


def calibrate(
    module: nn.Module, groups: Sequence[ScaleGroup], run: Callable[[], object], config: AwqConfig
) -> Calibration:
    """Record each group's input while `run()` runs `module` (float weights, projections not fused)."""
    return Calibration(config.sample_rows, config.seed).collect(module, [g.source for g in groups], run)


def t3_calibration_run(
    t3: T3,
    cond: T3Cond,
    text_tokens: Sequence[Tensor],
    speech_tokens: Sequence[Tensor] | None = None,
    *,
    max_new_tokens: int = 300,
    cfg: bool = True,
    seed: int = 0,
) -> Callable[[], None]:
    """A `run` for `calibrate`: T3 teacher-forced over each text (wrapped text tokens [1, T] or [T]) and
    its speech tokens, with the unconditional CFG row as decoding has it (`cfg`). Speech tokens not given
    are decoded here first (with T3's default sampling, seeded), outside the recording."""
    texts = [torch.atleast_2d(t).to(t3.device) for t in text_tokens]
    if speech_tokens is None:  # all texts at once, each with its own seeded generator
        speech_tokens = t3.generate_batch(
            texts,
            cond,
            max_new_tokens=max_new_tokens,
            cfg_weight=0.5 if cfg else 0.0,
            generators=[torch.Generator(t3.device).manual_seed(seed + i) for i in range(len(texts))],
        )
    start = t3.config.start_speech_token
    speech = [
        torch.cat((torch.tensor([start]), s.reshape(-1).cpu())).to(t3.device)[None] for s in speech_tokens
    ]

    def run() -> None:
        for text, tokens in zip(texts, speech, strict=True):
            t3(text, tokens, cond, cfg=cfg)

    return run


def search_and_fold(
    module: nn.Module, groups: Sequence[ScaleGroup], calibration: Calibration, config: AwqConfig
) -> list[tuple[ScaleGroup, ScaleSearch]]:
    """Search every group's scales in the original coordinates, then fold them all into `module`."""
    searches = []
    for group in groups:
        stats = calibration[group.source]
        weights = [module.get_submodule(n).weight for n in group.linears]
        grid = config.alpha_grid if group.prev is not None else (0.0,)  # alpha 0: s = 1, nothing to fold
        search = search_scales(stats.mean_abs, stats.rows, weights, replace(config, alpha_grid=grid))
        searches.append((group, search))
    for group, search in searches:
        fold_scales(module, group, search.scales)
    return searches


def quantize_linears(
    module: nn.Module,
    searches: Sequence[tuple[ScaleGroup, ScaleSearch]],
    calibration: Calibration,
    config: AwqConfig,
) -> dict[str, dict[str, Tensor]]:
    """Clip-search and quantize every Linear of the (folded) groups: name -> AWQ GEMM tensors (+ bias),
    on the CPU. The searches run where the weights are."""
    packed: dict[str, dict[str, Tensor]] = {}
    for group, search in searches:
        rows = calibration[group.source].rows.to(search.scales.device) / search.scales
        for name in group.linears:
            linear = module.get_submodule(name)
            w = linear.weight.detach().float()
            clip = 1.0 if name.rpartition(".")[2] in config.no_clip else search_clip(w, rows, config)
            tensors = pack_gemm(*quantize_groups(w, config.group_size, clip))
            if linear.bias is not None:
                tensors["bias"] = linear.bias.detach().to(torch.float16)
            packed[name] = {k: t.cpu() for k, t in tensors.items()}
    return packed


def quantize_t3(t3: T3, calibration: Calibration, config: AwqConfig) -> dict[str, dict[str, Tensor]]:
    """AWQ-quantize T3's backbone Linears, folding the scales into `t3` in place (use float32 weights).

    Returns name -> tensors: each quantized Linear's AWQ GEMM tensors, and the `weight` (and `bias`) of
    each norm the scales changed (v and up are quantized; their folded rows live in their packed tensors).
    `calibration` must hold the inputs of every group's source (see `calibrate`)."""
    groups = t3_scale_groups(t3)
    searches = search_and_fold(t3, groups, calibration, config)
    packed = quantize_linears(t3, searches, calibration, config)
    for group, _ in searches:
        prev = t3.get_submodule(group.prev) if group.prev is not None else None
        if prev is not None and not isinstance(prev, nn.Linear):
            params = {k: v for k, v in prev.named_parameters(recurse=False) if v is not None}
            packed[group.prev] = {k: v.detach().float().cpu().clone() for k, v in params.items()}  # type: ignore[index]
    return packed


# --- the runtime layer ---------------------------------------------------------------------------------


def _inner_k_tiles(in_features: int) -> int | None:
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def choose_kernel(device: torch.device | str, out_features: int, in_features: int, group: int) -> str:
    """The fastest kernel for a layer on `device` (see KERNELS): tinygemm on sm80+ GPUs and on the CPU,
    the Triton GEMV on older GPUs (sm75: Turing) where Triton runs (triton_support), else
    dequantize-then-matmul."""
    device = torch.device(device)
    tinygemm_shape = group in TINYGEMM_GROUPS and in_features % group == 0
    if device.type == "cuda":
        sm80 = torch.cuda.get_device_capability(device)[0] >= 8
        if sm80 and tinygemm_shape and out_features % 8 == 0 and _inner_k_tiles(in_features):
            return "int4pack-cuda"
        if not sm80 and in_features % group == 0 and group % 2 == 0:
            from chatterbox_cli import triton_support

            if triton_support.runs_on(device):
                return "triton-gemv"
    elif device.type == "cpu" and tinygemm_shape and out_features % 16 == 0:
        return "int4pack-cpu"
    return "dequant-matmul"


class AwqLinear(nn.Module):
    """A Linear whose weight is AWQ 4-bit, built from the stored GEMM tensors and repacked once for its
    kernel on `device` (build it where it runs; `.to()` another device type is not supported).

    int4pack kernels compute w = (q - 8) * scale + offset per group, so the zero point becomes the offset
    (8 - zero) * scale; both go in a [in/group, out, 2] bf16 tensor, the activations are cast to bf16 and
    the output back to the input's dtype. dequant-matmul rebuilds the weight in the input's dtype per call.
    triton-gemv (awq_triton) reads dequant-matmul's tensors as they are: inputs of 1..awq_triton.MAX_ROWS (4)
    rows (a decode step) go through its GEMV, in the input's dtype (fp16 on Turing), more rows through
    dequantize-then-matmul. Forcing it (`kernel=`) needs triton, and a CUDA device or TRITON_INTERPRET=1.
    """

    def __init__(
        self,
        qweight: Tensor,
        qzeros: Tensor,
        scales: Tensor,
        bias: Tensor | None = None,
        *,
        device: torch.device | str = "cpu",
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        q, s, z, group = unpack_gemm(qweight.cpu(), qzeros.cpu(), scales.cpu())
        self.out_features, self.in_features = q.shape
        self.group_size = group
        device = torch.device(device)
        self.kernel = kernel or choose_kernel(device, self.out_features, self.in_features, group)
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; kernels: {', '.join(KERNELS)}")
        if self.kernel == "triton-gemv":
            from chatterbox_cli.quant import awq_triton

            if not awq_triton.available():
                raise RuntimeError("kernel 'triton-gemv' needs triton (pip install triton)")
        if self.kernel in ("dequant-matmul", "triton-gemv"):  # one copy of the weight serves both paths
            self.register_buffer("qpairs", (q[:, 0::2] | q[:, 1::2] << 4).to(device), persistent=False)
            self.register_buffer("scales", s.to(device), persistent=False)
            self.register_buffer("zeros", z.to(device), persistent=False)
        else:
            offset = (8 - z.float()) * s.float()
            scale_offset = torch.stack((s.float().t(), offset.t()), dim=-1).to(torch.bfloat16)
            self.register_buffer("scale_offset", scale_offset.contiguous().to(device), persistent=False)
            if self.kernel == "int4pack-cpu":
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            else:  # the CUDA kernel takes two values per byte, the even column in the high nibble
                pairs = (q[:, 0::2] << 4 | q[:, 1::2]).to(device)
                w = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(self.in_features))
            self.register_buffer("packed", w.to(device), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)

    @classmethod
    def from_packed(
        cls, tensors: Mapping[str, Tensor], device: torch.device | str = "cpu", kernel: str | None = None
    ) -> AwqLinear:
        return cls(
            tensors["qweight"],
            tensors["qzeros"],
            tensors["scales"],
            tensors.get("bias"),
            device=device,
            kernel=kernel,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] (dequant-matmul and triton-gemv layers only; exact in float32, one rounding
        otherwise)."""
        q = torch.stack((self.qpairs & 0xF, self.qpairs >> 4), dim=-1).reshape(self.out_features, -1)
        return dequantize(q, self.scales, self.zeros, self.group_size).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if self.kernel == "triton-gemv":
            from chatterbox_cli.quant import awq_triton

            x2 = x.reshape(-1, self.in_features)
            if 1 <= x2.shape[0] <= awq_triton.MAX_ROWS:
                y = awq_triton.gemv(x2, self.qpairs, self.scales, self.zeros, self.group_size, self.bias)
                return y.reshape(*shape[:-1], self.out_features)
        if self.kernel in ("dequant-matmul", "triton-gemv"):
            w = self.dequantized_weight(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.kernel == "int4pack-cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group_size, self.scale_offset
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_offset)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, kernel={self.kernel}, bias={self.bias is not None}"
        )


def apply_awq(
    module: nn.Module,
    packed: Mapping[str, Mapping[str, Tensor]],
    device: torch.device | str = "cpu",
    kernel: str | None = None,
) -> list[str]:
    """Put the AWQ tensors into `module`: AwqLinears for packed Linears, folded norm weights copied in.
    Returns the names of the AwqLinears."""
    replaced = []
    for name, tensors in packed.items():
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if "qweight" in tensors:
            setattr(parent, attr, AwqLinear.from_packed(tensors, device, kernel))
            replaced.append(name)
        else:
            norm = getattr(parent, attr)
            with torch.no_grad():
                for key, value in tensors.items():
                    target = getattr(norm, key)
                    target.copy_(value.to(target.dtype))
    return sorted(replaced)


# --- files ---------------------------------------------------------------------------------------------


class AwqCheckpoint(NamedTuple):
    packed: dict[str, dict[str, Tensor]]
    config: AwqConfig
    metadata: dict[str, str]


def save_awq(
    path: str | Path,
    packed: Mapping[str, Mapping[str, Tensor]],
    config: AwqConfig,
    metadata: Mapping[str, str] | None = None,
    *,
    config_beside: bool = True,
) -> Path:
    """Write `<name>.<key>` tensors to a safetensors file (atomically), the quantization config in its
    metadata and (`config_beside`) in quantization_config.json beside it. `metadata`: extra strings
    (calibration, source)."""
    from chatterbox_cli.checkpoint import write_safetensors_atomic

    path = Path(path)
    tensors = {f"{name}.{key}": t.contiguous() for name, ts in packed.items() for key, t in ts.items()}
    quant_config = json.dumps(config.quantization_config(), sort_keys=True)
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization_config": quant_config,
    }
    write_safetensors_atomic(tensors, path, meta)
    if config_beside:
        (path.parent / CONFIG_FILE).write_text(quant_config + "\n", encoding="utf-8")
    return path


def load_awq(path: str | Path) -> AwqCheckpoint:
    """Read what save_awq wrote (CPU tensors). ValueError for another format or a disagreeing
    quantization_config.json beside it."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file")
        packed: dict[str, dict[str, Tensor]] = {}
        for key in sorted(f.keys()):
            name, _, part = key.rpartition(".")
            packed.setdefault(name, {})[part] = f.get_tensor(key)
    quant_config = json.loads(meta["quantization_config"])
    beside = path.parent / CONFIG_FILE
    if beside.exists() and json.loads(beside.read_text(encoding="utf-8")) != quant_config:
        raise ValueError(f"{beside} disagrees with the quantization_config in {path.name}")
    return AwqCheckpoint(packed, AwqConfig.from_quantization_config(quant_config), meta)


def packed_nbytes(packed: Mapping[str, Mapping[str, Tensor]]) -> int:
    """Bytes of the quantized Linears' AWQ tensors (qweight, qzeros, scales; no biases, no norms)."""
    return sum(
        t.numel() * t.element_size() for ts in packed.values() for k, t in ts.items() if k in PACKED_KEYS
    )


def awq_linear_nbytes(out_features: int, in_features: int, group: int = 128) -> int:
    """Bytes of one Linear in the AWQ GEMM layout: 4-bit weights, 4-bit zero points and fp16 scales per
    group of `group` inputs and output."""
    groups = in_features // group
    return out_features * in_features // 2 + groups * out_features // 2 + 2 * groups * out_features


def runtime_nbytes(out_features: int, in_features: int, group: int = 128) -> int:
    """Bytes of one AwqLinear on the device (bias excluded): 4-bit weights and, per group of `group` inputs
    and output, a bf16 scale and offset (4 bytes, the int4pack kernels; dequant-matmul holds 3, an fp16
    scale and a uint8 zero point: the larger is counted, whichever kernel runs)."""
    return out_features * in_features // 2 + 4 * (in_features // group) * out_features


def group_size_for(in_features: Sequence[int], preferred: int = 128) -> int:
    """The largest group size, at most `preferred`, that the kernels take and that divides every width."""
    for group in sorted((g for g in TINYGEMM_GROUPS if g <= preferred), reverse=True):
        if all(n % group == 0 for n in in_features):
            return group
    raise ValueError(
        f"no AWQ group size in {TINYGEMM_GROUPS} divides the input widths {sorted(set(in_features))}"
    )
