"""T3 model, loading and decoding on the tiny config; parity with the reference through fixtures.

Parity tolerance (fp32, CPU): max |ours - reference| <= rounding_tolerance(T3_REDUCTIONS) * max|reference|
for every compared tensor (observed: <= 6.3e-7 relative under every instruction-set setting tried). Sampled
token sequences must be identical.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rounding import rounding_tolerance
from safetensors import safe_open
from safetensors.torch import save_file

from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.models.conds import T3Cond
from chatterbox_cli.models.loading import load_module_from_safetensors, load_t3
from chatterbox_cli.models.sampling import SamplingSettings
from chatterbox_cli.models.t3 import T3, T3Config, combine_cfg, random_state_dict, t3_tensor_shapes
from chatterbox_cli.testing.checkpoint_writer import random_conds, write_random_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "parity_t3.safetensors"
GREEDY = SamplingSettings(temperature=0.0)


def tiny_cond(seed: int = 0, with_prompt: bool = True) -> T3Cond:
    t3 = random_conds(seed)["t3"]
    return T3Cond(
        t3["speaker_emb"], t3["cond_prompt_speech_tokens"] if with_prompt else None, t3["emotion_adv"]
    )


TEXT = torch.tensor([255, 284, 18, 84, 28, 2, 172, 9, 0])


@pytest.fixture(scope="module")
def model() -> T3:
    m = T3(T3Config.tiny())
    m.load_state_dict(random_state_dict(T3Config.tiny(), seed=0), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)


# -- structure ------------------------------------------------------------------------------------------


def test_english_tensor_names_and_sizes_match_the_official_checkpoint() -> None:
    shapes = t3_tensor_shapes(T3Config.english())
    # 30 layers x 9 tensors + embed_tokens + norm + 13 cond_enc + 6 embeddings/heads (reference state dict).
    assert len(shapes) == 292
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 532_405_248
    assert shapes["tfmr.embed_tokens.weight"] == (8, 1024)
    assert shapes["tfmr.layers.29.self_attn.q_proj.weight"] == (1024, 1024)
    assert shapes["tfmr.layers.0.mlp.down_proj.weight"] == (1024, 4096)
    assert shapes["tfmr.layers.0.post_attention_layernorm.weight"] == (1024,)
    assert shapes["cond_enc.perceiver.pre_attention_query"] == (1, 32, 1024)
    assert shapes["cond_enc.emotion_adv_fc.weight"] == (1024, 1)
    assert shapes["cond_enc.spkr_enc.bias"] == (1024,)
    assert shapes["text_pos_emb.emb.weight"] == (2050, 1024)
    assert shapes["speech_pos_emb.emb.weight"] == (4100, 1024)
    assert shapes["speech_head.weight"] == (8194, 1024)
    assert "speech_head.bias" not in shapes and "tfmr.rope_cos" not in shapes


def test_forward_shapes(model: T3) -> None:
    speech = torch.tensor([[6561, 1, 2, 3]])
    out = model(TEXT[None], speech, tiny_cond())
    cfg = model.config
    assert out.cond_emb.shape == (1, cfg.cond_len, 64)
    assert out.text_logits.shape == (1, len(TEXT), 704)
    assert out.speech_logits.shape == (1, 4, 8194)
    guided = model(TEXT[None], speech, tiny_cond(), cfg=True)
    assert guided.text_logits.shape == (2, len(TEXT), 704) and guided.speech_logits.shape == (2, 4, 8194)
    assert_close(guided.speech_logits[:1], out.speech_logits)  # row 0 is the conditional row (other kernels)
    assert not torch.allclose(guided.speech_logits[1], out.speech_logits[0])
    assert model.encode_cond(tiny_cond(with_prompt=False)).shape == (1, 2, 64)


# -- loading --------------------------------------------------------------------------------------------


def test_load_t3_from_written_checkpoint_is_strict_and_exact(model: T3, tiny_checkpoint: Path) -> None:
    loaded = load_t3(tiny_checkpoint / "t3_cfg.safetensors")
    assert loaded.config == T3Config.tiny()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The RoPE tables are recomputed on load; torch's vectorised cos may differ from run to run by an ulp.
    torch.testing.assert_close(loaded.tfmr.rope_cos, model.tfmr.rope_cos)
    speech = torch.tensor([[6561, 7, 8]])
    assert_close(
        loaded(TEXT[None], speech, tiny_cond()).speech_logits,
        model(TEXT[None], speech, tiny_cond()).speech_logits,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_meta_model_is_materialised_on_target_dtype(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    with torch.device("meta"):
        m = T3(T3Config.tiny())
    assert m.tfmr.rope_cos.is_meta
    load_module_from_safetensors(m, tiny_checkpoint / "t3_cfg.safetensors", "cpu", dtype)
    tensors = [*m.parameters(), *m.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert {p.dtype for p in m.parameters()} == {dtype}
    assert m.tfmr.rope_cos.dtype == torch.float32 and m.tfmr.rope_cos.abs().max() > 0.99
    assert not m.training
    tokens = m.generate(TEXT, tiny_cond(), max_new_tokens=4, sampling=GREEDY, ignore_stop=True)
    assert tokens.shape == (4,) and int(tokens.min()) >= 0 and int(tokens.max()) < 8194


def _rewrite(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    with safe_open(str(src), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(state)
    save_file(state, str(dst))
    return dst


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def edit(state: dict) -> None:
        del state["tfmr.norm.weight"]
        state["extra.weight"] = torch.zeros(2)

    bad = _rewrite(tiny_checkpoint / "t3_cfg.safetensors", tmp_path / "bad.safetensors", edit)
    with torch.device("meta"):
        m = T3(T3Config.tiny())
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor\(s\): tfmr.norm.weight.*unexpected.*extra.weight"
    ):
        load_module_from_safetensors(m, bad, "cpu", torch.float32)


def test_shape_mismatch_is_a_checkpoint_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def edit(state: dict) -> None:
        state["text_head.weight"] = torch.zeros(700, 64)

    bad = _rewrite(tiny_checkpoint / "t3_cfg.safetensors", tmp_path / "bad.safetensors", edit)
    with torch.device("meta"):
        m = T3(T3Config.tiny())
    with pytest.raises(CheckpointError, match=r"text_head.weight has shape \(700, 64\)"):
        load_module_from_safetensors(m, bad, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="does not match the Chatterbox T3"):
        load_t3(bad)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    junk = tmp_path / "t3_cfg.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_t3(junk, config=T3Config.tiny())


# -- decoding -------------------------------------------------------------------------------------------


def _naive_greedy(model: T3, cond: T3Cond, n: int, cfg_weight: float) -> list[int]:
    """Greedy decoding without a KV cache: the whole sequence through the backbone at every step."""
    rows = 2 if cfg_weight > 0 else 1
    seq = model.prompt_embeds(TEXT[None], cond, rows)
    seen = torch.zeros(1, 8194, dtype=torch.bool)
    seen[0, 6561] = True
    out = []
    for i in range(n):
        logits = model.speech_head(model.tfmr(seq)[:, -1])
        if rows == 2:
            logits = combine_cfg(logits, cfg_weight)
        logits = torch.where(seen, torch.where(logits < 0, logits * 1.2, logits / 1.2), logits)
        token = int(logits.argmax())
        out.append(token)
        seen[0, token] = True
        emb = model.speech_emb(torch.tensor([[token]])) + model.speech_pos_emb.emb.weight[i + 1]
        seq = torch.cat((seq, emb.expand(rows, -1, -1)), dim=1)
    return out


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
def test_kv_cache_decoding_equals_full_recompute(model: T3, cfg_weight: float) -> None:
    with torch.inference_mode():
        expected = _naive_greedy(model, tiny_cond(), 12, cfg_weight)
    got = model.generate(TEXT, tiny_cond(), max_new_tokens=12, cfg_weight=cfg_weight, sampling=GREEDY)
    assert got.tolist() == expected


def test_cfg_weight_zero_runs_one_row_and_differs_from_cfg(model: T3) -> None:
    a = model.generate(TEXT, tiny_cond(), max_new_tokens=16, cfg_weight=0.0, sampling=GREEDY)
    b = model.generate(TEXT, tiny_cond(), max_new_tokens=16, cfg_weight=0.5, sampling=GREEDY)
    assert a.shape == b.shape == (16,)
    assert a.tolist() != b.tolist()


def test_seed_reproducibility(model: T3) -> None:
    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return model.generate(TEXT, tiny_cond(), max_new_tokens=20, generator=g, ignore_stop=True).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_token_ends_decoding_and_is_not_returned(model: T3) -> None:
    free = model.generate(TEXT, tiny_cond(), max_new_tokens=10, sampling=GREEDY)
    stop = int(free[4])
    assert stop not in free[:4].tolist()
    # The stop id only steers control flow, so declaring the 5th greedy token the stop token makes
    # decoding end right there with the same logits.
    stopper = T3(replace(model.config, stop_speech_token=stop))
    stopper.load_state_dict(model.state_dict())
    stopper.eval()
    got = stopper.generate(TEXT, tiny_cond(), max_new_tokens=10, sampling=GREEDY)
    assert got.tolist() == free[:4].tolist()
    forced = stopper.generate(TEXT, tiny_cond(), max_new_tokens=10, sampling=GREEDY, ignore_stop=True)
    assert forced.shape == (10,) and stop not in forced.tolist()
    assert forced[:4].tolist() == free[:4].tolist()


def test_max_new_tokens_caps_output(model: T3) -> None:
    for n in (1, 7):
        assert model.generate(TEXT, tiny_cond(), max_new_tokens=n, sampling=GREEDY).shape == (n,)


def test_ignore_stop_decodes_exactly_n(model: T3) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = model.generate(TEXT, tiny_cond(), max_new_tokens=40, generator=g, ignore_stop=True)
    assert tokens.shape == (40,) and tokens.dtype == torch.long
    assert model.config.stop_speech_token not in tokens.tolist()


# -- batched decoding ----------------------------------------------------------------------------------

TEXTS = [
    TEXT,
    torch.tensor([255, 40, 41, 0]),
    torch.tensor([255, 7, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 0]),
]


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
def test_batch_greedy_rows_equal_single_texts(model: T3, cfg_weight: float) -> None:
    """Left padding, per-row RoPE positions and the padding mask make each row decode as if alone."""
    alone = [
        model.generate(t, tiny_cond(), max_new_tokens=14, cfg_weight=cfg_weight, sampling=GREEDY).tolist()
        for t in TEXTS
    ]
    batch = model.generate_batch(
        TEXTS, tiny_cond(), max_new_tokens=14, cfg_weight=cfg_weight, sampling=GREEDY
    )
    assert [b.tolist() for b in batch] == alone


def test_batch_rows_sample_from_their_own_generators_and_leave_when_done(model: T3) -> None:
    """Different limits make texts leave the batch at different steps (the batch is compacted); each
    text still gets exactly the tokens its own seed gives it alone."""
    limits = [5, 37, 20]

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    alone = [
        model.generate(t, tiny_cond(), max_new_tokens=m, generator=gen(s), ignore_stop=True).tolist()
        for t, m, s in zip(TEXTS, limits, (11, 12, 13), strict=True)
    ]
    batch = model.generate_batch(
        TEXTS, tiny_cond(), max_new_tokens=limits, generators=[gen(11), gen(12), gen(13)], ignore_stop=True
    )
    assert [len(b) for b in batch] == limits
    assert [b.tolist() for b in batch] == alone


def test_batch_row_that_stops_leaves_the_others_unchanged(model: T3) -> None:
    free = model.generate_batch(TEXTS, tiny_cond(), max_new_tokens=40, sampling=GREEDY, ignore_stop=True)
    stop = int(free[1][3])
    assert stop not in free[1][:3].tolist()
    stopper = T3(replace(model.config, stop_speech_token=stop))
    stopper.load_state_dict(model.state_dict())
    stopper.eval()
    got = stopper.generate_batch(TEXTS, tiny_cond(), max_new_tokens=40, sampling=GREEDY)
    assert got[1].tolist() == free[1][:3].tolist()
    for row in (0, 2):
        expected = free[row].tolist()
        if stop in expected:  # the declared stop token may end another row too
            expected = expected[: expected.index(stop)]
        assert got[row].tolist() == expected


def test_batch_arguments_are_checked(model: T3) -> None:
    assert model.generate_batch([], tiny_cond()) == []
    with pytest.raises(ValueError, match="2 max_new_tokens for 3 texts"):
        model.generate_batch(TEXTS, tiny_cond(), max_new_tokens=[4, 5])
    with pytest.raises(ValueError, match="1 generators for 3 texts"):
        model.generate_batch(TEXTS, tiny_cond(), max_new_tokens=4, generators=[None])


def test_bad_inputs_are_rejected(model: T3) -> None:
    with pytest.raises(ValueError, match="start with 255"):
        model.generate(TEXT[1:], tiny_cond(), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(TEXT, tiny_cond(), max_new_tokens=0)
    with pytest.raises(ValueError, match="speech length"):
        model.generate(TEXT, tiny_cond(), max_new_tokens=model.config.speech_positions)


# -- parity with the reference --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def parity_model(fixture, tmp_path_factory: pytest.TempPathFactory) -> T3:  # noqa: ANN001
    _, meta = fixture
    assert meta["config"] == "tiny"
    folder = write_random_checkpoint(tmp_path_factory.mktemp("parity"), "tiny", seed=int(meta["seed"]))
    return load_t3(folder / "t3_cfg.safetensors", "cpu", torch.float32)


def _fixture_cond(fx: dict[str, torch.Tensor], with_prompt: bool = True) -> T3Cond:
    prompt = fx["cond_prompt_speech_tokens"] if with_prompt else None
    return T3Cond(fx["speaker_emb"], prompt, fx["emotion_adv"])


# Reduction lengths of a tiny forward: its linear layers (1,537 in all, forward hooks, conditioning
# included) and per layer the attention's scores (head_dim 16) and weighted sums (up to 1,024 positions).
T3_REDUCTIONS = 1_537 + 2 * (16 + 1_024)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= rounding_tolerance(T3_REDUCTIONS) * ref.abs().max().item(), f"max abs err {err}"


def test_parity_conditioning_prefix(parity_model: T3, fixture) -> None:  # noqa: ANN001
    fx, _ = fixture
    with torch.inference_mode():
        assert_close(parity_model.encode_cond(_fixture_cond(fx)), fx["cond_emb"])
        assert_close(parity_model.encode_cond(_fixture_cond(fx, with_prompt=False)), fx["cond_emb_no_prompt"])


def test_parity_teacher_forced_logits(parity_model: T3, fixture) -> None:  # noqa: ANN001
    fx, _ = fixture
    with torch.inference_mode():
        out = parity_model(fx["text_tokens"], fx["speech_tokens"], _fixture_cond(fx))
    assert_close(out.hidden, fx["hidden"])
    assert_close(out.text_logits, fx["text_logits"])
    assert_close(out.speech_logits, fx["speech_logits"])


def test_parity_teacher_forced_logits_with_cfg(parity_model: T3, fixture) -> None:  # noqa: ANN001
    fx, meta = fixture
    with torch.inference_mode():
        out = parity_model(fx["text_tokens"], fx["speech_tokens"], _fixture_cond(fx), cfg=True)
    assert_close(out.hidden, fx["cfg_hidden"])
    assert_close(out.text_logits, fx["cfg_text_logits"])
    assert_close(out.speech_logits, fx["cfg_speech_logits"])
    w = float(meta["cfg_weight"])
    assert_close(combine_cfg(out.speech_logits, w), combine_cfg(fx["cfg_speech_logits"], w))


def test_parity_seeded_decoding(parity_model: T3, fixture) -> None:  # noqa: ANN001
    """The reference samples with torch's global RNG and torch.multinomial; ours with a Generator and the
    equivalent exponential race, so the same seed must give the same tokens."""
    fx, meta = fixture
    runs = json.loads(meta["decode_runs"])
    for i, (seed, n, w, temperature, min_p, top_p, penalty) in enumerate(runs):
        settings = SamplingSettings(temperature, min_p, top_p, penalty)
        tokens = parity_model.generate(
            fx["text_tokens"],
            _fixture_cond(fx),
            max_new_tokens=n,
            cfg_weight=w,
            sampling=settings,
            generator=torch.Generator().manual_seed(seed),
        )
        assert tokens.tolist() == fx[f"decode{i}_tokens"].tolist(), f"run {i}"


def test_parity_greedy_decoding(parity_model: T3, fixture) -> None:  # noqa: ANN001
    """Run 2 of the fixture is the reference with top_p 1e-9, i.e. greedy; our temperature 0 must agree."""
    fx, meta = fixture
    _, n, w, _, _, top_p, penalty = json.loads(meta["decode_runs"])[2]
    assert top_p < 1e-6
    settings = SamplingSettings(temperature=0.0, repetition_penalty=penalty)
    tokens = parity_model.generate(
        fx["text_tokens"], _fixture_cond(fx), max_new_tokens=n, cfg_weight=w, sampling=settings
    )
    assert tokens.tolist() == fx["decode2_tokens"].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg_weight", [0.0, 0.5])
def test_cuda_graph_decoding_equals_eager_decoding(model: T3, cfg_weight: float) -> None:
    gpu = T3(model.config)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to("cuda").eval()
    text = torch.tensor([[255, 10, 20, 30, 0]])
    cond = tiny_cond().to("cuda")

    def decode(graph: bool) -> torch.Tensor:
        g = torch.Generator(device="cuda").manual_seed(7)
        out = gpu.generate(
            text, cond, max_new_tokens=40, cfg_weight=cfg_weight, generator=g, cuda_graph=graph
        )
        return out.cpu()

    eager = decode(False)
    assert gpu.last_decode_mode == "eager"
    graphed = decode(True)
    assert gpu.last_decode_mode == "cuda-graph"
    assert torch.equal(graphed, eager)

    def decode_batch(graph: bool) -> list[list[int]]:
        gens = [torch.Generator(device="cuda").manual_seed(s) for s in (1, 2, 3)]
        out = gpu.generate_batch(
            TEXTS,
            cond,
            max_new_tokens=[9, 40, 23],
            cfg_weight=cfg_weight,
            generators=gens,
            ignore_stop=True,
            cuda_graph=graph,
        )
        return [o.tolist() for o in out]

    assert decode_batch(True) == decode_batch(False)  # captured again after each compaction


def test_fused_projections_share_storage_and_decode_the_same(model: T3) -> None:
    fused = T3(model.config)
    fused.load_state_dict(model.state_dict())
    fused.eval().tfmr.fuse_projections()
    attn, mlp = fused.tfmr.layers[0].self_attn, fused.tfmr.layers[0].mlp
    assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        a = model(TEXT[None], TEXT[None, :4] + 6000, tiny_cond(), cfg=True).speech_logits
        b = fused(TEXT[None], TEXT[None, :4] + 6000, tiny_cond(), cfg=True).speech_logits
    assert_close(b, a)  # fused matmuls: other kernels, rounding only
    expected = model.generate(TEXT, tiny_cond(), max_new_tokens=12, sampling=GREEDY)
    assert fused.generate(TEXT, tiny_cond(), max_new_tokens=12, sampling=GREEDY).tolist() == expected.tolist()


# -- RoPE against Llama 3's published scaling ----------------------------------------------------------
# The reference builds its backbone with transformers' llama3 rope scaling and, in llama_configs.py,
# rope_theta 500000, factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192.


def llama3_reference_inv_freq(
    head_dim: int,
    theta: float = 500000.0,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max: int = 8192,
) -> torch.Tensor:
    """transformers' _compute_llama3_parameters, step by step in float64."""
    out = []
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    for i in range(0, head_dim, 2):
        inv_freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * torch.pi / inv_freq
        if wavelen > low_freq_wavelen:
            out.append(inv_freq / factor)
        elif wavelen < high_freq_wavelen:
            out.append(inv_freq)
        else:
            smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * inv_freq / factor + smooth * inv_freq)
    return torch.tensor(out, dtype=torch.float64)


