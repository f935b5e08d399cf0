"""S3Gen flow: parity with the reference (fixture from scripts/parity/flow.py), batching, seeding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rounding import rounding_tolerance
from safetensors.torch import load_file

from chatterbox_cli.models.s3gen.conformer import (
    LinearEmbed,
    RelPositionAttention,
    lengths_to_mask,
    query_block_size,
    relative_sinusoids,
)
from chatterbox_cli.models.s3gen.flow import Flow, FlowConfig, cosine_time_grid, random_state_dict

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURE = Path(__file__).parent / "fixtures" / "parity_flow"
# fp32 on both sides; differences come from op order only. Sum of the reduction lengths (in_features, or
# in_channels x kernel) of every linear and convolution that runs, counted with forward hooks: the
# encoder (mu), and the encoder plus every ODE step of the estimator (mel, 10 steps).
MU_REDUCTIONS = {"tiny": 3_008, "english": 58_880}
MEL_REDUCTIONS = {"tiny": 79_360, "english": 1_938_752}


def _assert_rounding_close(ours: torch.Tensor, ref: torch.Tensor, reductions: int) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= rounding_tolerance(reductions) * ref.abs().max().item(), err


def _fixture() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(f"{FIXTURE}.safetensors"), json.loads(Path(f"{FIXTURE}.json").read_text())


def _build(config: FlowConfig, seed: int) -> Flow:
    flow = Flow(config)
    flow.load_state_dict(random_state_dict(config, seed), strict=True)
    return flow.eval()


def _check_case(name: str) -> None:
    t, meta = _fixture()
    case = meta[name]
    config = FlowConfig.english() if case["config"] == "english" else FlowConfig.tiny()
    flow = _build(config, case["seed"])
    tokens, prompt_token = t[f"{name}.tokens"], t[f"{name}.prompt_token"]
    with torch.inference_mode():
        all_tokens = torch.cat([prompt_token, tokens], dim=1)
        mu, mel_lens = flow.encode(all_tokens, torch.tensor([all_tokens.size(1)]))
        assert mel_lens.tolist() == [2 * all_tokens.size(1)]
        _assert_rounding_close(mu, t[f"{name}.mu"], MU_REDUCTIONS[case["config"]])

        mel, lens = flow.inference(
            tokens,
            torch.tensor([tokens.size(1)]),
            prompt_token,
            t[f"{name}.prompt_feat"],
            t[f"{name}.embedding"],
            n_timesteps=case["n_timesteps"],
            noise=t[f"{name}.noise"],
        )
        assert mel.shape == t[f"{name}.mel"].shape
        assert lens.tolist() == [2 * tokens.size(1)]
        _assert_rounding_close(mel, t[f"{name}.mel"], MEL_REDUCTIONS[case["config"]])

        # the reference drew its noise from the global RNG seeded with noise_seed; a generator with the
        # same seed gives the same noise, hence the same mel
        gen = torch.Generator().manual_seed(meta["noise_seed"])
        mel_g, _ = flow.inference(
            tokens,
            torch.tensor([tokens.size(1)]),
            prompt_token,
            t[f"{name}.prompt_feat"],
            t[f"{name}.embedding"],
            n_timesteps=case["n_timesteps"],
            generator=gen,
        )
        torch.testing.assert_close(mel_g, mel)


@pytest.mark.parametrize("name", ["tiny", "tiny5"])
def test_flow_matches_reference_tiny(name: str) -> None:
    _check_case(name)


@pytest.mark.slow
def test_flow_matches_reference_english() -> None:
    torch.set_num_threads(1)
    _check_case("english")


def test_english_state_dict_names_and_shapes() -> None:
    with torch.device("meta"):
        flow = Flow(FlowConfig.english())
    sd = flow.state_dict()
    assert len(sd) == 1121  # `flow.*` tensors of the reference S3Gen
    assert sum(v.numel() for v in sd.values()) == 112_549_360
    assert sd["encoder.encoders.5.self_attn.pos_bias_u"].shape == (8, 64)
    assert sd["decoder.estimator.mid_blocks.11.1.3.ff.net.2.weight"].shape == (256, 1024)
    assert sd["decoder.estimator.up_blocks.0.0.block1.block.0.weight"].shape == (256, 512, 3)
    assert sd["encoder.up_encoders.3.feed_forward.w_1.weight"].shape == (2048, 512)


def test_random_state_dict_is_seeded() -> None:
    a = random_state_dict(FlowConfig.tiny(), seed=3)
    b = random_state_dict(FlowConfig.tiny(), seed=3)
    c = random_state_dict(FlowConfig.tiny(), seed=4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder_proj.weight"], c["encoder_proj.weight"])


def test_cosine_schedule() -> None:
    t = cosine_time_grid(4)
    assert t[0] == 0 and abs(t[-1].item() - 1.0) < 1e-6
    steps = t[1:] - t[:-1]
    assert torch.all(steps[1:] > steps[:-1])  # small steps near the noise end, larger near the data


def _inputs(config: FlowConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_token": torch.randint(0, config.vocab_size, (1, 6), generator=g),
        "prompt_feat": torch.randn(1, 12, config.mel_dim, generator=g),
        "embedding": torch.randn(1, config.spk_embed_dim, generator=g),
    }


def test_batch_of_two_lengths_equals_one_by_one() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    cond = _inputs(config)
    g = torch.Generator().manual_seed(7)
    long_tokens = torch.randint(0, config.vocab_size, (1, 15), generator=g)
    short_tokens = torch.randint(0, config.vocab_size, (1, 9), generator=g)
    total = 2 * (6 + 15)
    noise = torch.randn(2, config.mel_dim, total, generator=g)

    batch_tokens = torch.zeros(2, 15, dtype=torch.long)
    batch_tokens[0] = long_tokens[0]
    batch_tokens[1, :9] = short_tokens[0]
    batch_tokens[1, 9:] = 6562  # padding content must not matter (even a stop token)
    with torch.inference_mode():
        mel, lens = flow.inference(batch_tokens, torch.tensor([15, 9]), **cond, noise=noise)
        alone_long, _ = flow.inference(long_tokens, torch.tensor([15]), **cond, noise=noise[:1])
        alone_short, _ = flow.inference(
            short_tokens, torch.tensor([9]), **cond, noise=noise[1:, :, : 2 * (6 + 9)].contiguous()
        )
    assert lens.tolist() == [30, 18]
    # a batch may take other kernels: rounding only
    _assert_rounding_close(mel[0], alone_long[0], MEL_REDUCTIONS["tiny"])
    _assert_rounding_close(mel[1, :, :18], alone_short[0], MEL_REDUCTIONS["tiny"])
    assert torch.all(mel[1, :, 18:] == 0)


def test_generator_seed_reproduces_and_steps_matter() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    cond = _inputs(config)
    tokens = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([8])

    def run(seed: int, steps: int) -> torch.Tensor:
        with torch.inference_mode():
            mel, _ = flow.inference(
                tokens, lens, **cond, n_timesteps=steps, generator=torch.Generator().manual_seed(seed)
            )
        return mel

    a = run(5, 10)
    assert a.shape == (1, 80, 16)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(run(5, 10), a, atol=0, rtol=0)
    assert not torch.allclose(run(6, 10), a)
    assert not torch.allclose(run(5, 5), a)


def test_out_of_range_tokens_are_rejected() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    with pytest.raises(ValueError, match="drop start/stop tokens"):
        flow.inference(torch.tensor([[1, 2, 6561]]), torch.tensor([3]), **_inputs(config))


def test_wrong_noise_shape_is_rejected() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    with pytest.raises(ValueError, match="noise must have shape"):
        flow.inference(
            torch.tensor([[1, 2, 3]]), torch.tensor([3]), **_inputs(config), noise=torch.zeros(1, 80, 5)
        )


def _unblocked_attention(
    attn: RelPositionAttention, x: torch.Tensor, key_mask: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The textbook computation: full [B, H, T, 2T-1] position scores, shifted by indexing, then softmax.

    Returns the output and the largest |score|.
    """
    b, t, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    pos = relative_sinusoids(t, x.size(2), x.device, x.dtype)
    q = attn.linear_q(x).view(b, t, h, d)
    k = attn.linear_k(x).view(b, t, h, d).transpose(1, 2)
    v = attn.linear_v(x).view(b, t, h, d).transpose(1, 2)
    p = attn.linear_pos(pos).view(1, -1, h, d).transpose(1, 2)
    content = (q + attn.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    position_all = (q + attn.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # [B, H, T, 2T-1]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    position = position_all[:, :, i, t - 1 - i + j]  # column of distance i - j
    scores = (content + position) / d**0.5
    max_score = scores.abs().max().item()
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return attn.linear_out(out.transpose(1, 2).reshape(b, t, h * d)), max_score


# fp32; the blocked SDPA path reorders sums only: q, k, v, position and output projections (64 each),
# scores (head_dim 16), softmax and weighted sum over 37 keys
ATTN_REDUCTIONS = 5 * 64 + 16 + 2 * 37


@pytest.mark.parametrize("block_rows", [1, 3, 7, 37])
def test_blocked_relative_attention_equals_unblocked(block_rows: int) -> None:
    b, t, dim, heads = 3, 37, 64, 4
    g = torch.Generator().manual_seed(0)
    attn = RelPositionAttention(dim, heads)
    with torch.no_grad():
        for param in attn.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    x = torch.randn(b, t, dim, generator=g)
    key_mask = lengths_to_mask(torch.tensor([37, 20, 1]), t)
    # budget for exactly `block_rows` query rows per block in fp32
    attn.block_bytes = b * heads * 4 * block_rows * (t + block_rows - 1)
    assert query_block_size(b, heads, t, 4, attn.block_bytes) == block_rows
    with torch.inference_mode():
        _, pos = LinearEmbed(dim, dim)(x)
        ours = attn(x, key_mask, pos)
        ref, max_score = _unblocked_attention(attn, x, key_mask)
    err = (ours - ref).abs().max().item()
    # softmax turns a score error of delta * |score| into a relative weight error of <= 2 delta |score|
    assert err <= rounding_tolerance(ATTN_REDUCTIONS) * (1 + 2 * max_score) * ref.abs().max().item(), err


def test_flow_with_small_attention_blocks_equals_default() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    cond = _inputs(config)
    tokens = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, config.mel_dim, 2 * (6 + 11), generator=torch.Generator().manual_seed(3))
    lens = torch.tensor([11, 7])
    with torch.inference_mode():
        default, _ = flow.inference(tokens, lens, **cond, n_timesteps=3, noise=noise)
        for module in flow.modules():
            if isinstance(module, RelPositionAttention):
                module.block_bytes = 1  # one query row per block
        blocked, _ = flow.inference(tokens, lens, **cond, n_timesteps=3, noise=noise)
    _assert_rounding_close(blocked, default, MEL_REDUCTIONS["tiny"])  # other kernels: rounding only


def test_per_row_generators_give_each_row_its_own_noise() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 0)
    cond = _inputs(config)
    tokens = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        mel, _ = flow.inference(
            tokens,
            torch.tensor([10, 6]),
            **cond,
            n_timesteps=3,
            generator=[torch.Generator().manual_seed(s) for s in (8, 9)],
        )
        short, _ = flow.inference(
            tokens[1:, :6],
            torch.tensor([6]),
            **cond,
            n_timesteps=3,
            generator=torch.Generator().manual_seed(9),
        )
        with pytest.raises(ValueError, match="generators"):
            flow.inference(tokens, torch.tensor([10, 6]), **cond, generator=[torch.Generator()])
    _assert_rounding_close(mel[1, :, :12], short[0], MEL_REDUCTIONS["tiny"])  # other kernels: rounding only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_estimator_steps_equal_eager_steps() -> None:
    config = FlowConfig.tiny()
    flow = _build(config, 3).to("cuda")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=g).cuda()
    prompt = torch.randint(0, config.vocab_size, (1, 5), generator=g).cuda()
    feat = torch.randn(1, 10, config.mel_dim, generator=g).cuda()
    embedding = torch.randn(1, config.spk_embed_dim, generator=g).cuda()

    def mel(graph: bool, keep: bool = False) -> torch.Tensor:
        flow.decoder.cuda_graph = graph
        gens = [torch.Generator("cuda").manual_seed(s) for s in (1, 2)]
        with torch.inference_mode():
            lens = torch.tensor([12, 7], device="cuda")
            mel, _ = flow.inference(tokens, lens, prompt, feat, embedding, 6, generator=gens, keep_graph=keep)
            return mel

    eager = mel(False)
    torch.testing.assert_close(mel(True), eager, rtol=1e-5, atol=1e-5)
    assert not flow.decoder.kept
    torch.testing.assert_close(mel(True, keep=True), eager, rtol=1e-5, atol=1e-5)
    (kept,) = flow.decoder.kept.values()
    torch.testing.assert_close(mel(True), eager, rtol=1e-5, atol=1e-5)  # every step replays the kept graph
    assert list(flow.decoder.kept.values()) == [kept]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_graphs_of_several_shapes_share_one_pool_and_keep_eager_values() -> None:
    """Graphs of other shapes, kept or not, are captured into the kept graphs' pool between their replays:
    a kept graph must still give its eager values, and only the KEPT_GRAPHS latest shapes stay."""
    from chatterbox_cli.models.s3gen.flow import KEPT_GRAPHS

    config = FlowConfig.tiny()
    flow = _build(config, 3).to("cuda")
    g = torch.Generator().manual_seed(0)
    voice = (
        torch.randint(0, config.vocab_size, (1, 5), generator=g).cuda(),
        torch.randn(1, 10, config.mel_dim, generator=g).cuda(),
        torch.randn(1, config.spk_embed_dim, generator=g).cuda(),
    )
    shapes = range(1, KEPT_GRAPHS + 4)
    inputs = {n: torch.randint(0, config.vocab_size, (n, 8 + n), generator=g).cuda() for n in shapes}

    def mel(n: int, graph: bool = True, keep: bool = False) -> torch.Tensor:
        flow.decoder.cuda_graph = graph
        gens = [torch.Generator("cuda").manual_seed(s) for s in range(n)]
        lens = torch.full((n,), 8 + n, device="cuda")
        with torch.inference_mode():
            out, _ = flow.inference(inputs[n], lens, *voice, 6, generator=gens, keep_graph=keep)
        return out

    eager = {n: mel(n, graph=False) for n in inputs}
    unkept = KEPT_GRAPHS + 3
    for n in range(1, unkept):
        torch.testing.assert_close(mel(n, keep=True), eager[n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mel(unkept), eager[unkept], rtol=1e-5, atol=1e-5)  # not kept, same pool
        torch.testing.assert_close(mel(1), eager[1], rtol=1e-5, atol=1e-5)  # kept, replayed after others
    # the latest shapes, and the one used after each of them
    assert [shape[0] for shape in flow.decoder.kept] == [*range(4, unkept), 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_estimator_replays_as_a_graph_with_eager_values(mode: str) -> None:
    """bitsandbytes layers (threshold-0 int8, nf4) are captured too: the bnb presets' flow replays one
    graph per step. Graph and eager run the same kernels on the same data; the bound only leaves room for
    kernels whose reduction order may vary from run to run (split-K)."""
    from dataclasses import replace

    from chatterbox_cli.models.cuda_graphs import capturable
    from chatterbox_cli.presets import plan_for
    from chatterbox_cli.quant.bnb import quantize_module

    config = FlowConfig.tiny()
    flow = _build(config, 3).half()
    plan = replace(plan_for("bnb-8bit", {"flow": mode})["flow"], min_params=0, min_in_features=1)
    quantize_module(flow, [plan], torch.device("cuda"), torch.float16, prefix="flow.")
    flow = flow.to("cuda")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=g).cuda()
    prompt = torch.randint(0, config.vocab_size, (1, 5), generator=g).cuda()
    feat = torch.randn(1, 10, config.mel_dim, generator=g).cuda()
    embedding = torch.randn(1, config.spk_embed_dim, generator=g).cuda()
    assert capturable(flow.decoder.estimator, feat)

    def mel(graph: bool) -> torch.Tensor:
        flow.decoder.cuda_graph = graph
        with torch.inference_mode():
            lens = torch.tensor([12], device="cuda")
            gen = [torch.Generator("cuda").manual_seed(1)]
            return flow.inference(tokens, lens, prompt, feat, embedding, 6, generator=gen)[0]

    torch.testing.assert_close(mel(True), mel(False), rtol=1e-3, atol=1e-3)
