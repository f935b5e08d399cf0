"""Fused Triton kernels for one GPT-2 decode step (Turbo's T3 backbone: GPT-2 medium, 24 layers of width
1024, MLP 4096, LayerNorm eps 1e-5, tanh-GELU), for 1..MAX_ROWS rows: one token per sequence, with its
CFG row. At that size every kernel takes a few microseconds whatever its bytes, and the torch path takes
about eleven a layer. With these kernels a layer takes five (on an H100: a Turbo step 221 kernels and
0.85 ms of GPU time instead of 341 and 1.20 ms; 998 tokens/s instead of 698, benchmarks/decode_profile.py):

    1. layer_norm_linear(h, ln_1, c_attn)           LN1 + q/k/v projection + bias
    2. cache write + SDPA                           torch, unchanged
    3. linear_add_(h, attn, attn.c_proj)            attention output projection + bias + residual, in place
    4. layer_norm_linear(h, ln_2, c_fc, gelu=True)  LN2 + MLP up projection + bias + tanh-GELU
    5. linear_add_(h, mlp, mlp.c_proj)              MLP down projection + bias + residual, in place

Both kernels are GEMVs over a few rows: one program per BLOCK_N outputs loads its whole [BLOCK_N, in]
weight tile at once (nn.Linear layout [out, in], contiguous: each weight row is one contiguous run) and,
for each row in turn, the row's input, and reduces sum_k x[r, k] * w[n, k] in float32. layer_norm_linear
takes the row's mean and variance from the same registers (mean, then centred squares) and normalises in
float32: the normalised input is never rounded to half precision, unlike the torch path's. All arithmetic
is float32; the result is rounded once, to x's dtype. No atomics and no split over the input: a
program's reduction order is fixed by its shape and constants, so results are bitwise reproducible.

There is no autotuning: the kernels are launched inside CUDA-graph capture, so each shape's configuration
is a fixed function of the shape (`block_n`, `block_k`).

triton is imported here if installed; without it this module still imports, `available()` is False and
the kernels raise. Set TRITON_INTERPRET=1 before importing this module to run the kernels on CPU tensors
with Triton's interpreter (the tests do, in a subprocess).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from chatterbox_cli import triton_support

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: available() is False
    triton = tl = None

MAX_ROWS = 4  # rows one call takes: a decode step of one or two sequences, each with its CFG row
# Each program reads its whole [BLOCK_N, in] weight tile in one go and keeps it in registers for every row:
# a GEMV this small is bound by memory latency, so what counts is the bytes in flight per SM, not a loop.
# (A first version looped over `in` in 4 KiB steps and recomputed the LayerNorm statistics from memory:
# 13 us per LN+c_attn/c_fc call on an H100 against cuBLAS's 5 us; this one takes 5.0 us for LN+Linear
# and 4.0 us for Linear+residual on average, benchmarks/decode_profile.py.)
# BLOCK_N: the largest choice leaving at least MIN_PROGRAMS programs (two or three per SM of an H100's
# 132) whose tile holds at most MAX_TILE elements: 8 for c_attn (384 programs of 16 KiB), 16 for c_fc
# (256 of 32 KiB), 4 for both c_proj (256 of 8 and 32 KiB).
BLOCK_N_CHOICES = (16, 8, 4, 2, 1)
MIN_PROGRAMS = 256
MAX_TILE = 16384  # weight elements a program holds: 64 float32 registers a thread at NUM_WARPS = 8
MAX_IN = 8192  # the widest input a tile row takes (in, rounded up to a power of two)
MIN_BLOCK_K = 16  # tl.arange wants a power of two of at least 16
NUM_WARPS = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether triton imported (the kernels also need a CUDA device, or TRITON_INTERPRET=1)."""
    return triton is not None


def block_k(in_features: int) -> int:
    """A tile row: the whole input, rounded up to a power of two (masked past `in_features`)."""
    return max(MIN_BLOCK_K, 1 << max(0, in_features - 1).bit_length())


