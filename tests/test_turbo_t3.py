"""The Turbo T3 (GPT-2 backbone) against the reference (chatterbox-tts 0.1.7) on shared random weights in the
official layout: conditioning, teacher-forced hidden states and logits, and seeded decoding with Turbo's
sampling (fixture: scripts/parity/turbo_t3.py).

Tolerance as in tests/test_t3.py: rounding_tolerance(reductions) of the largest reference value, the
reductions being every float32 sum on the way (they bound the rounding on any IEEE-754 CPU, whatever the
order of the sums; GELU's tanh and LayerNorm's rsqrt differ by a few ulp between implementations, which is
inside the same bound).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from chatterbox_cli.models import t3 as t3_module
from chatterbox_cli.models.conds import T3Cond
from chatterbox_cli.models.loading import infer_t3_config, load_t3
from chatterbox_cli.models.sampling import SamplingSettings
from chatterbox_cli.models.t3 import T3, GPT2Backbone, T3Config, t3_tensor_shapes
from chatterbox_cli.testing.checkpoint_writer import write_t3
from tests.rounding import rounding_tolerance

FIXTURE = Path(__file__).parent / "fixtures" / "parity_turbo_t3.safetensors"
Fixture = tuple[dict[str, torch.Tensor], dict[str, str]]

# Reduction lengths of the tiny Turbo forward: spkr_enc (256); per layer (2) c_attn, attention c_proj and
# c_fc (64 each), the MLP's c_proj (256), two LayerNorms (64 each, mean and variance), attention scores
# (head_dim 16) and weighted sums (the 49 positions); ln_f and a head (64 each).
TURBO_REDUCTIONS = 256 + 2 * (3 * 64 + 256 + 2 * 2 * 64 + 16 + 49) + 2 * 64


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def t3(fixture: Fixture, tmp_path_factory: pytest.TempPathFactory) -> T3:
    """Our loader on a file written in the official Turbo layout (Conv1D weights [in, out], `wte`)."""
    _, meta = fixture
    assert meta["config"] == "tiny_turbo"
    path = tmp_path_factory.mktemp("turbo-t3") / "t3_turbo_v1.safetensors"
    write_t3(path, T3Config.tiny_turbo(), int(meta["seed"]))
    return load_t3(path, "cpu", torch.float32)


def _cond(fx: dict[str, torch.Tensor]) -> T3Cond:
    return T3Cond(fx["speaker_emb"], fx["cond_prompt_speech_tokens"], fx["emotion_adv"])


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= rounding_tolerance(TURBO_REDUCTIONS) * ref.abs().max().item(), f"max abs err {err}"


def test_the_official_layout_is_read_as_turbo() -> None:
    """The header tells Turbo from English: GPT-2 blocks stored as Conv1D, the unused `wte`."""
    shapes = t3_tensor_shapes(T3Config.turbo())
    assert shapes["tfmr.h.0.attn.c_attn.weight"] == (1024, 3072)  # [in, out]
    assert shapes["tfmr.h.23.mlp.c_proj.weight"] == (4096, 1024)
    assert shapes["tfmr.wte.weight"] == (50276, 1024) and shapes["tfmr.wpe.weight"] == (8196, 1024)
    assert shapes["speech_head.bias"] == (6563,) and "cond_enc.perceiver.pre_attention_query" not in shapes
    assert not any(name.startswith(("text_pos_emb", "speech_pos_emb", "cond_enc.emotion")) for name in shapes)
    from chatterbox_cli.checkpoint import TensorInfo

    header = {name: TensorInfo("F32", shape) for name, shape in shapes.items()}
    assert infer_t3_config(header) == T3Config.turbo()


def test_loading_transposes_conv1d_weights_and_skips_wte(t3: T3) -> None:
    assert isinstance(t3.tfmr, GPT2Backbone)
    assert t3.tfmr.h[0].attn.c_attn.weight.shape == (3 * 64, 64)  # nn.Linear's [out, in]
    assert not hasattr(t3.tfmr, "wte")
    assert t3.config.cond_len == 1 + 30  # speaker + the prompt as it is, no emotion input


def test_parity_conditioning_and_teacher_forced_logits(t3: T3, fixture: Fixture) -> None:
    fx, _ = fixture
    with torch.inference_mode():
        assert_close(t3.encode_cond(_cond(fx)), fx["cond_emb"])
        out = t3(fx["text_tokens"], fx["speech_tokens"], _cond(fx))
    assert_close(out.hidden, fx["hidden"])
    assert_close(out.text_logits, fx["text_logits"])
    assert_close(out.speech_logits, fx["speech_logits"])


def _decode(t3: T3, fx: dict[str, torch.Tensor], run: list[Any], **options: Any) -> list[int]:
    seed, n, temperature, top_k, top_p, penalty = run
    sampling = SamplingSettings(temperature, 0.0, top_p, penalty, top_k=top_k, penalty_last=True)
    tokens = t3.generate(
        fx["text_tokens"],
        _cond(fx),
        max_new_tokens=n + 1,  # the reference samples once before its loop of max_gen_len steps
        cfg_weight=0.0,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )
    return tokens.tolist()


def test_parity_seeded_decoding(t3: T3, fixture: Fixture) -> None:
    """Same seeds, same tokens: temperature, top-k, top-p and then the repetition penalty, whose history is
    the start token at the first step and the generated tokens after."""
    fx, meta = fixture
    for i, run in enumerate(json.loads(meta["decode_runs"])):
        expected = fx[f"decode{i}_tokens"].tolist()
        if expected and expected[-1] == t3.config.stop_speech_token:
            expected = expected[:-1]
        assert _decode(t3, fx, run) == expected, f"run {i}"


def test_parity_the_start_token_is_in_the_history_at_the_first_step_only(t3: T3, fixture: Fixture) -> None:
    """On weights that make the start token likely (its speech_head bias raised), the reference draws it
    often; our decoding draws the same tokens, and with English's history (the start token penalised at
    every step) it would not: this is what tells the two histories apart."""
    fx, meta = fixture
    english = T3(replace(t3.config, start_in_history=True))
    english.load_state_dict(t3.state_dict())
    english.eval()
    bias = float(meta["start_bias"])
    with torch.no_grad():
        for model in (t3, english):
            model.speech_head.bias[t3.config.start_speech_token] += bias
    differs = []
    try:
        for i, run in enumerate(json.loads(meta["start_runs"])):
            expected = fx[f"start{i}_tokens"].tolist()
            assert t3.config.start_speech_token in expected
            assert _decode(t3, fx, run) == expected, f"eager-start run {i}"
            differs.append(_decode(english, fx, run) != expected)
        # a run whose first token is the start token has it in its history from then on either way
        assert any(differs)
    finally:
        with torch.no_grad():
            t3.speech_head.bias[t3.config.start_speech_token] -= bias


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager_decoding(
    t3: T3, fixture: Fixture, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPT-2 decode step (learned positions, biased projections, Turbo's sampling) captured as a CUDA
    graph gives the tokens of eager steps, for a batch of two texts of different lengths; in bf16 the
    steps go through the fused Triton kernels (models/gpt2_fused.py), in float32 through torch."""
    monkeypatch.setattr(t3_module, "FUSED_GPT2_DECODE", True)
    fx, _ = fixture
    gpu = T3(t3.config)
    gpu.load_state_dict(t3.state_dict())
    gpu = gpu.to("cuda", dtype).eval()
    probe = torch.zeros(2, 1, t3.config.hidden_size, device="cuda", dtype=dtype)
    assert (gpu.tfmr.h[0]._fused_kernels(probe) is not None) == (dtype == torch.bfloat16)
    texts = [fx["text_tokens"], fx["text_tokens"][:, :7]]
    sampling = SamplingSettings(0.8, 0.0, 0.95, 1.2, top_k=1000, penalty_last=True)

    def decode(graph: bool) -> list[list[int]]:
        generators = [torch.Generator(device="cuda").manual_seed(s) for s in (3, 4)]
        out = gpu.generate_batch(
            texts,
            _cond(fx).to("cuda"),
            max_new_tokens=80,
            cfg_weight=0.0,
            sampling=sampling,
            generators=generators,
            cuda_graph=graph,
        )
        return [t.tolist() for t in out]

    eager = decode(False)
    graphed = decode(True)
    assert gpu.last_decode_mode == "cuda-graph"
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mlp_gelu_epilogue_on_cuda_is_gpt2s_mlp(t3: T3) -> None:
    """On CUDA GPT2MLP folds c_fc's bias and tanh-GELU into the matmul (cuBLASLt epilogue); it computes
    c_proj(gelu_new(c_fc(x))) all the same. In float32 with TF32 off each sum of K products is within
    gamma_{K+1} (Higham: (K+1) * 2^-24, any order) of the sum of magnitudes; GELU's slope is at most
    1.13 and its float32 evaluation adds a few units of 2^-24; propagated through c_proj, that bounds
    the distance to float64 per output element on any GPU."""
    mlp = t3.tfmr.h[0].mlp
    gpu = GPT2Backbone(t3.config).h[0].mlp
    gpu.load_state_dict(mlp.state_dict())
    gpu = gpu.to("cuda").float()
    x = torch.randn(5, 3, t3.config.hidden_size, generator=torch.Generator().manual_seed(0))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            y = gpu(x.cuda()).cpu().double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    fc_w, fc_b = mlp.c_fc.weight.double(), mlp.c_fc.bias.double()
    pre = x.double() @ fc_w.T + fc_b
    hidden = 0.5 * pre * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (pre + 0.044715 * pre**3)))
    reference = hidden @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    u = 2.0**-24
    proj_w = mlp.c_proj.weight.double().abs()
    fc_error = (mlp.c_fc.in_features + 1) * u * (x.double().abs() @ fc_w.abs().T + fc_b.abs())
    hidden_error = 1.13 * fc_error + 8 * u * hidden.abs()
    bound = hidden_error @ proj_w.T + (mlp.c_proj.in_features + 1) * u * (
        hidden.abs() @ proj_w.T + mlp.c_proj.bias.double().abs()
    )
    assert ((y - reference).abs() <= bound).all()
