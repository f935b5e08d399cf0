"""VoiceEncoder: weight names, mel front end and embeddings against the reference (fixture from
scripts/parity/voice_encoder.py, same seeded random weights), fp32.

Tolerances follow from float32 rounding (u = 2^-24) and the operation sizes: the filterbank is float64
maths rounded to float32; the mel's error is bounded per element from the FFT's and the band sums';
the network's by the reductions an embedding depends on (see `rounding_tolerance`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rounding import U, rounding_tolerance
from safetensors.torch import load_file

from chatterbox_cli.errors import ChatterboxError, CheckpointError
from chatterbox_cli.models.voice_encoder import (
    VoiceEncoder,
    VoiceEncoderConfig,
    load_voice_encoder,
    mel_filterbank,
    melspectrogram,
    partial_layout,
    partial_step,
    random_state_dict,
    trim_silence,
)

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURE = Path(__file__).parent / "fixtures" / "parity_voice_encoder.safetensors"
OFFICIAL_KEYS = {
    "similarity_weight",
    "similarity_bias",
    "proj.weight",
    "proj.bias",
    *(
        f"lstm.{kind}_{part}_l{layer}"
        for kind in ("weight", "bias")
        for part in ("ih", "hh")
        for layer in range(3)
    ),
}


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def ve() -> VoiceEncoder:
    torch.set_num_threads(1)
    model = VoiceEncoder(VoiceEncoderConfig())
    model.load_state_dict(random_state_dict(VoiceEncoderConfig(), seed=0), strict=True)
    return model.eval()


# Reductions an embedding depends on: 160 steps of 3 LSTM layers whose gates sum input + hidden terms
# (40 + 256, then 256 + 256), the projection (256), and the mel (400-point FFT, 201-bin bands).
EMBED_REDUCTIONS = 160 * (296 + 512 + 512) + 256 + 400 + 201


def assert_embeddings_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= rounding_tolerance(EMBED_REDUCTIONS) * ref.abs().max().item(), err


def mel_tolerance(wav: torch.Tensor | np.ndarray, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |a - b| for two float32 mel power spectrograms [T, 40] of wav (rounding only)."""
    cfg = VoiceEncoderConfig()
    n = cfg.n_fft
    x = torch.as_tensor(wav).double()
    padded = torch.nn.functional.pad(x[None, None], (n // 2, n // 2), mode="reflect")[0, 0]
    window = torch.hann_window(n, periodic=True, dtype=torch.float64)
    abs_sum = padded.unfold(0, n, cfg.hop_size).abs() @ window
    # |delta X| per bin: ceil(log2 n) + 1 butterfly levels, <= 6u of sum |x| each; +2u window rounding
    d = ((6 * (math.ceil(math.log2(n)) + 1) + 2) * U * abs_sum)[:, None]
    fb = mel_filterbank(cfg).double()
    rows, nnz = fb.sum(1)[None, :], (fb > 0).sum(1)[None, :]
    mel_hi = torch.maximum(a, b).double()
    # |delta |X|^2| <= 2|X| d + d^2 + 3u|X|^2, and sum F|X| <= sqrt(sum F * sum F|X|^2) (Cauchy-Schwarz);
    # a band sums nnz non-zero products (sums with exact zeros are exact): gamma_(nnz) of the mel
    return 2 * (2 * d * (rows * mel_hi).sqrt() + rows * d**2 + (nnz + 3) * U * mel_hi)


def assert_mel_close(wav: torch.Tensor | np.ndarray, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err, tol = (ours - ref).double().abs(), mel_tolerance(wav, ours, ref)
    assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.3g}"


def test_state_dict_names_and_shapes_match_the_official_checkpoint() -> None:
    sd = VoiceEncoder().state_dict()
    assert set(sd) == OFFICIAL_KEYS
    assert sd["lstm.weight_ih_l0"].shape == (1024, 40)
    assert sd["lstm.weight_hh_l2"].shape == (1024, 256)
    assert sd["proj.weight"].shape == (256, 256)
    rand = random_state_dict(VoiceEncoderConfig(), seed=0)
    assert {k: v.shape for k, v in rand.items()} == {k: v.shape for k, v in sd.items()}
    assert all(v.dtype == torch.float32 for v in rand.values())


def test_random_state_dict_is_seeded_per_tensor() -> None:
    a = random_state_dict(seed=0)
    b = random_state_dict(seed=0)
    c = random_state_dict(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.weight"], c["proj.weight"])
    assert not torch.equal(a["lstm.weight_ih_l1"], a["lstm.weight_hh_l1"])
    assert a["lstm.weight_hh_l0"].abs().max() <= 1 / 16


def test_tiny_config_loads_its_random_weights_and_keeps_256_d_output() -> None:
    cfg = VoiceEncoderConfig.tiny()
    model = VoiceEncoder(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=3), strict=True)
    out = model(torch.rand(2, cfg.partial_frames, cfg.num_mels))
    assert out.shape == (2, 256)
    # normalising rounds the norm by at most (256 + 4)u
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2), rtol=0, atol=260 * U)


def test_filterbank_matches_librosa_slaney(ref: dict[str, torch.Tensor]) -> None:
    fb = mel_filterbank(VoiceEncoderConfig())
    assert fb.shape == (40, 201) and fb.dtype == torch.float32
    # float64 maths rounded to float32 twice (triangles, then scaled): 2u of the value per side
    assert ((fb - ref["filterbank"]).abs() <= 4 * U * ref["filterbank"].abs()).all()


