"""Real bitsandbytes quantization on the CPU (GPU variants marked `gpu`), on a small model that uses the
official T3 tensor names, checked against the plan and the estimate's byte counts."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from chatterbox_cli.checkpoint import safetensors_header
from chatterbox_cli.estimate import component_weights
from chatterbox_cli.presets import plan_for
from chatterbox_cli.quant.bnb import (
    QuantizationError,
    load_quantized,
    make_quantized_linear,
    quantize_module,
    require_bitsandbytes,
    verify_quantized,
)
from chatterbox_cli.quant.plan import (
    ComponentPlan,
    linear_shapes_from_header,
    linear_shapes_from_module,
    quantized_linear_nbytes,
)

bnb = pytest.importorskip("bitsandbytes")
HIDDEN, MLP, LAYERS = 256, 512, 2  # q/k/v/o have 65,536 weights: just at the size rule's limit


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, n, nn.Linear(HIDDEN, HIDDEN, bias=False))


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.up_proj = nn.Linear(HIDDEN, MLP, bias=False)
        self.down_proj = nn.Linear(MLP, HIDDEN, bias=False)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attn()
        self.mlp = MLPBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        x = x + a.o_proj(a.v_proj(x) * torch.sigmoid(a.q_proj(x) * a.k_proj(x)))
        return x + self.mlp.down_proj(nn.functional.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)


class CondEnc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spkr_enc = nn.Linear(256, HIDDEN)
        self.emotion_adv_fc = nn.Linear(1, HIDDEN, bias=False)


class MiniT3(nn.Module):
    """T3's naming pattern at a small size."""

    def __init__(self) -> None:
        super().__init__()
        self.tfmr = Backbone()
        self.cond_enc = CondEnc()
        self.speech_emb = nn.Embedding(96, HIDDEN)
        self.speech_head = nn.Linear(HIDDEN, 96, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.tfmr.layers:
            x = layer(x)
        return self.speech_head(self.tfmr.norm(x))


def random_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, t in MiniT3().state_dict().items():
        sd[name] = (
            torch.ones_like(t) if name.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.02
        )
    save_file(sd, str(path))
    return sd


def reference_model(sd: dict[str, torch.Tensor]) -> MiniT3:
    model = MiniT3()
    model.load_state_dict(sd)
    return model.eval()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(256, 256), (512, 256), (80, 193), (1024, 4096), (7, 100)])
