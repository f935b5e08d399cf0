"""S3Gen mel front end: filterbank and log-mel against the reference (fixture from scripts/parity/hift.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from chatterbox_cli.models.s3gen.mel import (
    S3GEN_MEL,
    hz_to_mel,
    mel_filterbank,
    mel_spectrogram,
    mel_to_hz,
    num_frames,
)

FIXTURES = Path(__file__).parent / "fixtures"


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
    # bit-exact here; 1e-9 leaves room for a different libm
    assert (ours - expected).abs().max().item() <= 1e-9
    assert torch.equal(ours != 0, expected != 0)


def test_log_mel_matches_reference(fixture: dict[str, torch.Tensor]) -> None:
    ours = mel_spectrogram(fixture["clip"])
    ref = fixture["mel"]
    assert ours.shape == ref.shape == (2, 80, 50)
    # log domain, values in [-11.5, 2]; bit-exact here
    assert (ours - ref).abs().max().item() <= 1e-5


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
    assert torch.allclose(mel, torch.full_like(mel, np.log(S3GEN_MEL.log_floor)))


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
        assert torch.allclose(batch[i], mel_spectrogram(wav[i])[0], atol=1e-6)


def test_rejects_too_short_and_wrong_rank() -> None:
    with pytest.raises(ValueError, match="too short"):
        mel_spectrogram(torch.zeros(700))
    with pytest.raises(ValueError, match="shape"):
        mel_spectrogram(torch.zeros(1, 1, 24000))
