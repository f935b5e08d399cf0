"""The fused GPT-2 decode kernels (chatterbox_cli/models/gpt2_fused.py): their numbers under Triton's CPU
interpreter within error bounds derived from the arithmetic, when the model may take them (`usable`), and,
on a CUDA GPU, the full-size shapes, determinism and CUDA-graph capture."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from chatterbox_cli.models import gpt2_fused

TRITON_MISSING = importlib.util.find_spec("triton") is None
EPS = 1e-5  # GPT-2's LayerNorm eps
U32 = 2.0**-24  # float32 unit roundoff (24 significant bits)
# The output's rounding, relative: round to nearest is half an ulp, 2^-11 for fp16 (11 significant bits),
# 2^-8 for bf16 (8), as the GPU rounds. Triton's interpreter rounds fp16 to nearest (numpy's astype) but
# truncates float32 to bf16 (interpreter.py: cast_impl -> _convert_float with no rounding mode): one whole
# ulp, 2^-7, there.
U_OUT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
U_OUT_INTERPRETER = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
ETA_OUT = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}  # half the spacing of the subnormals
# The kernels' divisions, square root and exp may be hardware approximations on a GPU (div.full.f32 and
# ex2.approx.f32 are within 2 ulp, sqrt.approx.f32 within 2^-23 relative): each is taken as within
# 8 u = 2^-21 relative. The interpreter's numpy float32 operations are correctly rounded (u).
U_APPROX = 8 * U32
ETA32 = 2.0**-120  # float32 underflow or flush to zero (exp of a large negative number): values < 2^-126
GELU_SLOPE = 1.13  # max |d/dv gelu_new(v)| = 1.12899... (at v = 1.4185; the minimum is -0.12899)
GELU_C = math.sqrt(2.0 / math.pi)


def gamma(m: int) -> float:
    """Higham's gamma_m = m u / (1 - m u): the relative bound on m float32 roundings, in any order."""
    return m * U32 / (1 - m * U32)