def test_silence_trim_matches_reference_boundaries(ref: dict[str, torch.Tensor]) -> None:
    clip_a, clip_b = ref["clip_a"].numpy(), ref["clip_b"].numpy()
    assert len(trim_silence(clip_a, 20.0)) == ref["trim_a"].item() < len(clip_a)
    assert len(trim_silence(clip_b, 20.0)) == ref["trim_b"].item()
    # The kept part is the same slice, not only the same length: it starts at a frame boundary.
    kept = trim_silence(clip_a, 20.0)
    start = np.flatnonzero(clip_a == kept[0])[0]
    assert start % 512 == 0 and np.array_equal(clip_a[start : start + len(kept)], kept)


def test_all_silent_clip_is_not_trimmed_like_the_reference() -> None:
    assert len(trim_silence(np.zeros(16000, np.float32), 20.0)) == 16000


def test_melspectrogram_matches_reference(ref: dict[str, torch.Tensor]) -> None:
    cfg = VoiceEncoderConfig()
    mel_raw = melspectrogram(ref["clip_a"], cfg)
    assert mel_raw.shape == ref["mel_a_raw"].shape == (1 + 64000 // 160, 40)
    assert_mel_close(ref["clip_a"], mel_raw, ref["mel_a_raw"])
    trimmed_a = trim_silence(ref["clip_a"].numpy(), 20.0)
    assert_mel_close(trimmed_a, melspectrogram(trimmed_a, cfg), ref["mel_a"])
    trimmed_b = trim_silence(ref["clip_b"].numpy(), 20.0)
    assert_mel_close(trimmed_b, melspectrogram(trimmed_b, cfg), ref["mel_b"])


def test_partial_layout_counts_like_the_reference() -> None:
    assert partial_step(VoiceEncoderConfig(), 1.3) == 77
    assert partial_layout(330, 77, 160, 0.8) == (3, 314)  # tail too thin: cut
    assert partial_layout(287, 77, 160, 0.8) == (3, 314)  # tail kept: zero-padded
    assert partial_layout(100, 77, 160, 0.8) == (1, 160)  # shorter than one window: one padded window
    assert partial_layout(160, 77, 160, 0.8) == (1, 160)


def test_network_matches_reference_on_fixed_windows(ve: VoiceEncoder, ref: dict[str, torch.Tensor]) -> None:
    with torch.inference_mode():
        out = ve(ref["windows"])
    assert_embeddings_close(out, ref["partial_embeds"])


@pytest.mark.parametrize("name", ["a", "b"])
def test_utterance_embedding_matches_reference(
    ve: VoiceEncoder, ref: dict[str, torch.Tensor], name: str
) -> None:
    emb = ve.embed_utterance(ref[f"clip_{name}"])
    assert emb.shape == (256,) and emb.dtype == torch.float32
    assert_embeddings_close(emb, ref[f"embed_{name}"])
    assert abs(emb.norm().item() - 1.0) <= 260 * U  # normalising rounds the norm by (256 + 4)u at most


def test_batched_embeddings_match_reference_and_do_not_depend_on_batch_size(
    ve: VoiceEncoder, ref: dict[str, torch.Tensor]
) -> None:
    clips = [ref["clip_a"].numpy(), ref["clip_b"]]
    out = ve.embeds_from_wavs(clips, sample_rate=16000)
    assert_embeddings_close(out, ref["embed_ab"])
    one_at_a_time = ve.embeds_from_wavs(clips, sample_rate=16000, batch_size=1)
    assert_embeddings_close(one_at_a_time, out)  # other batch sizes: other kernels, rounding only


def test_other_sample_rates_are_resampled_before_embedding(
    ve: VoiceEncoder, ref: dict[str, torch.Tensor]
) -> None:
    import soxr

    clip_24k = soxr.resample(ref["clip_a"].numpy(), 16000, 24000, quality="HQ").astype(np.float32)
    emb = ve.embeds_from_wavs([clip_24k], sample_rate=24000)[0]
    # Resampling round trip differs from the original slightly; the voice must stay the same.
    assert torch.dot(emb, ref["embed_a"]).item() > 0.999


def test_too_short_clip_raises_a_user_error(ve: VoiceEncoder) -> None:
    with pytest.raises(ChatterboxError, match="too short"):
        ve.embed_utterance(np.zeros(100, np.float32))


def test_half_precision_weights_give_close_fp32_embeddings(
    ve: VoiceEncoder, ref: dict[str, torch.Tensor]
) -> None:
    half = VoiceEncoder()
    half.load_state_dict(ve.state_dict())
    half = half.to(torch.bfloat16)
    emb = half.embed_utterance(ref["clip_b"])
    assert emb.dtype == torch.float32
    assert torch.dot(emb, ref["embed_b"]).item() > 0.99


def test_load_voice_encoder_reads_sizes_from_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = VoiceEncoderConfig.tiny()
    state = random_state_dict(cfg, seed=5)
    save_file(state, str(tmp_path / "ve.safetensors"))
    model = load_voice_encoder(tmp_path / "ve.safetensors")
    assert model.config.hidden_size == 32 and model.config.embed_size == 256 and not model.training
    x = torch.rand(1, 160, 40)
    direct = VoiceEncoder(cfg)
    direct.load_state_dict(state)
    torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)


def test_load_voice_encoder_rejects_broken_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "ve.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read .*ve.safetensors.*download the checkpoint again"):
        load_voice_encoder(path)
    state = random_state_dict(seed=0)
    del state["lstm.bias_hh_l2"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="lstm.bias_hh_l2"):
        load_voice_encoder(path)