def reference_rope_tables(inv_freq: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("config", [T3Config.english(), T3Config.tiny()], ids=["english", "tiny"])
def test_rope_frequencies_and_tables_match_llama3_scaling(config: T3Config) -> None:
    from chatterbox_cli.models.t3 import llama3_inverse_frequencies, rope_tables

    expected = llama3_reference_inv_freq(config.head_dim)
    ours = llama3_inverse_frequencies(config).double()
    # ours are computed in float32, like transformers': 2.6e-7 relative at most
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0.0)
    cos, sin = rope_tables(config)
    ref_cos, ref_sin = reference_rope_tables(expected, config.max_positions)
    # float32 frequencies times positions up to 6,184: 2.6e-4 at most on the English tables
    torch.testing.assert_close(cos, ref_cos, rtol=0.0, atol=1e-3)
    torch.testing.assert_close(sin, ref_sin, rtol=0.0, atol=1e-3)


def test_rope_bands_of_the_english_config() -> None:
    """Of the 32 English frequencies, wavelengths under 2,048 positions are kept, over 8,192 divided by 8,
    and the three between (pairs 15, 16, 17) blended."""
    from chatterbox_cli.models.t3 import llama3_inverse_frequencies

    raw = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = llama3_inverse_frequencies(T3Config.english()).double() / raw
    torch.testing.assert_close(ratio[:15], torch.ones(15, dtype=torch.float64), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ratio[18:], torch.full((14,), 0.125, dtype=torch.float64), rtol=1e-6, atol=0.0)
    assert ((ratio[15:18] < 0.99) & (ratio[15:18] > 0.13)).all()


