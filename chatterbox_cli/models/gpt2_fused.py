"""Fused Triton kernels for one GPT-2 decode step (Turbo's T3 backbone: GPT-2 medium, 24 layers of width
1024, MLP 4096, LayerNorm eps 1e-5, tanh-GELU), for 1..MAX_ROWS rows: one token per sequence, with its
CFG row. At that size a layer's step costs kernel launches, not FLOPs or bytes, and the torch path takes
about eleven. With these kernels a layer takes five:

    1. layer_norm_linear(h, ln_1, c_attn)           LN1 + q/k/v projection + bias
    2. cache write + SDPA                           torch, unchanged
    3. linear_add_(h, attn, attn.c_proj)            attention output projection + bias + residual, in place
    4. layer_norm_linear(h, ln_2, c_fc, gelu=True)  LN2 + MLP up projection + bias + tanh-GELU
    5. linear_add_(h, mlp, mlp.c_proj)              MLP down projection + bias + residual, in place

Both kernels are GEMVs over a few rows: one program per BLOCK_N outputs loops over the input in BLOCK_K
steps, reading a [BLOCK_N, BLOCK_K] tile of the weight (nn.Linear layout [out, in], contiguous, so each
weight row's step is one contiguous run) and the matching [rows, BLOCK_K] slice of the input, and
accumulates sum_k x[r, k] * w[n, k] for all rows in float32. layer_norm_linear first computes each row's
mean and variance over the whole input (two passes, mean then centred squares; every program recomputes
them: x is a few KiB and sits in cache) and normalises each x slice as it loads it, in float32: the
normalised input is never rounded to half precision, unlike the torch path's. All arithmetic is float32;
the result is rounded once, to x's dtype. No atomics and no split over K: a program's reduction order is
fixed by its shape and constants, so results are bitwise reproducible run to run.

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

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: available() is False
    triton = tl = None

MAX_ROWS = 4  # rows one call takes: a decode step of one or two sequences, each with its CFG row
# Outputs per program: the largest of these leaving at least MIN_PROGRAMS programs, so that every SM of
# an H100 (132) has work, two programs on most, and their loads overlap. A memory-bound GEMV is limited
# by bytes in flight; with out = 1024 (both c_proj) BLOCK_N = 4 gives 256 programs, with out = 3072
# (c_attn) 8 gives 384, with out = 4096 (c_fc) 16 gives 256. Not tuned: no GPU was at hand when written.
BLOCK_N_CHOICES = (16, 8, 4)
MIN_PROGRAMS = 256
# Weight elements per program and step: BLOCK_K = TILE / BLOCK_N (512, 256 or 128 inputs). Each weight
# row's step is then 256 to 1024 contiguous bytes in fp16/bf16 (whole 128-byte lines, loaded as 16-byte
# vectors), a step reads 4 KiB of weight, and the float32 [rows, BLOCK_N, BLOCK_K] product of 4 rows is
# 8192 values: 64 registers a thread at NUM_WARPS = 4, which leaves room for the loads in flight.
TILE = 2048
MIN_BLOCK_K = 16  # tl.arange wants a power of two; tiny inputs (the test model's 32..128) get one step
NUM_WARPS = 4
HALF_DTYPES = (torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether triton imported (the kernels also need a CUDA device, or TRITON_INTERPRET=1)."""
    return triton is not None


