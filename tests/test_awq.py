"""AWQ core (chatterbox_cli/quant/awq.py), on the CPU: the GEMM layout, exact folding, the searches, the
CPU kernel against the dequantized reference, files."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from chatterbox_cli import service
from chatterbox_cli.models.conds import T3Cond
from chatterbox_cli.models.loading import load_t3
from chatterbox_cli.models.t3 import T3, T3Config
from chatterbox_cli.pipeline import text_tokens
from chatterbox_cli.quant import awq
from chatterbox_cli.quant.plan import quantized_linear_nbytes

TINY_GROUP = 32  # the tiny T3 is 64 wide: groups of 32 (the kernels take 32, 64, 128, 256)
U_BF16 = 2.0**-9  # unit roundoff of bf16 (8 significant bits)
U_FP32 = 2.0**-24


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: str) -> tuple[T3, T3Cond, list[torch.Tensor]]:
    """An unfused float32 tiny T3 (the service fuses q/k/v, which calibration cannot see through), the
    checkpoint's built-in voice and the calibration texts as wrapped text tokens."""
    loaded = service.load(service.LoadRequest(model=tiny_checkpoint, device="cpu"))
    t3 = load_t3(loaded.checkpoint.file("t3"), "cpu", torch.float32)
    assert loaded.builtin_voice is not None
    tokens = [
        text_tokens(loaded.tokenizer, text, i, t3.config)[0] for i, text in enumerate(awq.calibration_texts())
    ]
    return t3, loaded.builtin_voice.t3, tokens


def speech_prompt(config: T3Config, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, length), generator=gen)
    return torch.cat((torch.tensor([[config.start_speech_token]]), tokens), dim=1)


# --- layout ---------------------------------------------------------------------------------------------


def test_nibble_order_on_a_hand_made_example() -> None:
    """Output column c of each input row holds value c (then c + 8): AWQ's order puts columns
    0, 2, 4, 6, 1, 3, 5, 7 in nibbles 0..7, so the word reads 0x75316420 (0xFDB9ECA8 with the sign bit)."""
    low = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 16)  # q [out 8, in 16]: row c is c
    scales = torch.full((8, 2), 0.5)
    packed = awq.pack_gemm(low, scales, torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 2))
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (16, 1)
    assert (packed["qweight"] == 0x75316420).all()
    assert (packed["qzeros"] == 0x75316420).all() and packed["qzeros"].shape == (2, 1)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (2, 8)
    high = awq.pack_gemm(low + 8, scales, low[:, :2] + 8)
    assert (high["qweight"] == 0xFDB9ECA8 - (1 << 32)).all()
    q, _, zeros, group = awq.unpack_gemm(**high)
    assert torch.equal(q, low + 8) and torch.equal(zeros, low[:, :2] + 8) and group == 8


def test_gemm_layout_round_trip_at_group_128() -> None:
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, group = 256, 1024, 128
    q = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, in_f // group), generator=gen, dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // group, generator=gen).half()
    packed = awq.pack_gemm(q, scales, zeros)
    assert packed["qweight"].shape == (in_f, out_f // 8) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (in_f // group, out_f // 8) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (in_f // group, out_f) and packed["scales"].dtype == torch.float16
    q2, scales2, zeros2, group2 = awq.unpack_gemm(**packed)
    assert torch.equal(q2, q) and torch.equal(zeros2, zeros) and torch.equal(scales2, scales)
    assert group2 == group
    assert awq.packed_nbytes({"layer": packed}) == awq.awq_linear_nbytes(out_f, in_f, group)


def test_quantize_groups_is_asymmetric_round_to_nearest() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.02 + 0.01
    q, scales, zeros = awq.quantize_groups(w, 128)
    assert q.dtype == zeros.dtype == torch.uint8 and int(q.max()) <= 15 and int(zeros.max()) <= 15
    assert torch.equal(scales, scales.half().float())  # what the file stores
    # inside each group's [min, max] every weight is within half a step of its grid point
    error = (awq.dequantize(q, scales, zeros, 128) - w).reshape(64, 2, 128).abs()
    assert (error <= scales[..., None] * 0.5 * (1 + 1e-3) + 1e-7).all()


def test_quantization_config() -> None:
    config = awq.AwqConfig()
    assert config.quantization_config() == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    }
    assert awq.AwqConfig.from_quantization_config(config.quantization_config()) == config
    assert len(config.alpha_grid) == 20 and config.alpha_grid[0] == 0.0 and config.alpha_grid[-1] == 1.0
    with pytest.raises(ValueError):
        awq.AwqConfig(bits=3)