def layer_norm_linear_bound(
    case: dict[str, Any], u_out: dict[torch.dtype, float] = U_OUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result of act(LayerNorm(x) @ w.T + b) on the case's half-precision inputs, and a bound
    on the kernel's distance to it that holds on any machine (only IEEE float32 semantics, plus the
    U_APPROX allowance for the GPU's approximate division, sqrt and exp, enter it).

    The kernel computes in float32: the mean (K additions, a division), the centred inputs c = x - mean,
    the variance (K squares and additions, a division), + eps, rstd = 1 / sqrt(.), the normalised input
    xn = c * rstd * g + beta, the dot with the weight (K products, K - 1 additions in whatever order the
    compiler's reduction tree gives, + bias: gamma_{K+1} of the summed magnitudes), the
    GELU, and one rounding to the output dtype. Each stage's error is propagated to first order with
    rigorous gamma factors: the bound is loose by roughly sqrt(K) (roundings do not all line up), but it
    does not depend on this CPU's numpy or on a fixed atol, and a wrong formula (a missing bias, an
    uncentred or unscaled input, a wrong GELU) misses it by orders of magnitude.
    """
    x, g, beta, w, b = (case[k].double() for k in ("x", "ln_w", "ln_b", "w", "b"))
    k = x.shape[1]
    mean = x.mean(1, keepdim=True)
    d = x - mean
    var = (d * d).mean(1, keepdim=True)
    r = (var + EPS).rsqrt()
    xn = d * r * g + beta
    pre = xn @ w.t() + b
    y_ref = F.gelu(pre, approximate="tanh") if case["gelu"] else pre

    # The LayerNorm, per row and input.
    e_mean = (gamma(k) + U_APPROX) * x.abs().mean(1, keepdim=True)  # the sum, then the division by K
    e_d = e_mean + U32 * (d.abs() + e_mean)  # c = fl(x - mean'): |c - d|
    e_squares = (e_d * (2 * d.abs() + e_d)).sum(1, keepdim=True)  # |sum c^2 - sum d^2|
    e_squares = e_squares + gamma(k) * ((d * d).sum(1, keepdim=True) + e_squares)  # its float32 sum
    # var' + eps: the division by K (approximate), eps as a float32 (u), the addition (u)
    e_var = e_squares / k * (1 + U_APPROX) + U_APPROX * var + U32 * EPS + U32 * (var + EPS + e_squares / k)
    rel_v = e_var / (var + EPS)
    assert (rel_v < 0.5).all(), "the case is too ill-conditioned for a first-order bound"
    # (v (1 + e))^-1/2 = v^-1/2 (1 + e') with |e'| <= |e| / (2 (1 - |e|)); then the sqrt and the division
    e_r = (1 + rel_v / (2 * (1 - rel_v))) * (1 + U_APPROX) ** 2 - 1  # relative, on rstd
    a = g.abs() * (e_d * r * (1 + e_r) + d.abs() * r * e_r)  # |c r' g - d r g|
    p = (d * r * g).abs() + a  # a bound on |c r' g|
    e_xn = a + gamma(2) * p + U32 * ((1 + gamma(2)) * p + beta.abs())  # two products and the + beta

    # The dot product and the bias: the inputs' errors through the weight, and the float32 sum.
    w_abs = w.abs().t()
    e_pre = e_xn @ w_abs + gamma(k + 1) * ((xn.abs() + e_xn) @ w_abs + b.abs())
    e_total = e_pre
    if case["gelu"]:
        # gelu(v') - gelu(v) <= GELU_SLOPE |v' - v|, then the GELU's own float32 evaluation at v':
        # v / (1 + exp(z)), z = -2 sqrt(2/pi) (v + 0.044715 v^3). v and v^3 share a sign, so z is
        # within gamma_7 relative (three products for v^3, the constants, the sum, the product); exp(z)
        # then within |z| gamma_7 + |z| u (exp's z log2(e)) + U_APPROX, the 1 + . within that + u, the
        # division U_APPROX more.
        v = pre.abs() + e_pre
        z = 2 * GELU_C * (v + 0.044715 * v**3)
        e_exp = torch.expm1(z * (gamma(7) + U32)) + U_APPROX
        e_eval = (1 + e_exp + U32) * (1 + U_APPROX) - 1
        e_total = GELU_SLOPE * e_pre + (y_ref.abs() + GELU_SLOPE * e_pre) * e_eval
    e_total = e_total + ETA32
    u_y = u_out[case["x"].dtype]
    return y_ref, e_total + u_y * (y_ref.abs() + e_total) + ETA_OUT[case["x"].dtype]


def linear_add_bound(
    case: dict[str, Any], u_out: dict[torch.dtype, float] = U_OUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result of residual + x @ w.T + b and a bound on the kernel's distance to it: K products
    and the K - 1 additions of the dot, the bias and the residual (K + 2 terms, one rounding each at most
    on any path: gamma_{K+2} of the summed magnitudes), then one rounding to the residual's dtype."""
    res, x, w, b = (case[k].double() for k in ("res", "x2", "w", "b"))
    y_ref = res + x @ w.t() + b
    e32 = gamma(x.shape[1] + 2) * (x.abs() @ w.abs().t() + b.abs() + res.abs()) + ETA32
    dtype = case["res"].dtype
    return y_ref, e32 + u_out[dtype] * (y_ref.abs() + e32) + ETA_OUT[dtype]


def fused_case(rows: int, in_f: int, out_f: int, dtype: torch.dtype, gelu: bool, seed: int) -> dict[str, Any]:
    """Random half-precision inputs: row 0 of tiny spread (variance 1e-6 < eps: eps must be added), row 1
    far off zero (the mean must be taken out), the others of a wide dynamic range; LayerNorm parameters
    near (1, 0); GPT-2-like weights; a residual of order one."""
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(rows, in_f, generator=gen)
        * torch.logspace(-1, 0.5, in_f)[torch.randperm(in_f, generator=gen)]
    )
    x[0] = torch.randn(in_f, generator=gen) * 1e-3
    if rows > 1:
        x[1] = 3.0 + 0.5 * torch.randn(in_f, generator=gen)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (shift + scale * torch.randn(*shape, generator=gen)).to(dtype)

    return {
        "x": x.to(dtype),
        "ln_w": randn(in_f, scale=0.2, shift=1.0),
        "ln_b": randn(in_f, scale=0.1),
        "w": randn(out_f, in_f, scale=0.05),
        "b": randn(out_f, scale=0.5),
        "gelu": gelu,
        "x2": randn(rows, in_f) * torch.logspace(-1, 0.5, in_f, dtype=torch.float64).to(dtype),
        "res": randn(rows, out_f),
    }