def block_n(out_features: int) -> int:
    """Outputs per program: the largest choice that still gives MIN_PROGRAMS programs, else the smallest."""
    for n in BLOCK_N_CHOICES:
        if -(-out_features // n) >= MIN_PROGRAMS:
            return n
    return BLOCK_N_CHOICES[-1]


def block_k(in_features: int, bn: int) -> int:
    """Inputs per step: TILE / BLOCK_N, but no wider than the input rounded up to a power of two."""
    return max(MIN_BLOCK_K, min(TILE // bn, 1 << max(0, in_features - 1).bit_length()))


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
    rows,
    out_features,
    in_features,
    eps,
    GELU: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows padded to a power of two
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    n_ok, r_ok = n < out_features, r < rows

    # The rows' statistics over the whole input, in float32: the mean, then the mean of the centred squares
    # (two passes: no cancellation when the mean is large against the spread). Padding reads 0 and is
    # masked out of the centred sum.
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ok = r_ok[:, None] & (k0 + k < in_features)[None, :]
        x = tl.load(x_ptr + r[:, None] * in_features + (k0 + k)[None, :], mask=ok, other=0.0)
        total += tl.sum(x.to(tl.float32), axis=1)
    mean = total / in_features
    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ok = r_ok[:, None] & (k0 + k < in_features)[None, :]
        x = tl.load(x_ptr + r[:, None] * in_features + (k0 + k)[None, :], mask=ok, other=0.0)
        centred = tl.where(ok, x.to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(squares / in_features + eps)  # biased variance, as nn.LayerNorm

    # The GEMV on the normalised input, never rounded below float32.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_ok = k0 + k < in_features
        ok = r_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + r[:, None] * in_features + (k0 + k)[None, :], mask=ok, other=0.0)
        g = tl.load(ln_w_ptr + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
        xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
        xn = tl.where(ok, xn, 0.0)  # padded inputs contribute nothing (the weight tile is 0 there too)
        w = tl.load(
            w_ptr + n[:, None] * in_features + (k0 + k)[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        acc += tl.sum(xn[:, None, :] * w[None, :, :], axis=2)  # [BLOCK_R, BLOCK_N]
    acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        # 0.5 v (1 + tanh(u)) = v * sigmoid(2 u) = v / (1 + exp(-2 u)): one exp, no tanh needed, and
        # exact limits (exp overflows to inf for large negative v: -0; underflows to 0 for large v: v).
        u = 0.7978845608028654 * (
            acc + 0.044715 * acc * acc * acc
        )  # sqrt(2 / pi): a literal, jit reads no globals
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    y_at = y_ptr + r[:, None] * out_features + n[None, :]
    tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@_jit
def _linear_add_kernel(
    res_ptr,  # [rows, out], contiguous, updated in place
    x_ptr,  # [rows, in], contiguous
    w_ptr,  # [out, in], contiguous
    b_ptr,  # [out]
    rows,
    out_features,
    in_features,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    n_ok, r_ok = n < out_features, r < rows
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k_ok = k0 + k < in_features
        x = tl.load(
            x_ptr + r[:, None] * in_features + (k0 + k)[None, :],
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(
            w_ptr + n[:, None] * in_features + (k0 + k)[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # Each output is read and written by this program only: the in-place update needs no atomics.
    res_at = res_ptr + r[:, None] * out_features + n[None, :]
    ok = r_ok[:, None] & n_ok[None, :]
    acc += tl.load(res_at, mask=ok, other=0.0).to(tl.float32)
    tl.store(res_at, acc.to(res_ptr.dtype.element_ty), mask=ok)


def _interpreted() -> bool:
    """Whether triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET set at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_linear_add_kernel, InterpretedFunction)


def usable(x: Tensor, *weights: Tensor) -> bool:
    """Whether the fused kernels take this call: triton imported, x [rows, in] contiguous with
    1 <= rows <= MAX_ROWS, on CUDA (or on the CPU under TRITON_INTERPRET=1), and x and every weight
    float16 or bfloat16 of one dtype, on x's device, contiguous. Anything else takes the torch path."""
    if triton is None or x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or not x.is_contiguous():
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreted())):
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
    bn = block_n(out_features)
    _layer_norm_linear_kernel[(triton.cdiv(out_features, bn),)](
        x,
        ln_weight,
        ln_bias,
        weight,
        bias,
        y,
        rows,
        out_features,
        in_features,
        float(eps),
        GELU=gelu,
        BLOCK_R=triton.next_power_of_2(rows),
        BLOCK_N=bn,
        BLOCK_K=block_k(in_features, bn),
        num_warps=NUM_WARPS,
    )
    return y


def linear_add_(residual: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """residual += x @ weight.T + bias, in place, in one launch: residual [rows, out], x [rows, in],
    weight [out, in], bias [out]. Float32 throughout, one rounding to residual's dtype. Returns residual."""
    rows, in_features, out_features = _check(x, weight, bias)
    if tuple(residual.shape) != (rows, out_features) or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous [{rows}, {out_features}], got {tuple(residual.shape)}")
    bn = block_n(out_features)
    _linear_add_kernel[(triton.cdiv(out_features, bn),)](
        residual,
        x,
        weight,
        bias,
        rows,
        out_features,
        in_features,
        BLOCK_R=triton.next_power_of_2(rows),
        BLOCK_N=bn,
        BLOCK_K=block_k(in_features, bn),
        num_warps=NUM_WARPS,
    )
    return residual