def test_t3_awq_bytes_are_within_1_1x_nf4() -> None:
    """Full-size T3 backbone shapes: AWQ GEMM bytes against bitsandbytes nf4's (the issue's <= 1.1x)."""
    config = T3Config.english()
    shapes = [(1024, 1024)] * 4 + [(4096, 1024)] * 2 + [(1024, 4096)]
    awq_bytes = config.n_layers * sum(awq.awq_linear_nbytes(o, i) for o, i in shapes)
    nf4_bytes = config.n_layers * sum(quantized_linear_nbytes("nf4", o, i) for o, i in shapes)
    assert awq_bytes <= 1.1 * nf4_bytes


# --- calibration and folding ----------------------------------------------------------------------------


def test_calibration_records_means_and_a_capped_sample() -> None:
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 50, 16, generator=gen) for _ in range(4)]
    calibration = awq.Calibration(sample_rows=64).collect(net, ["0", "2"], lambda: [net(b) for b in batches])
    assert type(net[0]) is nn.Linear and type(net[2]) is nn.Linear  # put back
    seen = torch.cat([b.reshape(-1, 16) for b in batches])
    first = calibration["0"]
    assert first.count == 600 and first.rows.shape == (64, 16)
    torch.testing.assert_close(first.mean_abs, seen.abs().mean(0))
    assert all((seen == row).all(-1).any() for row in first.rows)  # a sample of the rows seen
    assert calibration["2"].rows.shape == (64, 32)


@pytest.mark.parity
def test_folding_scales_is_exact(tiny: tuple[T3, T3Cond, list[torch.Tensor]]) -> None:
    """Fold random s (log-uniform in [0.1, 10]) into every group without quantizing: the speech logits
    are the same function.

    In float64 the fold is an identity up to float64 rounding (relative 1e-16 per operation; bound 1e-12).
    In float32 each folded weight is rounded once more (relative <= 2^-24): a matmul with rounded weights
    moves by <= 2^-24 * sum |x||w|, no more than the bound on that matmul's own float32 rounding, so the
    folded model's distance to the exact (float64) logits is at most about twice the unfolded one's; 4x
    leaves room for the spread of a maximum over random rounding errors."""
    t3, cond, tokens = tiny
    text, speech = tokens[5][None], speech_prompt(t3.config, 40, 0)
    groups = awq.t3_scale_groups(t3)
    gen = torch.Generator().manual_seed(0)
    scales = {
        g.prev: torch.empty(t3.get_submodule(g.source).in_features).uniform_(-2.3, 2.3, generator=gen).exp()
        for g in groups
    }

    def logits(model: T3, dtype: torch.dtype, fold: bool) -> torch.Tensor:
        model = copy.deepcopy(model).to(dtype)
        if fold:
            for g in groups:
                awq.fold_scales(model, g, scales[g.prev].to(dtype))
        with torch.no_grad():
            return model(text, speech, cond.to(dtype=dtype), cfg=True).speech_logits.double()

    exact = logits(t3, torch.float64, fold=False)
    size = exact.abs().max()
    assert (logits(t3, torch.float64, fold=True) - exact).abs().max() <= 1e-12 * size
    before = (logits(t3, torch.float32, fold=False) - exact).abs().max()
    after = (logits(t3, torch.float32, fold=True) - exact).abs().max()
    assert before <= 64 * U_FP32 * size  # the float32 forward itself: a few ulps of the largest logit
    assert after <= 4 * before