def test_sharp_attention_over_long_sequences_uses_llama3_rope() -> None:
    """q and k 30x larger make attention peaked, and 700 positions reach the blended frequency band, so the
    output depends on the exact RoPE: it must equal the output with the reference tables swapped in."""
    config = T3Config.tiny()
    state = random_state_dict(config, seed=0)
    for name in state:
        if name.startswith("tfmr.layers.") and name.endswith(("q_proj.weight", "k_proj.weight")):
            state[name] = state[name] * 30
    m = T3(config)
    m.load_state_dict(state)
    m.eval()
    gen = torch.Generator().manual_seed(0)
    text = torch.cat((torch.tensor([255]), torch.randint(1, 700, (200,), generator=gen), torch.tensor([0])))
    speech = torch.cat((torch.tensor([6561]), torch.randint(0, 6561, (499,), generator=gen)))

    def logits(tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if tables is not None:
            m.tfmr.rope_cos, m.tfmr.rope_sin = tables
        with torch.inference_mode():
            return m(text[None], speech[None], tiny_cond()).speech_logits

    ours = logits()
    reference = logits(reference_rope_tables(llama3_reference_inv_freq(16), config.max_positions))
    assert (ours - reference).abs().max() <= 2e-3  # observed 1.1e-4 (float32 frequencies)
    # a high_freq_factor of 4.5 instead of 4 moves the output far outside that tolerance
    wrong_freq = llama3_reference_inv_freq(16, high_freq_factor=4.5)
    wrong = logits(reference_rope_tables(wrong_freq, config.max_positions))
    assert (wrong - reference).abs().max() > 0.1