# (in, out): inputs not a power of two (96, 600: the tile row is masked), wide ones (1024, 4096), outputs
# not a multiple of BLOCK_N (40, 42, 24 for 16), the tiny model's widths (32..128). Rows 1..4 for each,
# with the dtype, GELU and BLOCK_N (forced: the full-size shapes' 8 and 16 too) varied across them.
INTERPRETER_SHAPES = [(96, 40), (32, 64), (128, 96), (64, 128), (600, 42), (1024, 64), (4096, 24)]
INTERPRETER_CASES = [
    (
        rows,
        in_f,
        out_f,
        (torch.float16, torch.bfloat16)[(rows + i) % 2],
        (4, 8, 16)[(rows + i) % 3],
        rows % 2 == 1,
    )
    for i, (in_f, out_f) in enumerate(INTERPRETER_SHAPES)
    for rows in range(1, 5)
]

INTERPRETER_RUN = """
import sys

import torch

from chatterbox_cli.models import gpt2_fused as fused

cases = torch.load(sys.argv[1])
outputs = []
for case in cases:
    fused.block_n = lambda out, inp, bn=case["block_n"]: bn  # force each configuration, not only chosen ones
    args = (case["ln_w"], case["ln_b"], case["w"], case["b"])
    assert fused.usable(case["x"], *args) and fused.usable(case["x2"], case["w"], case["b"], case["res"])
    y = fused.layer_norm_linear(case["x"], *args[:2], 1e-5, *args[2:], case["gelu"])
    res = case["res"].clone()
    returned = fused.linear_add_(res, case["x2"], case["w"], case["b"])
    outputs.append({"y": y, "res": res, "in_place": returned.data_ptr() == res.data_ptr()})
half = torch.zeros(2, 64, dtype=torch.float16)
w = torch.zeros(8, 64, dtype=torch.float16)
usable = {
    "ok": fused.usable(half, w),
    "bf16": fused.usable(half.bfloat16(), w.bfloat16()),
    "rows 0": fused.usable(half[:0], w),
    "rows 5": fused.usable(torch.zeros(5, 64, dtype=torch.float16), w),
    "3-D": fused.usable(half[None], w),
    "float32": fused.usable(half.float(), w.float()),
    "mixed": fused.usable(half, w.bfloat16()),
    "strided": fused.usable(torch.zeros(2, 128, dtype=torch.float16)[:, ::2], w),
}
torch.save({"outputs": outputs, "usable": usable}, sys.argv[2])
"""