def test_groups_and_fusion_are_checked(tiny: tuple[T3, T3Cond, list[torch.Tensor]]) -> None:
    t3 = copy.deepcopy(tiny[0])
    groups = awq.t3_scale_groups(t3)
    assert len(groups) == 4 * t3.config.n_layers
    assert groups[1] == awq.ScaleGroup("tfmr.layers.0.self_attn.v_proj", ("tfmr.layers.0.self_attn.o_proj",))
    t3.tfmr.fuse_projections()
    with pytest.raises(ValueError, match="fuse_projections"):
        awq.t3_scale_groups(t3)


# --- searches -------------------------------------------------------------------------------------------


def test_awq_beats_round_to_nearest_with_outlier_channels() -> None:
    """A 256 x 512 layer whose inputs have 8 channels 30x larger than the rest (outlier features of a
    Llama residual stream). Searched on 512 calibration rows, measured on 512 others. Seen: relative MSE
    RTN 0.97 %, scales only 0.30 %, scales + clip 0.25 %."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 256, 512
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    gain = torch.ones(in_f)
    gain[torch.randperm(in_f, generator=gen)[:8]] = 30.0
    calibration_rows = torch.randn(512, in_f, generator=gen) * gain
    rows = torch.randn(512, in_f, generator=gen) * gain
    config = awq.AwqConfig(group_size=128)
    reference = rows @ w.t()

    def error(effective: torch.Tensor) -> float:
        return float((rows @ effective.t() - reference).pow(2).mean() / reference.pow(2).mean())

    search = awq.search_scales(calibration_rows.abs().mean(0), calibration_rows, [w], config)
    s = search.scales
    assert search.alpha > 0 and search.error < search.rtn_error
    clip = awq.search_clip(w * s, calibration_rows / s, config)
    rtn_err = error(awq.fake_quantize(w, 128))
    scaled_err = error(awq.fake_quantize(w * s, 128) / s)
    awq_err = error(awq.fake_quantize(w * s, 128, clip) / s)
    assert awq_err < scaled_err < rtn_err
    assert awq_err < 0.5 * rtn_err


# --- the runtime layer ----------------------------------------------------------------------------------


@pytest.mark.parity
def test_cpu_kernel_matches_dequantize_then_matmul() -> None:
    """int4pack-cpu against the float32 dequantized weight, elementwise, within a first-order bound.

    The kernel rounds to bf16 (unit roundoff u = 2^-9) the activations, the scales s and offsets
    (8 - z) s of w = (q - 8) s + (8 - z) s, and the output; it accumulates in float32. So
    |y' - y| <= u (sum_k |x_k| s_k (|q_k - 8| + |8 - z_k|) + sum_k |x_k| |w_k| + |y|)
              + k 2^-24 sum_k |x_k| |w_k|  (float32 accumulation), to first order in u."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, group = 256, 512, 128
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    bias = torch.randn(out_f, generator=gen) * 0.1
    packed = awq.pack_gemm(*awq.quantize_groups(w, group)) | {"bias": bias.half()}
    layer = awq.AwqLinear.from_packed(packed)
    assert layer.kernel == "int4pack-cpu"
    reference = awq.AwqLinear.from_packed(packed, kernel="dequant-matmul")
    x = torch.randn(2, 5, in_f, generator=gen) * torch.logspace(-2, 1, in_f)  # a wide dynamic range
    y, y_ref = layer(x), reference(x)
    assert y.shape == (2, 5, out_f) and y.dtype == torch.float32

    q, s, z, _ = awq.unpack_gemm(packed["qweight"], packed["qzeros"], packed["scales"])
    s = s.float().repeat_interleave(group, 1)
    z = z.float().repeat_interleave(group, 1)
    w_deq = reference.dequantized_weight()
    ax = x.abs().reshape(-1, in_f)
    grid = s * ((q.float() - 8).abs() + (8 - z).abs())
    matmul = ax @ w_deq.abs().t()
    bias_part = (
        bias.half().float().abs()
    )  # the bias is added in float32 after the kernel, exactly as in y_ref
    bound = U_BF16 * (ax @ grid.t() + matmul + (y_ref.reshape(-1, out_f) - bias_part).abs() + bias_part)
    bound += in_f * U_FP32 * matmul
    assert ((y - y_ref).abs().reshape(-1, out_f) <= bound).all()
    torch.testing.assert_close(reference.dequantized_weight(), awq.fake_quantize(w, group))


