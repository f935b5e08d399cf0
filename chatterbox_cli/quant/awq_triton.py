"""A Triton GEMV for AWQ 4-bit weights, for batch-1 decoding on GPUs without tinygemm (sm75: Turing, the
GTX 16xx and RTX 20xx cards). It needs no sm80 instruction: plain loads, integer and float32 arithmetic.

y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]) for a few rows r (1..MAX_ROWS: one decode step, with its
CFG row), reading the weight as AwqLinear's dequant-matmul path stores it, so both share one copy:
    qpairs uint8 [out, in/2]: columns 2j and 2j+1 in the low and high nibble of byte j,
    scales fp16 [out, in/group], zeros uint8 [out, in/group], w = (q - zero) * scale.

One program per BLOCK_N output rows loops over the input in BLOCK_K steps, each inside one group
(BLOCK_K divides the group), and adds per step scale * (sum_k q_k x_k - zero * sum_k x_k): the zero point
and the scale are applied once per group and row, not per weight. Activations are loaded in their dtype
(fp16 on Turing, which has no bf16; float32 works too) and widened to float32; all arithmetic is float32;
y is written in x's dtype.

triton is imported here if installed; without it this module still imports, `available()` is False and
`gemv` raises. Set TRITON_INTERPRET=1 before importing this module to run the kernel on CPU tensors with
Triton's interpreter (the tests do, in a subprocess).
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

MAX_ROWS = 4  # rows one call takes; AwqLinear sends more (prefill, batches) to dequantize-then-matmul
BLOCK_N = 16  # output rows per program (not tuned on Turing: no such card was at hand)
MAX_BLOCK_K = 128  # input columns per step, at most: 64 bytes of each weight row
NUM_WARPS = 4


def available() -> bool:
    """Whether triton imported (the kernel also needs a CUDA device, or TRITON_INTERPRET=1)."""
    return triton is not None


def block_k(group: int) -> int:
    """Input columns per step: the largest power of two dividing the group (tl.arange wants one), capped."""
    return min(MAX_BLOCK_K, group & -group)


def _jit(fn: Callable) -> Callable:
    """triton.jit, or nothing where triton is missing (the kernel stays a plain function, never run)."""
    return fn if triton is None else triton.jit(fn)


@_jit
def _gemv_kernel(
    x_ptr,  # [rows, in], contiguous
    qpairs_ptr,  # uint8 [out, in/2]
    scales_ptr,  # fp16 [out, in/group]
    zeros_ptr,  # uint8 [out, in/group]
    bias_ptr,  # [out] (any float dtype), read only when HAS_BIAS
    y_ptr,  # [rows, out], contiguous, x's dtype
    rows,
    out_features,
    in_features,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows padded to a power of two
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's output rows
    r = tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_K // 2)  # the bytes of one step: input columns 2j and 2j + 1
    n_ok, r_ok = n < out_features, r < rows
    groups = in_features // GROUP
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        pairs = tl.load(
            qpairs_ptr + n[:, None] * (in_features // 2) + (k0 // 2 + j)[None, :],
            mask=n_ok[:, None],
            other=0,
        )
        q_even = (pairs & 0xF).to(tl.float32)  # [BLOCK_N, BLOCK_K / 2]
        q_odd = (pairs >> 4).to(tl.float32)
        x_at = x_ptr + r[:, None] * in_features + k0 + 2 * j[None, :]
        x_even = tl.load(x_at, mask=r_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K / 2]
        x_odd = tl.load(x_at + 1, mask=r_ok[:, None], other=0.0).to(tl.float32)
        # sum_k q_k x_k per row and output: [BLOCK_R, BLOCK_N]
        qx = tl.sum(q_even[None, :, :] * x_even[:, None, :] + q_odd[None, :, :] * x_odd[:, None, :], axis=2)
        x_sum = tl.sum(x_even + x_odd, axis=1)  # [BLOCK_R]
        g = k0 // GROUP  # the step lies inside one group
        scale = tl.load(scales_ptr + n * groups + g, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + n * groups + g, mask=n_ok, other=0).to(tl.float32)
        acc += scale[None, :] * (qx - zero[None, :] * x_sum[:, None])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_at = y_ptr + r[:, None] * out_features + n[None, :]
    tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


def gemv(
    x: Tensor, qpairs: Tensor, scales: Tensor, zeros: Tensor, group: int, bias: Tensor | None = None
) -> Tensor:
    """x [rows, in] (1 <= rows <= MAX_ROWS; fp16, or float32) times the 4-bit weight, plus bias:
    [rows, out] in x's dtype. The weight tensors as the module docstring has them."""
    if triton is None:
        raise RuntimeError("the triton-gemv AWQ kernel needs triton (pip install triton)")
    rows, in_features = x.shape
    out_features = qpairs.shape[0]
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the Triton GEMV takes 1..{MAX_ROWS} rows, got {rows}")
    if qpairs.dtype != torch.uint8 or tuple(qpairs.shape) != (out_features, in_features // 2):
        raise ValueError(f"qpairs must be uint8 [out, {in_features // 2}], got {tuple(qpairs.shape)}")
    if in_features % group or group % 2:
        raise ValueError(f"in_features {in_features} is not a multiple of the (even) group size {group}")
    groups = in_features // group
    if tuple(scales.shape) != (out_features, groups) or tuple(zeros.shape) != (out_features, groups):
        raise ValueError(f"scales and zeros must be [{out_features}, {groups}]")
    x = x.contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, BLOCK_N),)
    _gemv_kernel[grid](
        x,
        qpairs.contiguous(),
        scales.contiguous(),
        zeros.contiguous(),
        y if bias is None else bias,  # not read without a bias
        y,
        rows,
        out_features,
        in_features,
        GROUP=group,
        HAS_BIAS=bias is not None,
        BLOCK_R=triton.next_power_of_2(rows),
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k(group),
        num_warps=NUM_WARPS,
    )
    return y