@pytest.mark.skipif(
    TRITON_MISSING, reason="triton is not installed (its interpreter runs the kernels on CPU)"
)
def test_fused_kernels_in_the_interpreter_match_float64(
    tmp_path: Path, make_child_env: Callable[..., dict[str, str]]
) -> None:
    """Both kernels on CPU tensors, by Triton's interpreter (numpy float32 arithmetic: the GPU's roundings
    up to order, FMA and its approximate division/sqrt/exp, all inside the bounds), fp16 and bf16, rows
    1..4, within the derived bounds of the float64 results; `usable` where the interpreter runs."""
    cases = []
    for seed, (rows, in_f, out_f, dtype, bn, gelu) in enumerate(INTERPRETER_CASES):
        cases.append(fused_case(rows, in_f, out_f, dtype, gelu, seed) | {"block_n": bn})
    torch.save(cases, tmp_path / "cases.pt")
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETER_RUN, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        env=make_child_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    for shape, case, out in zip(INTERPRETER_CASES, cases, result["outputs"], strict=True):
        rows, _, out_f, dtype, _, _ = shape
        for name, y, (y_ref, bound) in (
            ("layer_norm_linear", out["y"], layer_norm_linear_bound(case, U_OUT_INTERPRETER)),
            ("linear_add_", out["res"], linear_add_bound(case, U_OUT_INTERPRETER)),
        ):
            assert y.shape == (rows, out_f) and y.dtype == dtype, (name, shape)
            assert ((y.double() - y_ref).abs() <= bound).all(), (name, shape)
        assert out["in_place"], shape
    assert result["usable"] == {
        "ok": True,
        "bf16": True,
        "rows 0": False,
        "rows 5": False,
        "3-D": False,
        "float32": False,
        "mixed": False,
        "strided": False,
    }


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
def test_cpu_tensors_are_not_usable_without_the_interpreter(
    make_child_env: Callable[..., dict[str, str]],
) -> None:
    """Without TRITON_INTERPRET (a fresh process: triton reads it when the kernels are decorated) a CPU
    tensor takes the torch path."""
    code = (
        "import torch\nfrom chatterbox_cli.models import gpt2_fused as f\n"
        "x = torch.zeros(1, 64, dtype=torch.float16)\n"
        "print(f.available(), f.usable(x, torch.zeros(8, 64, dtype=torch.float16)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=make_child_env(TRITON_INTERPRET=""), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.split() == ["True", "False"]


def test_fused_kernels_are_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without triton (simulated) nothing is usable and the kernels say what they need; the fixed
    configurations of the full-size shapes."""
    shapes = [(1024, 1024), (3072, 1024), (4096, 1024), (1024, 4096), (40, 96)]  # (out, in)
    assert [gpt2_fused.block_n(out, inp) for out, inp in shapes] == [4, 8, 16, 4, 1]
    assert gpt2_fused.block_k(1024) == 1024 and gpt2_fused.block_k(4096) == 4096
    assert gpt2_fused.block_k(96) == 128 and gpt2_fused.block_k(3) == gpt2_fused.MIN_BLOCK_K
    monkeypatch.setattr(gpt2_fused, "triton", None)
    assert not gpt2_fused.available()
    x, w, b = torch.zeros(1, 64, dtype=torch.float16), torch.zeros(8, 64, dtype=torch.float16), torch.zeros(8)
    assert not gpt2_fused.usable(x, w)
    with pytest.raises(RuntimeError, match="need triton"):
        gpt2_fused.layer_norm_linear(x, x[0], x[0], EPS, w, b)
    with pytest.raises(RuntimeError, match="need triton"):
        gpt2_fused.linear_add_(torch.zeros(1, 8), x, w, b)


# in, out, gelu (None: linear_add_): T3 Turbo's c_attn, c_fc, attention c_proj and MLP c_proj
CUDA_SHAPES = [(1024, 3072, False), (1024, 4096, True), (1024, 1024, None), (4096, 1024, None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
def test_fused_kernels_on_cuda() -> None:
    """At the full-size shapes, rows 1..4, fp16 and bf16: within the derived bounds of the float64 result,
    near torch's float32 path, bitwise reproducible; and both kernels captured in a CUDA graph replay
    the eager numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's path in true float32
    try:
        check_fused_kernels_on_cuda()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def check_fused_kernels_on_cuda() -> None:
    """test_fused_kernels_on_cuda's body, with TF32 off."""
    for i, (in_f, out_f, gelu) in enumerate(CUDA_SHAPES):
        for rows in range(1, 5):
            dtype = (torch.float16, torch.bfloat16)[rows % 2]
            case = fused_case(rows, in_f, out_f, dtype, bool(gelu), seed=100 + 4 * i + rows)
            c = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
            if gelu is None:
                y = gpt2_fused.linear_add_(c["res"].clone(), c["x2"], c["w"], c["b"])
                again = gpt2_fused.linear_add_(c["res"].clone(), c["x2"], c["w"], c["b"])
                y_ref, bound = linear_add_bound(case)
                torch32 = c["res"].float() + F.linear(c["x2"].float(), c["w"].float(), c["b"].float())
            else:
                args = (c["x"], c["ln_w"], c["ln_b"], EPS, c["w"], c["b"], gelu)
                y, again = gpt2_fused.layer_norm_linear(*args), gpt2_fused.layer_norm_linear(*args)
                y_ref, bound = layer_norm_linear_bound(case)
                ln = F.layer_norm(c["x"].float(), (in_f,), c["ln_w"].float(), c["ln_b"].float(), EPS)
                torch32 = F.linear(ln, c["w"].float(), c["b"].float())
                torch32 = F.gelu(torch32, approximate="tanh") if gelu else torch32
            assert y.shape == (rows, out_f) and y.dtype == dtype
            assert torch.equal(y, again), (in_f, out_f, rows)  # no atomics: one order of summation
            error = (y.double().cpu() - y_ref).abs()
            assert (error <= bound).all(), (in_f, out_f, rows, (error / bound).max().item())
            # torch's float32 path is within the bound's float32 part of y_ref, far inside the rounding
            assert ((y.double().cpu() - torch32.double().cpu()).abs() <= 2 * bound).all(), (in_f, out_f, rows)

    # CUDA graphs: warm up (compile) on a side stream, capture, replay on new inputs, compare with eager.
    case = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in fused_case(2, 1024, 1024, torch.float16, True, 7).items()
    }
    w_up = (0.05 * torch.randn(4096, 1024, device="cuda")).half()
    b_up = (0.5 * torch.randn(4096, device="cuda")).half()
    w_down = (0.02 * torch.randn(1024, 4096, device="cuda")).half()
    b_down = (0.5 * torch.randn(1024, device="cuda")).half()
    h = torch.randn(2, 1024, device="cuda").half()

    def step() -> torch.Tensor:  # an MLP half-layer: LN2 + c_fc + GELU, then c_proj + residual in place
        mlp = gpt2_fused.layer_norm_linear(h, case["ln_w"], case["ln_b"], EPS, w_up, b_up, gelu=True)
        return gpt2_fused.linear_add_(h, mlp, w_down, b_down)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        start = torch.randn(
            2, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)
        ).half()
        h.copy_(start)
        graph.replay()
        replayed = h.clone()
        h.copy_(start)
        step()
        torch.cuda.synchronize()
        assert torch.equal(replayed, h), seed
        assert not torch.equal(replayed, start)


