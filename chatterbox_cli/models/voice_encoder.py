"""Speaker embedding network (the `ve.safetensors` part of the checkpoint).

A 3-layer LSTM reads 160-frame windows ("partials") of a 40-band, 16 kHz mel power spectrogram; the last
layer's final hidden state is projected to 256 values, passed through a ReLU and scaled to unit length.
An utterance embedding is the unit-length mean of its partial embeddings.

The mel front end is computed here with torch (STFT) and numpy (filterbank, silence trimming); it follows
the reference's conventions: centred STFT with reflect padding and a periodic Hann window, squared
magnitudes, Slaney-style mel filters, no pre-emphasis, no log.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_cli.errors import ChatterboxError, CheckpointError

# Pre-trim silence detection (what the reference calls with top_db=20 before the mel).
_TRIM_FRAME = 2048
_TRIM_HOP = 512


@dataclass(frozen=True)
class VoiceEncoderConfig:
    sample_rate: int = 16000
    num_mels: int = 40
    n_fft: int = 400
    hop_size: int = 160
    win_size: int = 400
    fmin: float = 0.0
    fmax: float = 8000.0
    mel_power: float = 2.0
    hidden_size: int = 256
    num_layers: int = 3
    embed_size: int = 256
    partial_frames: int = 160
    final_relu: bool = True
    # Utterance-level defaults, as the reference's voice preparation uses them.
    rate: float = 1.3  # partials per second of audio
    min_coverage: float = 0.8  # keep a last, zero-padded partial if it holds this share of real frames

    @classmethod
    def english(cls) -> VoiceEncoderConfig:
        return cls()

    @classmethod
    def tiny(cls) -> VoiceEncoderConfig:
        # Still emits 256-d embeddings so T3 configs need not care which VE produced them.
        return replace(cls(), hidden_size=32)


# --------------------------------------------------------------------------------------------------
# Mel front end


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    # Linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log_part = 1000.0 * np.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


@lru_cache(maxsize=8)
def _filterbank_np(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    if fmax > sample_rate / 2:
        raise ValueError(f"fmax {fmax} is above the Nyquist frequency of {sample_rate} Hz")
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2)
    edges = _mel_to_hz_slaney(edges_mel)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (bin_hz[None, :] - left) / (centre - left)
    fall = (right - bin_hz[None, :]) / (right - centre)
    # Triangles are stored in fp32, then scaled so each band has unit area (Slaney normalisation).
    tri = np.maximum(0.0, np.minimum(rise, fall)).astype(np.float32)
    area_norm = 2.0 / (edges[2:] - edges[:-2])
    return (tri * area_norm[:, None]).astype(np.float32)


def mel_filterbank(config: VoiceEncoderConfig) -> Tensor:
    """Slaney-normalised mel filters, fp32, shape [num_mels, n_fft // 2 + 1]."""
    fb = _filterbank_np(config.sample_rate, config.n_fft, config.num_mels, config.fmin, config.fmax)
    return torch.from_numpy(fb.copy())


def trim_silence(wav: np.ndarray, top_db: float) -> np.ndarray:
    """Cut leading/trailing audio whose frame RMS is more than `top_db` below the loudest frame.

    Frames are 2048 samples every 512, centred on zero-padded audio; the kept span runs from the first
    loud frame's start to the end of the last loud frame's hop (clipped to the clip).
    """
    wav = np.asarray(wav, dtype=np.float32)
    n = wav.shape[-1]
    padded = np.pad(wav, _TRIM_FRAME // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, _TRIM_FRAME)[::_TRIM_HOP]
    power = np.mean(np.square(frames, dtype=np.float32), axis=-1, dtype=np.float32)
    floor = 1e-10
    db = 10.0 * np.log10(np.maximum(power, floor)) - 10.0 * np.log10(max(float(power.max()), floor))
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return wav[:0]
    start = int(loud[0]) * _TRIM_HOP
    end = min(n, (int(loud[-1]) + 1) * _TRIM_HOP)
    return wav[start:end]


def melspectrogram(wav: Tensor | np.ndarray, config: VoiceEncoderConfig) -> Tensor:
    """Mel power spectrogram of a 1-D 16 kHz clip, fp32, time-major: [1 + len // hop, num_mels]."""
    x = torch.as_tensor(wav).to(torch.float32)
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {tuple(x.shape)}")
    if x.numel() <= config.n_fft // 2:
        raise ChatterboxError(
            f"Voice clip is too short for the voice encoder ({x.numel()} samples after trimming silence); "
            "use a clip with at least a few seconds of speech."
        )
    window = torch.hann_window(config.win_size, periodic=True, dtype=torch.float32, device=x.device)
    spec = torch.stft(
        x,
        n_fft=config.n_fft,
        hop_length=config.hop_size,
        win_length=config.win_size,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec.abs().pow(config.mel_power)
    fb = mel_filterbank(config).to(x.device)
    return (fb @ power).transpose(0, 1).contiguous()


def partial_step(config: VoiceEncoderConfig, rate: float) -> int:
    """Frames between the starts of consecutive partials for `rate` partials per second."""
    frames_per_s = config.sample_rate / config.hop_size
    step = int(np.round(frames_per_s / rate))
    if not 0 < step <= config.partial_frames:
        raise ValueError(
            f"rate {rate} gives a partial step of {step} frames; it must be in 1..{config.partial_frames}"
        )
    return step


def partial_layout(n_frames: int, step: int, partial_frames: int, min_coverage: float) -> tuple[int, int]:
    """How many partials cover `n_frames`, and the frame count they span (the mel is cut or zero-padded)."""
    if n_frames <= 0:
        raise ValueError("cannot split an empty mel into partials")
    full, leftover = divmod(max(n_frames - partial_frames + step, 0), step)
    # The last, partly filled window counts when enough of it is real audio (or when it is the only one).
    tail_share = (leftover + partial_frames - step) / partial_frames
    count = full + 1 if full == 0 or tail_share >= min_coverage else full
    return count, partial_frames + step * (count - 1)


# --------------------------------------------------------------------------------------------------
# Network


class VoiceEncoder(nn.Module):
    def __init__(self, config: VoiceEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VoiceEncoderConfig()
        self.lstm = nn.LSTM(
            config.num_mels, config.hidden_size, num_layers=config.num_layers, batch_first=True
        )
        self.proj = nn.Linear(config.hidden_size, config.embed_size)
        # Training-time similarity scale/offset; unused for inference but part of the checkpoint.
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def forward(self, partials: Tensor) -> Tensor:
        """Unit-length embeddings [B, embed_size] of mel windows [B, partial_frames, num_mels]."""
        _, (h_n, _) = self.lstm(partials.to(self.proj.weight.dtype))
        emb = self.proj(h_n[-1])
        if self.config.final_relu:
            emb = F.relu(emb)
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def embeds_from_mels(
        self,
        mels: Sequence[Tensor],
        *,
        rate: float | None = None,
        min_coverage: float | None = None,
        batch_size: int = 32,
    ) -> Tensor:
        """Unit-length fp32 utterance embeddings [len(mels), embed_size] of mels [T_i, num_mels]."""
        cfg = self.config
        step = partial_step(cfg, cfg.rate if rate is None else rate)
        coverage = cfg.min_coverage if min_coverage is None else min_coverage
        if not 0 < coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {coverage}")

        windows: list[Tensor] = []
        counts: list[int] = []
        for mel in mels:
            mel = mel.to(self.device, torch.float32)
            count, span = partial_layout(mel.shape[0], step, cfg.partial_frames, coverage)
            if span > mel.shape[0]:
                mel = F.pad(mel, (0, 0, 0, span - mel.shape[0]))
            # [count, num_mels, partial_frames] -> [count, partial_frames, num_mels]
            windows.append(mel[:span].unfold(0, cfg.partial_frames, step).transpose(1, 2))
            counts.append(count)
        stacked = torch.cat(windows)
        partial_embeds = torch.cat([self(chunk) for chunk in stacked.split(batch_size)]).float()
        means = torch.stack([group.mean(dim=0) for group in partial_embeds.split(counts)])
        return means / means.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def embeds_from_wavs(
        self,
        wavs: Sequence[Tensor | np.ndarray],
        sample_rate: int = 16000,
        *,
        trim_top_db: float | None = 20.0,
        rate: float | None = None,
        min_coverage: float | None = None,
        batch_size: int = 32,
    ) -> Tensor:
        """Utterance embeddings [len(wavs), embed_size] of mono clips.

        Clips at another rate are resampled with soxr first. Leading/trailing silence more than
        `trim_top_db` below the loudest frame is cut (None: no trimming).
        """
        cfg = self.config
        mels = []
        for wav in wavs:
            audio = (
                wav.detach().cpu().float().numpy() if isinstance(wav, Tensor) else np.asarray(wav, np.float32)
            )
            if audio.ndim != 1:
                raise ValueError(f"expected mono 1-D clips, got shape {audio.shape}")
            if sample_rate != cfg.sample_rate:
                import soxr

                audio = soxr.resample(audio, sample_rate, cfg.sample_rate, quality="HQ").astype(np.float32)
            if trim_top_db:
                audio = trim_silence(audio, trim_top_db)
            mels.append(melspectrogram(torch.from_numpy(np.ascontiguousarray(audio)).to(self.device), cfg))
        return self.embeds_from_mels(mels, rate=rate, min_coverage=min_coverage, batch_size=batch_size)

    def embed_utterance(self, wav_16k: Tensor | np.ndarray) -> Tensor:
        """Speaker embedding [embed_size] (fp32, unit length) of one 16 kHz mono clip."""
        return self.embeds_from_wavs([wav_16k], self.config.sample_rate)[0]


def load_voice_encoder(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> VoiceEncoder:
    """Build the VE from `ve.safetensors` or `ve.pt` (sizes read from the tensor shapes), in eval mode.

    The whole file is a few MB, so it is read at once; the LSTM keeps its own flat weight list, which is
    why this goes through `load_state_dict` rather than swapping parameters in place.
    """
    from chatterbox_cli.checkpoint import TensorFile

    path = Path(path)
    with TensorFile(path) as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    if "proj.weight" not in state or "lstm.weight_ih_l0" not in state:
        raise CheckpointError(
            f"{path} is not a VoiceEncoder checkpoint (no proj.weight / lstm.weight_ih_l0)."
        )
    layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l"))
    embed, hidden = state["proj.weight"].shape
    cfg = replace(
        VoiceEncoderConfig(),
        num_mels=state["lstm.weight_ih_l0"].shape[1],
        hidden_size=hidden,
        embed_size=embed,
        num_layers=layers,
    )
    model = VoiceEncoder(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not match the VoiceEncoder layout (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}); download the checkpoint again."
        )
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------------
# Random weights for test checkpoints


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def random_state_dict(config: VoiceEncoderConfig | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Seeded fp32 weights under the official `ve.safetensors` names.

    LSTM tensors are uniform in ±1/sqrt(hidden) (PyTorch's own LSTM init); the projection is N(0, 0.05)
    with a small positive bias so the ReLU output is never all zero.
    """
    cfg = config or VoiceEncoderConfig()
    out: dict[str, Tensor] = {
        "similarity_weight": torch.tensor([10.0]),
        "similarity_bias": torch.tensor([-5.0]),
    }
    bound = 1.0 / math.sqrt(cfg.hidden_size)
    gates = 4 * cfg.hidden_size
    for layer in range(cfg.num_layers):
        in_size = cfg.num_mels if layer == 0 else cfg.hidden_size
        shapes = {
            f"lstm.weight_ih_l{layer}": (gates, in_size),
            f"lstm.weight_hh_l{layer}": (gates, cfg.hidden_size),
            f"lstm.bias_ih_l{layer}": (gates,),
            f"lstm.bias_hh_l{layer}": (gates,),
        }
        for name, shape in shapes.items():
            out[name] = (torch.rand(shape, generator=_generator(seed, name)) * 2.0 - 1.0) * bound
    out["proj.weight"] = (
        torch.randn(cfg.embed_size, cfg.hidden_size, generator=_generator(seed, "proj.weight")) * 0.05
    )
    out["proj.bias"] = 0.01 + 0.01 * torch.rand(cfg.embed_size, generator=_generator(seed, "proj.bias"))
    return out
