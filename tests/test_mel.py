"""S3Gen mel front end: filterbank and log-mel against the reference (fixture from scripts/parity/hift.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rounding import U
from safetensors.torch import load_file

from chatterbox_cli.models.s3gen.mel import (
    S3GEN_MEL,
    hz_to_mel,
    mel_filterbank,
    mel_spectrogram,
    mel_to_hz,
    num_frames,
)

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

FIXTURES = Path(__file__).parent / "fixtures"


def fft_error(n_fft: int, abs_sum: torch.Tensor) -> torch.Tensor:
    """Bound on |computed - exact| of every bin of a float32 FFT of a frame whose sum of |x| is abs_sum.

    Each butterfly level (ceil(log2 n), plus one for the real-input split) adds a twiddle product and a sum,
    at most 6u of its partial sums, whose magnitudes add up to <= abs_sum at every level, whatever the radix
    and the SIMD order. +2u: the window's rounding and the window product.
    """
    return (6 * (math.ceil(math.log2(n_fft)) + 1) + 2) * U * abs_sum


def log_mel_tolerance(wav: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |a - b| for two float32 log-mels of wav [B, T] that differ in rounding only."""
    c = S3GEN_MEL
    side = (c.n_fft - c.hop_length) // 2
    padded = torch.nn.functional.pad(wav.double()[:, None], (side, side), mode="reflect")[:, 0]
    window = torch.hann_window(c.n_fft, periodic=True, dtype=torch.float64)
    abs_sum = padded.unfold(-1, c.n_fft, c.hop_length).abs() @ window  # [B, frames]
    fb = mel_filterbank().double()
    # |delta sqrt(|X|^2 + eps)| <= |delta X| + 4u |X|. The mel sums nnz non-zero products per band (sums
    # with exact zeros are exact): gamma_(nnz) times sum F |X|, which is at most the larger clamped mel.
    nnz = (fb > 0).sum(1)[None, :, None]
    mel_hi = torch.maximum(a, b).double().exp()
    one_side = fb.sum(1)[None, :, None] * fft_error(c.n_fft, abs_sum)[:, None, :] + (nnz + 4) * U * mel_hi
    # |log x - log y| <= |x - y| / min(x, y), the clamp is 1-Lipschitz, and each log is within 1 ulp <= 2u|.|
    return 2 * one_side / torch.minimum(a, b).double().exp() + 4 * U * b.double().abs()


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "parity_hift.safetensors")


def test_filterbank_matches_librosa(fixture: dict[str, torch.Tensor]) -> None:
    shape = json.loads((FIXTURES / "parity_hift.json").read_text())["filterbank_shape"]
    expected = torch.zeros(shape[0] * shape[1])
    expected[fixture["filterbank_index"]] = fixture["filterbank_values"]
    expected = expected.view(*shape)
    ours = mel_filterbank()
    assert ours.shape == expected.shape == (80, 961)
    assert ours.dtype == torch.float32
    # float64 maths rounded to float32 twice (triangles, then scaled), the same steps as librosa: a libm
    # that differs in the last float64 bit can flip each rounding, 2u of the value per side
    assert ((ours - expected).abs() <= 4 * U * expected.abs()).all()
    assert torch.equal(ours != 0, expected != 0)


def test_log_mel_matches_reference(fixture: dict[str, torch.Tensor]) -> None:
    ours = mel_spectrogram(fixture["clip"])
    ref = fixture["mel"]
    assert ours.shape == ref.shape == (2, 80, 50)
    # log domain, values in [-11.5, 2]: next to the floor the log magnifies the FFT's rounding, which is
    # relative to the whole frame, so the bound is per element
    err = (ours - ref).double().abs()
    tol = log_mel_tolerance(fixture["clip"], ours, ref)
    assert (err <= tol).all(), f"max err/tol {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("samples", [721, 1000, 24000, 24479, 24480])
def test_frame_count(samples: int) -> None:
    wav = torch.zeros(samples)
    wav[::7] = 0.1
    mel = mel_spectrogram(wav)
    assert mel.shape == (1, 80, num_frames(samples))
    assert num_frames(samples) == samples // 480  # reflect padding of 720 per side, window 1920


def test_fifty_frames_per_second() -> None:
    assert num_frames(24000) == 50
    assert num_frames(48000) == 100


def test_sine_energy_lands_in_the_band_at_its_frequency() -> None:
    t = torch.arange(24000) / 24000
    mel = mel_spectrogram(0.5 * torch.sin(2 * torch.pi * 1000.0 * t))
    band = mel[0, :, 25].argmax().item()
    # band centres are the interior slaney edges between 0 and 8 kHz
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), 82))[1:-1]
    assert abs(centres[band] - 1000.0) == np.abs(centres - 1000.0).min()


def test_silence_hits_the_log_floor() -> None:
    mel = mel_spectrogram(torch.zeros(2, 4800))
    # the FFT of zeros is exactly zero; only the floor's float32 rounding (u) and the log (1 ulp) remain
    torch.testing.assert_close(mel, torch.full_like(mel, np.log(S3GEN_MEL.log_floor)), rtol=4 * U, atol=U)


def test_slaney_scale() -> None:
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(500.0)) == pytest.approx(7.5)
    assert float(mel_to_hz(hz_to_mel(6400.0))) == pytest.approx(6400.0)
    hz = np.array([0.0, 250.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0, 12000.0])
    assert np.allclose(mel_to_hz(hz_to_mel(hz)), hz)
    assert np.all(np.diff(hz_to_mel(hz)) > 0)


def test_filterbank_is_cached_per_device() -> None:
    assert mel_filterbank() is mel_filterbank(device="cpu")


def test_batch_rows_are_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(3, 9600, generator=gen)
    batch = mel_spectrogram(wav)
    for i in range(3):
        row, alone = batch[i : i + 1], mel_spectrogram(wav[i])
        # a batch may take other FFT and matmul kernels: rounding only
        assert ((row - alone).abs() <= log_mel_tolerance(wav[i : i + 1], row, alone)).all()


def test_rejects_too_short_and_wrong_rank() -> None:
    with pytest.raises(ValueError, match="too short"):
        mel_spectrogram(torch.zeros(700))
    with pytest.raises(ValueError, match="shape"):
        mel_spectrogram(torch.zeros(1, 1, 24000))