@pytest.mark.gpu
def test_cuda_kernel_matches_dequantize_then_matmul() -> None:
    """int4pack-cuda (tinygemm, sm80+) against the float32 dequantized weight. As the CPU bound, with 2u
    for u: tinygemm may also round the dequantized weight, and (q - 8) * s before adding the offset, to
    bf16 (two more roundings of the same terms)."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("tinygemm needs sm80+")
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, group = 1024, 4096, 128
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    packed = awq.pack_gemm(*awq.quantize_groups(w, group))
    layer = awq.AwqLinear.from_packed(packed, device="cuda")
    assert layer.kernel == "int4pack-cuda"
    reference = awq.AwqLinear.from_packed(packed, kernel="dequant-matmul")
    x = torch.randn(2, in_f, generator=gen) * torch.logspace(-2, 1, in_f)
    y, y_ref = layer(x.cuda()).cpu(), reference(x)
    q, s, z, _ = awq.unpack_gemm(packed["qweight"], packed["qzeros"], packed["scales"])
    grid = s.float().repeat_interleave(group, 1) * (
        (q.float() - 8).abs() + (8 - z.float().repeat_interleave(group, 1)).abs()
    )
    matmul = x.abs() @ reference.dequantized_weight().abs().t()
    bound = 2 * U_BF16 * (x.abs() @ grid.t() + matmul + y_ref.abs()) + in_f * U_FP32 * matmul
    assert ((y - y_ref).abs() <= bound).all()


def test_kernel_choice() -> None:
    assert awq.choose_kernel("cpu", 1024, 4096, 128) == "int4pack-cpu"
    assert awq.choose_kernel("cpu", 24, 64, 32) == "dequant-matmul"  # the CPU kernel wants out % 16 == 0
    assert awq.choose_kernel("cpu", 64, 64, 16) == "dequant-matmul"  # and groups of 32..256
    assert awq.choose_kernel("meta", 1024, 1024, 128) == "dequant-matmul"


# --- the whole model, and files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tiny: tuple[T3, T3Cond, list[torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    t3, cond, tokens = tiny
    config = awq.AwqConfig(group_size=TINY_GROUP)
    model = copy.deepcopy(t3)
    groups = awq.t3_scale_groups(model)
    # teacher-forced over given speech tokens, plus one text whose speech tokens are decoded first
    texts = tokens[::5]
    speech = [speech_prompt(model.config, 40, i)[0, 1:] for i in range(len(texts))]
    given = awq.t3_calibration_run(model, cond, texts, speech)
    decoded = awq.t3_calibration_run(model, cond, tokens[1:2], max_new_tokens=6)
    calibration = awq.calibrate(model, groups, lambda: (given(), decoded()), config)
    assert calibration[groups[0].source].rows.shape == (config.sample_rows, model.config.hidden_size)
    return awq.quantize_t3(model, calibration, config)


def test_quantize_t3_end_to_end(
    tiny: tuple[T3, T3Cond, list[torch.Tensor]], quantized: dict[str, dict[str, torch.Tensor]]
) -> None:
    t3, cond, tokens = tiny
    names = sorted(n for g in awq.t3_scale_groups(t3) for n in g.linears)
    assert sorted(n for n, ts in quantized.items() if "qweight" in ts) == names
    norms = sorted(n for n, ts in quantized.items() if "qweight" not in ts)
    assert norms == sorted(
        f"tfmr.layers.{i}.{n}"
        for i in range(t3.config.n_layers)
        for n in ("input_layernorm", "post_attention_layernorm")
    )
    model = copy.deepcopy(t3)
    assert awq.apply_awq(model, quantized) == names
    assert {model.get_submodule(n).kernel for n in names} == {"int4pack-cpu"}
    text, speech = tokens[7][None], speech_prompt(t3.config, 40, 1)
    with torch.no_grad():
        reference = t3(text, speech, cond, cfg=True).speech_logits
        logits = model(text, speech, cond, cfg=True).speech_logits
    # seen: 0.14 % relative MSE on the tiny random model (a 4-bit model stays close to its float one)
    assert (logits - reference).pow(2).mean() / reference.pow(2).mean() < 0.01
    assert model.generate(text, cond, max_new_tokens=4, cuda_graph=False).shape[0] <= 4


def test_save_load_round_trip(
    tmp_path: Path,
    tiny: tuple[T3, T3Cond, list[torch.Tensor]],
    quantized: dict[str, dict[str, torch.Tensor]],
) -> None:
    config = awq.AwqConfig(group_size=TINY_GROUP)
    path = awq.save_awq(tmp_path / "t3_awq.safetensors", quantized, config, {"calibration": "test"})
    assert json.loads((tmp_path / awq.CONFIG_FILE).read_text()) == config.quantization_config()
    loaded = awq.load_awq(path)
    assert loaded.config.quantization_config() == config.quantization_config()
    assert loaded.metadata["calibration"] == "test"
    assert loaded.packed.keys() == quantized.keys()
    for name, tensors in quantized.items():
        assert loaded.packed[name].keys() == tensors.keys()
        for key, tensor in tensors.items():
            assert loaded.packed[name][key].dtype == tensor.dtype
            assert torch.equal(loaded.packed[name][key], tensor), (name, key)
    (tmp_path / awq.CONFIG_FILE).write_text(json.dumps(config.quantization_config() | {"bits": 8}))
    with pytest.raises(ValueError, match="disagrees"):
        awq.load_awq(path)


# --- the Triton GEMV (sm75) -----------------------------------------------------------------------------

U_FP16 = 2.0**-11
TRITON_MISSING = importlib.util.find_spec("triton") is None

# Under Triton's interpreter (TRITON_INTERPRET=1, read when the kernel is decorated, so in a fresh process):
# runs the GEMV, and AwqLinear forced to triton-gemv, on the CPU tensors of cases.pt; writes outputs.pt.
INTERPRETER_RUN = """
import sys