def test_bnb_layer_bytes_equal_the_estimate_formula(mode: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    cp = replace(plan_for("bnb-8bit", {"t3": mode})["t3"], include=("*",), min_params=0, min_in_features=0)
    layer = make_quantized_linear(
        bnb, torch.randn(out_f, in_f), None, cp, torch.device("cpu"), torch.bfloat16
    )
    model = nn.Sequential(layer)
    report = verify_quantized(model, cp)
    assert report.quantized_layers == 1
    assert report.quantized_bytes == report.expected_bytes == quantized_linear_nbytes(mode, out_f, in_f)


@pytest.mark.parametrize(
    ("preset", "mode", "max_err"), [("bnb-8bit", "int8", 0.01), ("bnb-4bit", "nf4", 0.03)]
)
def test_load_quantized_matches_plan_estimate_and_fp32(
    tmp_path: Path, preset: str, mode: str, max_err: float
) -> None:
    path = tmp_path / "t3_cfg.safetensors"
    sd = random_checkpoint(path)
    plan = plan_for(preset)["t3"]
    with torch.device("meta"):
        model = MiniT3()
    load_quantized(model, path, plan, "cpu", torch.bfloat16)
    report = verify_quantized(model, plan, device="cpu")
    assert report.quantized_layers == LAYERS * 7 and report.by_mode == {mode: LAYERS * 7}
    assert all(n.startswith("tfmr.layers.") for n in report.layers)
    # the estimate, from the file's header alone, promises exactly these bytes
    estimate, names = component_weights(safetensors_header(path), plan, "")
    assert names == report.layers
    assert estimate.quantized_layers == report.quantized_layers
    assert estimate.quantized_linear_bytes == report.quantized_bytes
    # heads, cond_enc, embeddings stay 16-bit float
    assert type(model.speech_head) is nn.Linear and model.speech_head.weight.dtype == torch.bfloat16
    assert type(model.cond_enc.emotion_adv_fc) is nn.Linear
    # outputs within the stated error of fp32: per layer int8 ~1.2 %, nf4 ~9 %; on this model 0.5 % and
    # 1.3 % (the residual stream dilutes it)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = reference_model(sd)(x)
        y = model(x.bfloat16())
    err = rel_err(y, ref)
    print(f"{preset}: relative output error vs fp32 {err:.4f}")
    assert 0 < err < max_err, err


def test_quantize_module_after_plain_load_equals_load_quantized(tmp_path: Path) -> None:
    path = tmp_path / "t3_cfg.safetensors"
    sd = random_checkpoint(path)
    plan = plan_for("bnb-8bit")["t3"]
    model = reference_model(sd).to(torch.bfloat16)
    names = quantize_module(model, plan, "cpu", torch.bfloat16)
    assert len(names) == LAYERS * 7
    with torch.device("meta"):
        loaded = MiniT3()
    load_quantized(loaded, path, plan, "cpu", torch.bfloat16)
    assert verify_quantized(model, plan).quantized_bytes == verify_quantized(loaded, plan).quantized_bytes
    x = torch.randn(1, 3, HIDDEN).bfloat16()
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_header_and_module_see_the_same_linears(tmp_path: Path) -> None:
    path = tmp_path / "t3_cfg.safetensors"
    random_checkpoint(path)
    assert linear_shapes_from_header(safetensors_header(path)) == linear_shapes_from_module(MiniT3())


def test_verify_catches_a_float_weight_in_a_linear4bit() -> None:
    # The seed's bug: a Linear4bit that was handed a float weight and never quantized.
    model = MiniT3()
    plan = plan_for("bnb-4bit")["t3"]
    bad = bnb.nn.Linear4bit(HIDDEN, HIDDEN, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    bad.weight = nn.Parameter(model.tfmr.layers[0].self_attn.q_proj.weight.data.clone(), requires_grad=False)
    model.tfmr.layers[0].self_attn.q_proj = bad
    with pytest.raises(QuantizationError, match="does not match the plan") as e:
        verify_quantized(model, plan)
    msg = str(e.value)
    assert (
        "tfmr.layers.0.self_attn.q_proj" in msg and "... (" in msg
    )  # every other planned layer is float too


def test_verify_catches_unplanned_quantization_and_missing_quantization(tmp_path: Path) -> None:
    path = tmp_path / "t3_cfg.safetensors"
    random_checkpoint(path)
    with torch.device("meta"):
        model = MiniT3()
    load_quantized(model, path, plan_for("bnb-8bit")["t3"], "cpu", torch.bfloat16)
    with pytest.raises(QuantizationError, match="planned nf4, found Linear8bitLt"):
        verify_quantized(model, plan_for("bnb-4bit")["t3"])
    with pytest.raises(QuantizationError, match="plan keeps it 16-bit"):
        verify_quantized(model, plan_for("fp16")["t3"])


def test_checkpoint_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    from chatterbox_cli.errors import CheckpointError

    path = tmp_path / "t3_cfg.safetensors"
    sd = random_checkpoint(path)
    sd["tfmr.layers.1.mlp.down_proj.weight"] = torch.zeros(HIDDEN, MLP + 32)
    save_file(sd, str(path))
    with torch.device("meta"):
        model = MiniT3()
    with pytest.raises(CheckpointError, match="down_proj.weight has shape"):
        load_quantized(model, path, plan_for("bnb-4bit")["t3"], "cpu", torch.bfloat16)


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the library is the world's edge
    with pytest.raises(QuantizationError, match=r"pip install 'chatterbox-cli\[quant\]'") as e:
        require_bitsandbytes("cpu")
    assert e.value.exit_code == 1
    model = MiniT3()
    with pytest.raises(QuantizationError):
        quantize_module(model, plan_for("bnb-4bit")["t3"], "cpu", torch.bfloat16)
    # nothing planned: no bitsandbytes needed
    assert quantize_module(model, plan_for("fp16")["t3"], "cpu", torch.bfloat16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["bnb-8bit", "bnb-4bit"])
def test_load_quantized_on_gpu(tmp_path: Path, preset: str) -> None:
    path = tmp_path / "t3_cfg.safetensors"
    sd = random_checkpoint(path)
    plan = plan_for(preset)["t3"]
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        model = MiniT3()
    load_quantized(model, path, plan, "cuda", torch.float16)
    report = verify_quantized(model, plan, device="cuda")
    assert report.quantized_layers == LAYERS * 7
    assert verify_quantized(model, plan, device="cuda:0").quantized_layers == LAYERS * 7
    with pytest.raises(QuantizationError, match="quantized tensors on cuda:0, expected cuda:1"):
        verify_quantized(model, plan, device="cuda:1")  # no second GPU needed: the index is compared
    estimate, _ = component_weights(safetensors_header(path), plan, "")
    assert report.quantized_bytes == estimate.quantized_linear_bytes
    x = torch.randn(2, 5, HIDDEN)
    with torch.inference_mode():
        ref = reference_model(sd)(x)
        y = model(x.half().cuda()).float().cpu()
    assert rel_err(y, ref) < (0.01 if preset == "bnb-8bit" else 0.03)


def _quantized_mini_t3(preset: str) -> tuple[MiniT3, ComponentPlan]:
    model = MiniT3().to(torch.bfloat16)
    plan = plan_for(preset)["t3"]
    quantize_module(model, plan, "cpu", torch.bfloat16)
    assert verify_quantized(model, plan, device="cpu").quantized_layers == LAYERS * 7
    return model, plan


def test_verify_catches_a_real_params4bit_left_unquantized() -> None:
    model, plan = _quantized_mini_t3("bnb-4bit")
    # A Linear4bit built on the host: its weight is a real Params4bit, still float32, never quantized.
    fresh = bnb.nn.Linear4bit(HIDDEN, HIDDEN, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    assert isinstance(fresh.weight, bnb.nn.Params4bit) and fresh.weight.quant_state is None
    model.tfmr.layers[1].self_attn.k_proj = fresh
    with pytest.raises(QuantizationError) as e:
        verify_quantized(model, plan)
    assert str(e.value) == (
        "quantization does not match the plan: tfmr.layers.1.self_attn.k_proj: "
        "Linear4bit whose weight is torch.float32 and not quantized"
    )


def test_verify_catches_a_params4bit_whose_data_is_float_again() -> None:
    model, plan = _quantized_mini_t3("bnb-4bit")
    # The quant state is still there, but the data was swapped for the dequantized floats.
    w = model.tfmr.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.uint8 and w.quant_state is not None
    w.data = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    with pytest.raises(
        QuantizationError, match=r"up_proj: Linear4bit whose weight is torch.bfloat16 and not"
    ):
        verify_quantized(model, plan)


@pytest.mark.parametrize(("preset", "mode"), [("bnb-8bit", "int8"), ("bnb-4bit", "nf4")])
def test_verify_checks_where_the_quantized_tensors_are(preset: str, mode: str) -> None:
    model, plan = _quantized_mini_t3(preset)  # on the CPU, which verify accepts for "cpu"
    for device in ("cuda", "cuda:1", "meta"):
        with pytest.raises(QuantizationError, match=rf"q_proj: quantized tensors on cpu, expected {device}"):
            verify_quantized(model, plan, device=device)
    assert verify_quantized(model, plan, device=torch.device("cpu")).by_mode == {mode: LAYERS * 7}