# The tiny Turbo backbone's decode step through the model's own code, fused (t3.GPT2Block._fused_step)
# and not, in 16 bits, against the same step in float64. Run under Triton's interpreter (a fresh process).
BLOCK_STEP_RUN = r"""
import copy, sys
import torch
from torch import nn
from chatterbox_cli.models import gpt2_fused, t3

torch.manual_seed(0)
config = t3.T3Config.tiny_turbo()
backbone = t3.GPT2Backbone(config)
with torch.no_grad():  # LayerNorms and biases away from their neutral initial values
    for m in backbone.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.normal_(1.0, 0.3)
            m.bias.normal_(0.0, 0.3)
        elif isinstance(m, nn.Linear):
            m.bias.normal_(0.0, 0.3)
rows, prompt, capacity = 3, 9, 16
x = torch.randn(rows, prompt + 1, config.hidden_size)
calls = {"layer_norm_linear": 0, "linear_add_": 0}
for name in calls:
    kernel = getattr(gpt2_fused, name)
    def counted(*args, _kernel=kernel, _name=name, **kwargs):
        calls[_name] += 1
        return _kernel(*args, **kwargs)
    setattr(gpt2_fused, name, counted)

def step(dtype, fused):
    t3.FUSED_GPT2_DECODE = fused
    model = copy.deepcopy(backbone).to(dtype)
    shape = (config.n_layers, 2, rows, config.n_heads, capacity, config.head_dim)
    views = t3.layer_views(torch.zeros(shape, dtype=dtype), rows)
    valid = torch.ones(rows, capacity, dtype=torch.bool)
    columns = torch.arange(prompt)
    with torch.inference_mode():
        model.forward_cached(x[:, :prompt].to(dtype), views, columns, columns.expand(rows, -1), valid)
        last = torch.tensor([prompt])
        return model.forward_cached(x[:, prompt:].to(dtype), views, last, last.expand(rows, 1), valid)

result = {"reference": step(torch.float64, False)}
for dtype in (torch.float16, torch.bfloat16):
    before = dict(calls)
    result[(dtype, True)] = step(dtype, True)
    result[("calls", dtype)] = {k: calls[k] - before[k] for k in calls}
    result[(dtype, False)] = step(dtype, False)
torch.save(result, sys.argv[1])
"""


@pytest.mark.skipif(
    TRITON_MISSING, reason="triton is not installed (its interpreter runs the kernels on CPU)"
)
def test_turbo_decode_step_takes_the_fused_kernels(
    tmp_path: Path, make_child_env: Callable[..., dict[str, str]]
) -> None:
    """A decode step of the tiny Turbo backbone (3 rows, after a 9-token prefill) goes through the fused
    kernels, two of each per block, and lands as close to float64 as the torch path's 16-bit step does.

    The bound: the fused step makes a subset of the torch step's roundings to 16 bits (each kernel keeps
    float32 inside and rounds once, where the torch path also rounds after the LayerNorm, the bias, the
    GELU and before each residual add), and the attention is the same code in both. So its distance from
    float64 is of the torch path's order; twice that, plus one output ulp per unit of the result, leaves room
    for the different rounding points, whatever machine rounds. A wrong formula (a missing bias, an
    unnormalised input, the residual dropped) is off by the size of the values themselves."""
    out = tmp_path / "steps.pt"
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_STEP_RUN, str(out)],
        env=make_child_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(out)
    reference = result["reference"]
    layers = 2  # T3Config.tiny_turbo
    for dtype, ulp in ((torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        assert result[("calls", dtype)] == {"layer_norm_linear": 2 * layers, "linear_add_": 2 * layers}
        fused, torch_path = (result[(dtype, f)].double() for f in (True, False))
        assert fused.shape == reference.shape == (3, 1, 64)
        torch_error = (torch_path - reference).abs().max()
        fused_error = (fused - reference).abs()
        assert (fused_error <= 2 * torch_error + ulp * reference.abs()).all(), (dtype, fused_error.max())