import torch

from chatterbox_cli.quant import awq, awq_triton

cases = torch.load(sys.argv[1])
outputs = []
for case in cases:
    q, scales, zeros, group = case["q"], case["scales"], case["zeros"], case["group"]
    qpairs = q[:, 0::2] | q[:, 1::2] << 4
    outputs.append(awq_triton.gemv(case["x"], qpairs, scales, zeros, group, case["bias"]))
# the layer: 3 rows through the GEMV, 6 through dequantize-then-matmul (dequant-matmul's numbers)
case = cases[-1]
packed = awq.pack_gemm(case["q"], case["scales"], case["zeros"]) | {"bias": case["bias"]}
layer = awq.AwqLinear.from_packed(packed, kernel="triton-gemv")
reference = awq.AwqLinear.from_packed(packed, kernel="dequant-matmul")
x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(9)).half()
buffers = sorted(name for name, _ in layer.named_buffers())
direct = awq_triton.gemv(x[0], layer.qpairs, layer.scales, layer.zeros, layer.group_size, layer.bias)
torch.save(
    {
        "gemv": outputs,
        "buffers": buffers,
        "layer_3": layer(x[:1]),
        "direct_3": direct[None],
        "layer_6": layer(x),
        "dequant_6": reference(x),
    },
    sys.argv[2],
)
"""


def gemv_case(
    out_f: int, in_f: int, group: int, rows: int, bias: bool, dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    """Random weights quantized at `group`, inputs [rows, in] of a wide dynamic range, an fp16 bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    q, scales, zeros = awq.quantize_groups(w, group)
    x = torch.randn(rows, in_f, generator=gen) * torch.logspace(-2, 1, in_f)  # a wide dynamic range
    b = (torch.randn(out_f, generator=gen) * 0.1).half() if bias else None
    return {"q": q, "scales": scales.half(), "zeros": zeros, "group": group, "x": x.to(dtype), "bias": b}


