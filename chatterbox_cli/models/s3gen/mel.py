"""Log-mel spectrogram of 24 kHz audio, as S3Gen's flow decoder and HiFT vocoder expect it.

80 slaney-scale mel bands up to 8 kHz, 1920-point FFT, hop 480 (50 frames/s). The filterbank is
built here in numpy (slaney mel scale, slaney area normalisation), so librosa is not needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 24000
    n_fft: int = 1920
    hop_length: int = 480
    win_length: int = 1920
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-5  # magnitudes are clamped to this before the log
    power_eps: float = 1e-9  # added to |X|^2 before the square root


S3GEN_MEL = MelConfig()

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above it.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _LINEAR_HZ_PER_MEL
    above = hz >= _BREAK_HZ
    safe = np.where(above, hz, _BREAK_HZ)
    return np.where(above, _BREAK_MEL + np.log(safe / _BREAK_HZ) / _LOG_STEP, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _LINEAR_HZ_PER_MEL
    above = mel >= _BREAK_MEL
    return np.where(above, _BREAK_HZ * np.exp(_LOG_STEP * (mel - _BREAK_MEL)), linear)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters [n_mels, n_fft // 2 + 1] (float32), each scaled to unit area in Hz / 2.

    Computed in float64; the triangles are rounded to float32 before the area scaling, which
    reproduces librosa's default ``filters.mel`` bit for bit.
    """
    fft_hz = np.arange(n_fft // 2 + 1) * (1.0 / (n_fft * (1.0 / sample_rate)))
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    # distance of every edge frequency to every FFT bin frequency: [n_mels + 2, n_bins]
    offset = edges_hz[:, None] - fft_hz[None, :]
    rising = -offset[:-2] / widths[:-1, None]
    falling = offset[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_scale = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    return (triangles.astype(np.float64) * area_scale[:, None]).astype(np.float32)


@lru_cache(maxsize=16)
def _filterbank(config: MelConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    fb = slaney_mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
    return torch.from_numpy(fb).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _window(config: MelConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(config.win_length, periodic=True, dtype=dtype, device=device)


def mel_filterbank(config: MelConfig = S3GEN_MEL, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The cached float32 filterbank [n_mels, n_fft // 2 + 1] on ``device``."""
    return _filterbank(config, torch.device(device), torch.float32)


def num_frames(num_samples: int, config: MelConfig = S3GEN_MEL) -> int:
    """Mel frames produced for ``num_samples`` samples (the signal is reflect-padded on both sides)."""
    padded = num_samples + 2 * ((config.n_fft - config.hop_length) // 2)
    return (padded - config.n_fft) // config.hop_length + 1


def mel_spectrogram(wav: torch.Tensor, config: MelConfig = S3GEN_MEL) -> torch.Tensor:
    """Natural-log mel magnitudes [B, n_mels, frames] of ``wav`` [B, T] or [T] at ``config.sample_rate``.

    Computed in float32 whatever the input dtype. T must exceed (n_fft - hop) / 2 samples (reflect padding).
    """
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"expected a waveform of shape [B, T] or [T], got {tuple(wav.shape)}")
    wav = wav.to(torch.float32)
    side = (config.n_fft - config.hop_length) // 2
    if wav.shape[-1] <= side:
        raise ValueError(f"waveform of {wav.shape[-1]} samples is too short for a mel frame (need > {side})")
    padded = torch.nn.functional.pad(wav.unsqueeze(1), (side, side), mode="reflect").squeeze(1)
    spec = torch.stft(
        padded,
        config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window=_window(config, wav.device, torch.float32),
        center=False,
        onesided=True,
        return_complex=True,
    )
    power = torch.view_as_real(spec).pow(2).sum(-1)
    magnitude = torch.sqrt(power + config.power_eps)
    mel = torch.matmul(_filterbank(config, wav.device, torch.float32), magnitude)
    return torch.log(torch.clamp(mel, min=config.log_floor))
