"""S3 speech tokenizer: layout, behaviour on tiny weights, and parity with the reference (fixture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rounding import U, rounding_tolerance
from safetensors.torch import load_file

from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.s3gen.speech_tokenizer import (
    DERIVED_BUFFERS,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    periodic_hann,
    random_state_dict,
    slaney_mel_filters,
)

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURES = Path(__file__).parent / "fixtures"
SR = 16_000
# Reductions (in_features, or in_channels x kernel) of the convolutions and matmuls that the encoder's
# output sums through, counted with forward hooks: 2 convolutions, then 6 blocks of (q, k, v, out: 1280,
# FSMN: 31, MLP: 1280 + 5120); the FSQ projection adds 1280.
HIDDEN_REDUCTIONS = 73_344
SQUASH_REDUCTIONS = HIDDEN_REDUCTIONS + 1280


def _clip(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / SR
    return 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)


@pytest.fixture(scope="module")
def tiny() -> SpeechTokenizer:
    torch.manual_seed(0)
    cfg = SpeechTokenizerConfig.tiny()
    model = SpeechTokenizer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=1), strict=True)
    return model


def test_english_config_is_v2_25hz() -> None:
    cfg = SpeechTokenizerConfig.english()
    assert (cfg.n_mels, cfg.n_fft, cfg.hop_length, cfg.sample_rate) == (128, 400, 160, 16_000)
    assert (cfg.n_state, cfg.n_head, cfg.n_layer, cfg.head_dim) == (1280, 20, 6, 64)
    assert cfg.codebook_size == 6561
    assert cfg.token_rate == 25


def test_state_dict_matches_official_layout() -> None:
    with torch.device("meta"):
        sd = SpeechTokenizer(SpeechTokenizerConfig.english()).state_dict()
    # 104 entries in the reference module's state_dict(), buffers included
    assert len(sd) == 104
    assert list(sd)[:2] == ["_mel_filters", "window"]
    expected = {
        "_mel_filters": (128, 201),
        "window": (400,),
        "encoder.conv1.weight": (1280, 128, 3),
        "encoder.conv2.bias": (1280,),
        "encoder.blocks.5.attn.fsmn_block.weight": (1280, 1, 31),
        "encoder.blocks.0.mlp.0.weight": (5120, 1280),
        "encoder.blocks.0.mlp_ln.bias": (1280,),
        "quantizer._codebook.project_down.weight": (8, 1280),
        "quantizer._codebook.project_down.bias": (8,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "encoder.blocks.0.attn.key.bias" not in sd
    assert not any("rope" in k for k in sd)


def test_random_state_dict_is_complete_seeded_and_per_name() -> None:
    cfg = SpeechTokenizerConfig.tiny()
    a = random_state_dict(cfg, seed=3)
    with torch.device("meta"):
        ref = SpeechTokenizer(cfg).state_dict()
    assert list(a) == list(ref)
    assert all(a[k].shape == ref[k].shape and a[k].dtype == torch.float32 for k in a)
    b = random_state_dict(cfg, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = random_state_dict(cfg, seed=4)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    # a tensor depends on its name and the seed only, not on the rest of the model
    deeper = random_state_dict(SpeechTokenizerConfig(**{**cfg.__dict__, "n_layer": 3}), seed=3)
    assert torch.equal(deeper["encoder.blocks.1.mlp.0.weight"], a["encoder.blocks.1.mlp.0.weight"])
    assert all(torch.isfinite(v).all() for v in a.values())


def test_loads_checkpoints_without_derived_buffers() -> None:
    cfg = SpeechTokenizerConfig.tiny()
    sd = {k: v for k, v in random_state_dict(cfg, seed=0).items() if k not in DERIVED_BUFFERS}
    model = SpeechTokenizer(cfg)
    with torch.no_grad():
        model._mel_filters.zero_()
    model.load_state_dict(sd, strict=True)
    assert model._mel_filters.abs().sum() > 0
    assert torch.equal(model.window, torch.hann_window(400))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in sd.items() if "conv1" not in k}, strict=True)


@pytest.mark.parametrize("n", [640 * 20, 640 * 20 + 1, 640 * 20 - 1, 640 * 37 + 320, 9000])
def test_token_count_follows_mel_frames(tiny: SpeechTokenizer, n: int) -> None:
    # n // 160 mel frames (a partial last hop is dropped), then two stride-2 convolutions
    expected = math.ceil((n // 160) / 4)
    tokens, lens = tiny([_clip(n, 0)])
    assert tokens.dtype == torch.long and lens.dtype == torch.long
    assert tokens.shape == (1, expected)
    assert lens.tolist() == [expected]
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 6561


def test_batch_padding_does_not_change_tokens(tiny: SpeechTokenizer) -> None:
    short, long = _clip(SR + 3000, 1), _clip(2 * SR + 700, 2)
    alone, alone_len = tiny([short])
    batch, lens = tiny([long, short])
    assert lens.tolist() == [math.ceil((long.numel() // 160) / 4), alone_len.item()]
    assert torch.equal(batch[1, : alone_len.item()], alone[0])
    # a [B, T] tensor is a batch of equal-length clips
    stacked, _ = tiny(torch.stack([short, short]))
    assert torch.equal(stacked[0], alone[0]) and torch.equal(stacked[1], alone[0])


def test_max_len_truncates(tiny: SpeechTokenizer) -> None:
    wav = _clip(2 * SR, 5)
    full, _ = tiny([wav])
    cut, lens = tiny([wav], max_len=10)
    assert cut.shape == (1, 10) and lens.tolist() == [10]
    # truncation happens on the mel, before the (global-attention) encoder
    mel, _ = tiny.mels([wav])
    with torch.inference_mode():
        expected, _ = tiny.quantize(mel[:, :, :40], torch.tensor([40]))
    assert torch.equal(cut, expected)
    assert not torch.equal(cut[0], full[0, :10])
    longer, _ = tiny([wav], max_len=1000)
    assert torch.equal(longer, full)


def test_long_audio_is_windowed_and_stitched() -> None:
    # small windows so the windowed path runs on a short clip: 600 frames, 2 s overlap, 1 s trimmed
    cfg = SpeechTokenizerConfig(**{**SpeechTokenizerConfig.tiny().__dict__, "window_frames": 600})
    cfg = SpeechTokenizerConfig(**{**cfg.__dict__, "overlap_seconds": 2})
    model = SpeechTokenizer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=2))
    wav = _clip(15 * SR, 7)  # 1500 mel frames -> windows starting at 0, 400, 800, 1200
    tokens, lens = model([wav, _clip(SR, 8)])
    per_window = [150, 150, 150, 75]
    assert lens.tolist() == [sum(per_window) - 25 * (2 * len(per_window) - 2), 25]
    mel, mel_len = model.mels([wav])
    with torch.inference_mode():
        first, _ = model.quantize(mel[:, :, :600], torch.tensor([600]))
        last, _ = model.quantize(mel[:, :, 1200:], torch.tensor([300]))
    assert torch.equal(tokens[0, :125], first[0, :125])
    assert torch.equal(tokens[0, lens[0] - 50 : lens[0]], last[0, 25:])


def test_too_short_or_empty_input_is_a_usage_error(tiny: SpeechTokenizer) -> None:
    with pytest.raises(UsageError, match="too short"):
        tiny([torch.zeros(150)])
    with pytest.raises(UsageError, match="at least one"):
        tiny([])


# ----------------------------------------------------------------------------------------------------
# parity with the reference, full-size random weights (scripts/parity/s3tok.py)


@pytest.fixture(scope="module")
def parity() -> tuple[SpeechTokenizer, dict[str, torch.Tensor]]:
    facts = json.loads((FIXTURES / "parity_s3tok.json").read_text())
    cfg = SpeechTokenizerConfig.english()
    model = SpeechTokenizer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=facts["seed"]), strict=True)
    return model, load_file(str(FIXTURES / "parity_s3tok.safetensors"))


def _wavs(fx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return fx["pcm_a"].float() / 32768, fx["pcm_b"].float() / 32768


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} x scale {scale:.3g}"


def _assert_tokens_equal_off_boundaries(ours: torch.Tensor, ref: torch.Tensor, squash: torch.Tensor) -> None:
    # A token may only differ where a reference FSQ value sits within the squash's rounding bound of a
    # rounding boundary (±0.5).
    differs = ours != ref
    margin = rounding_tolerance(SQUASH_REDUCTIONS) * squash.abs().max().item()
    near = ((squash.abs() - 0.5).abs() <= margin).any(-1)
    assert not (differs & ~near).any(), f"{int(differs.sum())} tokens differ away from rounding boundaries"
    assert differs.float().mean() <= 0.01


def _log_mel_tolerance(wav: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |a - b| for two float32 log-mels [n_mels, T] of wav that differ in rounding only.

    The log-mel is (max(log10 M, max log10 M - 8) + 4) / 4 with M = F |X|^2 (power mel).
    """
    cfg = SpeechTokenizerConfig.english()
    n = cfg.n_fft
    padded = torch.nn.functional.pad(wav.double()[None, None], (n // 2, n // 2), mode="reflect")[0, 0]
    abs_sum = padded.unfold(0, n, cfg.hop_length)[: a.shape[1]].abs() @ periodic_hann(n).double()
    # |delta X| per bin: ceil(log2 n) + 1 butterfly levels, <= 6u of sum |x| each; +2u window rounding
    d = (6 * (math.ceil(math.log2(n)) + 1) + 2) * U * abs_sum
    fb = slaney_mel_filters(cfg.sample_rate, n, cfg.n_mels).double()
    rows, nnz = fb.sum(1)[:, None], (fb > 0).sum(1)[:, None]
    log_a, log_b = 4 * a.double() - 4, 4 * b.double() - 4  # log10 of the floored mel power
    mel_hi = 10 ** torch.maximum(log_a, log_b)
    # |delta |X|^2| <= 2|X| d + d^2 + 3u|X|^2, and sum F|X| <= sqrt(sum F * sum F|X|^2) (Cauchy-Schwarz);
    # the band sums nnz non-zero products (sums with exact zeros are exact): gamma_(nnz) of M
    one_side = 2 * d * (rows * mel_hi).sqrt() + rows * d**2 + (nnz + 3) * U * mel_hi
    # |log10 x - log10 y| <= |x - y| / (ln 10 min(x, y)); the floors are 1-Lipschitz; log10 and +4 round
    tau = 2 * one_side / (math.log(10) * 10 ** torch.minimum(log_a, log_b)) + 4 * U * (log_b.abs() + 4)
    # the 80 dB floor follows the loudest element, which moves no more than tau where either maximum sits
    shift = torch.maximum(tau.flatten()[a.argmax()], tau.flatten()[b.argmax()])
    return (tau + shift) / 4


def test_parity_log_mel(parity: tuple[SpeechTokenizer, dict[str, torch.Tensor]]) -> None:
    model, fx = parity
    wavs = _wavs(fx)
    mel, lens = model.mels(list(wavs))
    assert lens.tolist() == [fx["mel_a"].shape[1], fx["mel_b"].shape[1]]
    for ours, ref, wav in ((mel[0], fx["mel_a"], wavs[0]), (mel[1, :, : lens[1]], fx["mel_b"], wavs[1])):
        err = (ours - ref).double().abs()
        tol = _log_mel_tolerance(wav, ours, ref)
        assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.3g}"
    assert (mel[1, :, lens[1] :] == 0).all()


def test_parity_encoder_fsq_and_tokens(parity: tuple[SpeechTokenizer, dict[str, torch.Tensor]]) -> None:
    model, fx = parity
    wav_a, wav_b = _wavs(fx)
    with torch.inference_mode():
        mel, mel_len = model.mels([wav_a, wav_b])
        hidden, hidden_len = model.encode(mel, mel_len)
        squash = model.quantizer.squash(hidden)
    _assert_close(hidden[0], fx["hidden_a"], rounding_tolerance(HIDDEN_REDUCTIONS))
    _assert_close(squash, fx["squash"], rounding_tolerance(SQUASH_REDUCTIONS))
    tokens, lens = model([wav_a, wav_b])
    assert torch.equal(lens, fx["lens"].long())
    _assert_tokens_equal_off_boundaries(tokens, fx["tokens"].long(), fx["squash"])
    tokens, lens = model([wav_a, wav_b], max_len=40)
    assert torch.equal(lens, fx["lens_max40"].long())
    _assert_tokens_equal_off_boundaries(tokens, fx["tokens_max40"].long(), fx["squash"][:, :40])


@pytest.mark.slow
def test_parity_long_clip_windowed(parity: tuple[SpeechTokenizer, dict[str, torch.Tensor]]) -> None:
    model, fx = parity
    wav_a, wav_b = _wavs(fx)
    tokens, lens = model([torch.cat([wav_a] * 9 + [wav_b]), wav_b])
    assert torch.equal(lens, fx["lens_long"].long())
    # no FSQ values are stored for the 31 s clip, so this one compares ids exactly (they were equal)
    assert torch.equal(tokens, fx["tokens_long"].long())


def test_front_end_stays_fp32_when_module_is_cast() -> None:
    cfg = SpeechTokenizerConfig.tiny()
    model = SpeechTokenizer(cfg).eval()
    model.load_state_dict(random_state_dict(cfg, seed=0))
    wav = _clip(SR, 9)
    mel32 = model.log_mel_spectrogram(wav)
    model.to(torch.bfloat16)
    assert torch.equal(model.log_mel_spectrogram(wav), mel32)
    tokens, lens = model([wav])
    assert tokens.dtype == torch.long and lens.tolist() == [25]