def block_n(out_features: int, in_features: int) -> int:
    """Outputs per program (see BLOCK_N_CHOICES)."""
    fitting = [n for n in BLOCK_N_CHOICES if n * block_k(in_features) <= MAX_TILE]
    for n in fitting:
        if -(-out_features // n) >= MIN_PROGRAMS:
            return n
    return fitting[-1]


def _jit(fn: Callable) -> Callable:
    """triton.jit, or nothing where triton is missing (the kernel stays a plain function, never run)."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _layer_norm_linear_kernel(
    x_ptr,  # [rows, in], contiguous, fp16 or bf16
    ln_w_ptr,  # [in]
    ln_b_ptr,  # [in]
    w_ptr,  # [out, in], contiguous
    b_ptr,  # [out]
    y_ptr,  # [rows, out], contiguous, x's dtype
    out_features,
    in_features,
    eps,
    GELU: tl.constexpr,
    BLOCK_R: tl.constexpr,  # = rows: the rows loop is unrolled
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the whole input, a power of two
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs
    k = tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < out_features, k < in_features
    w = tl.load(w_ptr + n[:, None] * in_features + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    g = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    for r in tl.static_range(BLOCK_R):
        x = tl.load(x_ptr + r * in_features + k, mask=k_ok, other=0.0).to(tl.float32)
        # The row's statistics from registers, in float32: the mean, then the mean of the centred squares
        # (no cancellation when the mean is large against the spread). Biased variance, as nn.LayerNorm.
        mean = tl.sum(x, axis=0) / in_features
        centred = tl.where(k_ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / in_features + eps)
        xn = tl.where(k_ok, centred * rstd * g + beta, 0.0)  # never rounded below float32
        acc = tl.sum(w.to(tl.float32) * xn[None, :], axis=1) + bias  # [BLOCK_N]
        if GELU:
            # 0.5 v (1 + tanh(u)) = v * sigmoid(2 u) = v / (1 + exp(-2 u)): one exp, no tanh needed, and
            # exact limits (exp overflows to inf for large negative v: -0; underflows to 0 for large v: v).
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)  # sqrt(2 / pi) as a literal
            acc = acc / (1.0 + tl.exp(-2.0 * u))
        tl.store(y_ptr + r * out_features + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@_jit
def _linear_add_kernel(
    res_ptr,  # [rows, out], contiguous, updated in place
    x_ptr,  # [rows, in], contiguous
    w_ptr,  # [out, in], contiguous
    b_ptr,  # [out]
    out_features,
    in_features,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < out_features, k < in_features
    w = tl.load(w_ptr + n[:, None] * in_features + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    for r in tl.static_range(BLOCK_R):
        x = tl.load(x_ptr + r * in_features + k, mask=k_ok, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1) + bias
        # Each output is read and written by this program only: the in-place update needs no atomics.
        at = res_ptr + r * out_features + n
        acc += tl.load(at, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(at, acc.to(res_ptr.dtype.element_ty), mask=n_ok)


def _interpreted() -> bool:
    """Whether triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET set at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_linear_add_kernel, InterpretedFunction)


def usable(x: Tensor, *weights: Tensor) -> bool:
    """Whether the fused kernels take this call: x [rows, in] contiguous with 1 <= rows <= MAX_ROWS, on a
    CUDA device Triton runs on (triton_support) or on the CPU under TRITON_INTERPRET=1, and x and every
    weight float16 or bfloat16 of one dtype, on x's device, contiguous, no input wider than MAX_IN.
    Anything else takes the torch path."""
    if triton is None or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or not x.is_contiguous():
        return False
    if max(t.shape[-1] for t in (x, *weights)) > MAX_IN:
        return False
    if not (x.is_cuda and triton_support.runs_on(x.device) or (x.device.type == "cpu" and _interpreted())):
        return False
    if x.dtype not in HALF_DTYPES:
        return False
    return all(w.dtype == x.dtype and w.device == x.device and w.is_contiguous() for w in weights)


def _check(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[int, int, int]:
    """rows, in, out, after checking the shapes the kernels index by."""
    if triton is None:
        raise RuntimeError("the fused GPT-2 kernels need triton (pip install triton)")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [1..{MAX_ROWS}, in], got {tuple(x.shape)}")
    rows, in_features = x.shape
    if in_features > MAX_IN:
        raise ValueError(f"inputs wider than {MAX_IN} are not supported, got {in_features}")
    out_features = weight.shape[0]
    if tuple(weight.shape) != (out_features, in_features) or tuple(bias.shape) != (out_features,):
        raise ValueError(f"weight must be [out, {in_features}] and bias [out], got {tuple(weight.shape)}")
    if not (x.is_contiguous() and weight.is_contiguous() and bias.is_contiguous()):
        raise ValueError("x, weight and bias must be contiguous")
    return rows, in_features, out_features


def layer_norm_linear(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    weight: Tensor,
    bias: Tensor,
    gelu: bool = False,
) -> Tensor:
    """act(LayerNorm(x) @ weight.T + bias) in one launch: x [rows, in], weight [out, in], bias [out];
    act = GPT-2's tanh-GELU when `gelu`, else identity. [rows, out] in x's dtype."""
    rows, in_features, out_features = _check(x, weight, bias)
    if tuple(ln_weight.shape) != (in_features,) or tuple(ln_bias.shape) != (in_features,):
        raise ValueError(f"the LayerNorm's weight and bias must be [{in_features}]")
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    bn = block_n(out_features, in_features)
    _layer_norm_linear_kernel[(triton.cdiv(out_features, bn),)](
        x,
        ln_weight,
        ln_bias,
        weight,
        bias,
        y,
        out_features,
        in_features,
        float(eps),
        GELU=gelu,
        BLOCK_R=rows,
        BLOCK_N=bn,
        BLOCK_K=block_k(in_features),
        num_warps=NUM_WARPS,
    )
    return y


def linear_add_(residual: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """residual += x @ weight.T + bias, in place, in one launch: residual [rows, out], x [rows, in],
    weight [out, in], bias [out]. Float32 throughout, one rounding to residual's dtype. Returns residual."""
    rows, in_features, out_features = _check(x, weight, bias)
    if tuple(residual.shape) != (rows, out_features) or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous [{rows}, {out_features}], got {tuple(residual.shape)}")
    bn = block_n(out_features, in_features)
    _linear_add_kernel[(triton.cdiv(out_features, bn),)](
        residual,
        x,
        weight,
        bias,
        out_features,
        in_features,
        BLOCK_R=rows,
        BLOCK_N=bn,
        BLOCK_K=block_k(in_features),
        num_warps=NUM_WARPS,
    )
    return residual
