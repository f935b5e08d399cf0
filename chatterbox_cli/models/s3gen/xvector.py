"""CAM++ speaker x-vector (192-d) with its Kaldi-style log-mel filterbank front end.

The network: a 2-D residual front ("FCM") over the 80 filterbank bins, a strided TDNN, three densely
connected blocks of context-aware-masking TDNN layers with transition layers between them, statistics
pooling (mean and std over time) and a final projection with a non-affine BatchNorm. Runs in eval
mode: every BatchNorm uses its running statistics from the state dict.

Parameter names follow the official checkpoint (`speaker_encoder.*` in s3gen.safetensors).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_cli.errors import UsageError

# ----------------------------------------------------------------------------------------------------
# Kaldi fbank (compute-fbank-feats defaults: 25 ms povey window every 10 ms, no dither, DC removal,
# pre-emphasis 0.97, FFT size rounded up to a power of two, log mel energies floored at float eps)

_FLT_EPS = float(torch.finfo(torch.float32).eps)


def _kaldi_mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_hz: float = 20.0) -> Tensor:
    """Kaldi's triangular filters (in mel, up to Nyquist) over the first n_fft // 2 FFT bins.

    Evaluated in float32 step by step as torchaudio does it: its float32 rounding moves filter weights
    by ~1e-5, and matching it keeps the features equal to what the model was trained on.
    """
    mel_lo, mel_hi = _kaldi_mel(low_hz), _kaldi_mel(sample_rate / 2.0)
    step = (mel_hi - mel_lo) / (num_bins + 1)
    band = torch.arange(num_bins, dtype=torch.float32)[:, None]
    left = mel_lo + band * step
    center = mel_lo + (band + 1.0) * step
    right = mel_lo + (band + 2.0) * step
    bin_hz = (sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32)
    bin_mel = (1127.0 * torch.log(1.0 + bin_hz / 700.0))[None, :]
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def povey_window(n: int) -> Tensor:
    # a symmetric Hann window raised to 0.85: like Hann, but not quite zero next to the edges
    return torch.hann_window(n, periodic=False, dtype=torch.float32).pow(0.85)


def kaldi_fbank(
    wav: Tensor,
    num_mel_bins: int = 80,
    sample_rate: int = 16_000,
    frame_ms: float = 25.0,
    shift_ms: float = 10.0,
    preemphasis: float = 0.97,
) -> Tensor:
    """One waveform [T] -> log mel filterbank energies [frames, num_mel_bins] (only whole frames)."""
    wav = wav.reshape(-1)
    size = int(sample_rate * frame_ms / 1000.0)
    shift = int(sample_rate * shift_ms / 1000.0)
    if wav.numel() < size:
        raise UsageError(
            f"audio of {wav.numel()} samples is too short for the speaker encoder; "
            f"give at least {size} samples ({frame_ms:g} ms) at {sample_rate} Hz"
        )
    n_fft = 1 << (size - 1).bit_length()
    frames = wav.unfold(0, size, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    # pre-emphasis within each frame; the first sample is treated as its own predecessor
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - preemphasis * previous) * povey_window(size).to(frames)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, n_fft, sample_rate).to(power)
    # the Nyquist bin carries no filter weight
    energies = power[:, : n_fft // 2] @ banks.T
    return torch.clamp(energies, min=_FLT_EPS).log()


def extract_features(wavs: list[Tensor], num_mel_bins: int = 80) -> Tensor:
    """Per-clip mean-normalised fbank features, zero-padded to a batch [B, frames, num_mel_bins]."""
    feats = []
    for wav in wavs:
        f = kaldi_fbank(wav.float(), num_mel_bins)
        feats.append(f - f.mean(dim=0, keepdim=True))
    out = feats[0].new_zeros(len(feats), max(f.shape[0] for f in feats), num_mel_bins)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out


# ----------------------------------------------------------------------------------------------------
# network


@dataclass(frozen=True)
class CAMPPlusConfig:
    feat_dim: int = 80
    embedding_size: int = 192
    head_channels: int = 32
    init_channels: int = 128
    growth_rate: int = 32
    bn_size: int = 4
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    sample_rate: int = 16_000

    @classmethod
    def english(cls) -> CAMPPlusConfig:
        return cls()

    @classmethod
    def tiny(cls) -> CAMPPlusConfig:
        return cls(
            embedding_size=24,
            head_channels=4,
            init_channels=16,
            growth_rate=8,
            bn_size=2,
            block_layers=(2, 2, 2),
        )

    def __post_init__(self) -> None:
        if self.feat_dim % 8:
            raise ValueError(f"feat_dim {self.feat_dim} must be a multiple of 8 (three stride-2 stages)")


class BNReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.batchnorm(x))


class ResBlock2d(nn.Module):
    """3x3 residual block; `stride` subsamples the frequency axis only."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class FCM(nn.Module):
    def __init__(self, channels: int, feat_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResBlock2d(channels, channels, 2), ResBlock2d(channels, channels, 1))
        self.layer2 = nn.Sequential(ResBlock2d(channels, channels, 2), ResBlock2d(channels, channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x: Tensor) -> Tensor:
        """[B, F, T] -> [B, channels * F / 8, T]"""
        y = F.relu(self.bn1(self.conv1(x[:, None])))
        y = self.layer2(self.layer1(y))
        y = F.relu(self.bn2(self.conv2(y)))
        return y.flatten(1, 2)


class TDNN(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.nonlinear = BNReLU(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Convolution whose output channels are gated by a context vector (utterance + 100-frame means)."""

    segment = 100

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(in_ch, in_ch // 2, 1)
        self.linear2 = nn.Conv1d(in_ch // 2, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[-1]
        seg = F.avg_pool1d(x, self.segment, self.segment, ceil_mode=True)
        seg = seg.repeat_interleave(self.segment, dim=-1)[..., :t]
        context = x.mean(-1, keepdim=True) + seg
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * gate


class DenseTDNNLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, bn_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = BNReLU(in_ch)
        self.linear1 = nn.Conv1d(in_ch, bn_ch, 1, bias=False)
        self.nonlinear2 = BNReLU(bn_ch)
        self.cam_layer = CAMLayer(bn_ch, out_ch, kernel, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class DenseTDNNBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs."""

    def __init__(self, layers: int, in_ch: int, growth: int, bn_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(
                f"tdnnd{i + 1}", DenseTDNNLayer(in_ch + i * growth, growth, bn_ch, kernel, dilation)
            )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.nonlinear = BNReLU(in_ch)
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean(-1), x.std(-1)], dim=-1)


class PlainBN(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.batchnorm(x)


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)
        self.nonlinear = PlainBN(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x[..., None])[..., 0])


class CAMPPlus(nn.Module):
    def __init__(self, config: CAMPPlusConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or CAMPPlusConfig.english()
        self.head = FCM(c.head_channels, c.feat_dim)
        self.xvector = nn.Sequential()
        self.xvector.add_module("tdnn", TDNN(self.head.out_channels, c.init_channels, 5, stride=2))
        ch = c.init_channels
        blocks = zip(c.block_layers, c.block_kernels, c.block_dilations, strict=True)
        for i, (n, kernel, dilation) in enumerate(blocks, start=1):
            bn_ch = c.bn_size * c.growth_rate
            self.xvector.add_module(
                f"block{i}", DenseTDNNBlock(n, ch, c.growth_rate, bn_ch, kernel, dilation)
            )
            ch += n * c.growth_rate
            self.xvector.add_module(f"transit{i}", TransitLayer(ch, ch // 2))
            ch //= 2
        self.xvector.add_module("out_nonlinear", BNReLU(ch))
        self.xvector.add_module("stats", StatsPool())
        self.xvector.add_module("dense", DenseLayer(2 * ch, c.embedding_size))
        self.eval()

    def forward(self, feats: Tensor) -> Tensor:
        """Filterbank features [B, frames, feat_dim] -> x-vectors [B, embedding_size]."""
        return self.xvector(self.head(feats.transpose(1, 2)))

    @torch.inference_mode()
    def inference(self, wavs: Tensor | list[Tensor]) -> Tensor:
        """16 kHz audio ([B, T], [T] or a list of 1-D clips) -> x-vectors [B, embedding_size].

        Each clip gets its own mean-normalised features; shorter clips are zero-padded in the batch
        (as the official model does, so padding does affect their embeddings).
        """
        if isinstance(wavs, Tensor):
            wavs = list(wavs) if wavs.dim() == 2 else [wavs]
        if not wavs:
            raise UsageError("the speaker encoder needs at least one audio clip")
        dtype = self.head.conv1.weight.dtype
        device = self.head.conv1.weight.device
        feats = extract_features([w.to(device) for w in wavs], self.config.feat_dim)
        return self.forward(feats.to(dtype))


# ----------------------------------------------------------------------------------------------------
# random weights


def random_state_dict(config: CAMPPlusConfig, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random fp32 weights in the official layout (every key of CAMPPlus.state_dict()).

    Convolutions N(0, 2/fan_in) (ReLU network), conv biases N(0, 0.02), BatchNorm affine weight
    1 + N(0, 0.05) and bias N(0, 0.02), running_mean 0, running_var 1, num_batches_tracked 0 (int64).
    Each tensor has its own generator seeded from (seed, name).
    """
    with torch.device("meta"):
        ref = CAMPPlus(config).state_dict()
    out: dict[str, Tensor] = {}
    for name, t in ref.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros((), dtype=torch.int64)
            continue
        if leaf == "running_mean":
            out[name] = torch.zeros(t.shape)
            continue
        if leaf == "running_var":
            out[name] = torch.ones(t.shape)
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if t.dim() == 1:
            is_bn = "batchnorm" in name or ".bn" in name or ".shortcut.1." in name
            out[name] = (1.0 + 0.05 * noise) if (is_bn and leaf == "weight") else 0.02 * noise
        else:
            out[name] = noise * math.sqrt(2.0 / math.prod(t.shape[1:]))
    return out