def gemv_error_bound(case: dict[str, Any], y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result of the dequantized weight, and a rigorous bound on the GEMV's distance to it.

    The kernel adds, per step of BLOCK_K inputs (inside one group), s * (sum_k q_k x_k - z * sum_k x_k) to
    a float32 accumulator, then the bias, and rounds once to y's dtype. Products q_k x_k are exact for fp16
    x (4 + 11 significant bits) and rounded once for float32 x; each term q_k x_k s or z x_k s then meets
    at most BLOCK_K - 1 additions in the step's sums, z * sum x, the subtraction, the product with s,
    in/BLOCK_K additions into the accumulator and the bias addition: m <= BLOCK_K + in/BLOCK_K + 4
    <= in + 8 float32 roundings. Whatever the summation order (or FMA contraction, which only removes
    roundings), the float32 result is within gamma_m * T of the exact one, gamma_m = m u / (1 - m u),
    u = 2^-24, T = sum_k |x_k| s_k (q_k + z_k) + |b| (the magnitudes summed; larger than sum |x||w|
    because of the factored zero point). Rounding to y's dtype (unit roundoff u_y) adds u_y |y_fp32|, plus
    2^-25 where an fp16 result is subnormal; float32 underflow needs magnitudes near 2^-126, not reached.
    """
    q, s, z, group, x, b = (case[k] for k in ("q", "scales", "zeros", "group", "x", "bias"))
    w = awq.dequantize(q, s, z, group).double()
    b64 = torch.zeros(q.shape[0], dtype=torch.float64) if b is None else b.double()
    y_ref = x.double() @ w.t() + b64
    s_full = s.double().repeat_interleave(group, 1)
    z_full = z.double().repeat_interleave(group, 1)
    magnitude = x.double().abs() @ (s_full * (q.double() + z_full)).t() + b64.abs()
    m = q.shape[1] + 8
    gamma = m * U_FP32 / (1 - m * U_FP32)
    u_y, eta = (U_FP16, 2.0**-25) if y_dtype == torch.float16 else (U_FP32, 0.0)
    bound = gamma * magnitude + u_y * (y_ref.abs() + gamma * magnitude) + eta
    return y_ref, bound


GEMV_CASES = [  # out, in, group, rows, bias, x dtype: steps of 32..128 inputs, one or several per group
    (64, 128, 32, 1, False, torch.float16),
    (96, 256, 64, 2, True, torch.float16),
    (256, 256, 128, 3, True, torch.float16),
    (200, 256, 128, 4, False, torch.float16),  # out not a multiple of BLOCK_N
    (64, 512, 256, 1, True, torch.float16),  # two steps per group
    (48, 192, 96, 2, False, torch.float16),  # a group of 96: steps of 32
    (128, 256, 32, 4, True, torch.float32),
    (128, 256, 64, 3, True, torch.float16),  # also the layer check's weights
]


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed (its interpreter runs the kernel on CPU)")
def test_triton_gemv_in_the_interpreter_matches_dequantize(tmp_path: Path) -> None:
    """The sm75 GEMV's numbers on CPU tensors, by Triton's interpreter (numpy float32 arithmetic, the same
    roundings as the GPU's up to order and FMA), within `gemv_error_bound` of the float64 result; and
    AwqLinear forced to triton-gemv: one copy of the weight, the GEMV for <= 4 rows, dequantize-then-
    matmul beyond."""
    cases = [gemv_case(*shape, seed=i) for i, shape in enumerate(GEMV_CASES)]
    torch.save(cases, tmp_path / "cases.pt")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETER_RUN, str(tmp_path / "cases.pt"), str(tmp_path / "outputs.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    for shape, case, y in zip(GEMV_CASES, cases, outputs["gemv"], strict=True):
        assert y.shape == (shape[3], shape[0]) and y.dtype == shape[5], shape
        y_ref, bound = gemv_error_bound(case, y.dtype)
        assert ((y.double() - y_ref).abs() <= bound).all(), shape
    assert outputs["buffers"] == ["qpairs", "scales", "zeros"]
    assert outputs["layer_3"].shape == (1, 3, 128) and torch.equal(outputs["layer_3"], outputs["direct_3"])
    assert torch.equal(outputs["layer_6"], outputs["dequant_6"])


CUDA_GEMV_SHAPES = [(1024, 1024, 1), (4096, 1024, 2), (1024, 4096, 4), (1000, 512, 3)]  # out, in, rows


@pytest.mark.gpu
def test_triton_gemv_on_cuda_matches_dequantize() -> None:
    """triton-gemv forced on a CUDA GPU (it needs no sm80 instruction, so sm80+ cards run it too), at
    T3's full-size shapes, within `gemv_error_bound` of the float64 result; more than 4 rows take
    dequantize-then-matmul, as a dequant-matmul layer does."""
    pytest.importorskip("triton")
    for i, (out_f, in_f, rows) in enumerate(CUDA_GEMV_SHAPES):
        case = gemv_case(out_f, in_f, 128, rows, True, torch.float16, seed=i)
        packed = awq.pack_gemm(case["q"], case["scales"], case["zeros"]) | {"bias": case["bias"]}
        layer = awq.AwqLinear.from_packed(packed, device="cuda", kernel="triton-gemv")
        assert layer.kernel == "triton-gemv"
        y = layer(case["x"].cuda()).cpu()
        assert y.shape == (rows, out_f) and y.dtype == torch.float16
        y_ref, bound = gemv_error_bound(case, y.dtype)
        assert ((y.double() - y_ref).abs() <= bound).all(), (out_f, in_f, rows)
    x = torch.randn(8, 512, device="cuda").half()  # the last layer's input width
    reference = awq.AwqLinear.from_packed(packed, device="cuda", kernel="dequant-matmul")
    assert torch.equal(layer(x), reference(x))


def test_triton_gemv_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without triton (a missing package: the world's edge, so simulated) the kernel says what it needs."""
    from chatterbox_cli.quant import awq_triton

    assert "triton-gemv" in awq.KERNELS
    assert awq_triton.block_k(128) == 128 and awq_triton.block_k(256) == 128 and awq_triton.block_k(96) == 32
    monkeypatch.setattr(awq_triton, "triton", None)
    assert not awq_triton.available()
    packed = awq.pack_gemm(*awq.quantize_groups(torch.randn(64, 128), 32))
    with pytest.raises(RuntimeError, match="needs triton"):
        awq.AwqLinear.from_packed(packed, kernel="triton-gemv")
    with pytest.raises(RuntimeError, match="needs triton"):
        awq_triton.gemv(torch.zeros(1, 128), torch.zeros(64, 64, dtype=torch.uint8), None, None, 32)


def test_kernel_choice_on_turing(monkeypatch: pytest.MonkeyPatch) -> None:
    """sm75 takes the Triton GEMV where Triton runs (triton_support: the GPU and the machine's toolchain,
    the world at the edge here), else dequantize-then-matmul; sm80+ keeps tinygemm."""
    from chatterbox_cli import triton_support

    capability = (7, 5)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton_support, "runs_on", lambda device: True)
    assert awq.choose_kernel("cuda", 1024, 4096, 128) == "triton-gemv"
    assert awq.choose_kernel("cuda", 24, 64, 32) == "triton-gemv"  # any shape the layout holds
    assert awq.choose_kernel("cpu", 1024, 4096, 128) == "int4pack-cpu"
    monkeypatch.setattr(triton_support, "runs_on", lambda device: False)
    assert awq.choose_kernel("cuda", 1024, 4096, 128) == "dequant-matmul"
    capability = (8, 0)
    monkeypatch.setattr(triton_support, "runs_on", lambda device: True)
    assert awq.choose_kernel("cuda", 1024, 4096, 128) == "int4pack-cuda"
    assert awq.choose_kernel("cuda", 1024, 960, 96) == "dequant-matmul"  # as before: not a tinygemm group
