"""S3 speech tokenizer, v2 at 25 Hz: 16 kHz audio -> discrete speech tokens (6561 codes).

Pipeline: whisper-style log-mel (128 slaney bands, 100 frames/s) -> two stride-2 convolutions
(25 frames/s) -> pre-norm transformer blocks whose attention uses rotary positions plus an FSMN
memory (a depthwise convolution over the values) -> finite scalar quantisation: 8 dims, 3 levels each.

Parameter and buffer names follow the official checkpoint (`tokenizer.*` in s3gen.safetensors).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_cli.errors import UsageError

# Buffers that live in the state dict but are derived from the config alone. Some checkpoints omit
# them; loading tolerates that and recomputes them.
DERIVED_BUFFERS: tuple[str, ...] = ("_mel_filters", "window")


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    sample_rate: int = 16_000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    fsmn_kernel_size: int = 31
    fsq_dim: int = 8
    fsq_levels: int = 3
    rope_positions: int = 2048
    rope_theta: float = 10_000.0
    # mel frames per encoder window when the input is long; windows overlap and are stitched
    window_frames: int = 3000
    overlap_seconds: int = 4

    @classmethod
    def english(cls) -> SpeechTokenizerConfig:
        return cls()

    @classmethod
    def tiny(cls) -> SpeechTokenizerConfig:
        return cls(n_state=128, n_head=2, n_layer=2, fsmn_kernel_size=5)

    @property
    def head_dim(self) -> int:
        return self.n_state // self.n_head

    @property
    def codebook_size(self) -> int:
        return self.fsq_levels**self.fsq_dim

    @property
    def token_rate(self) -> int:
        # two stride-2 convolutions after the mel hop
        return self.sample_rate // self.hop_length // 4

    def __post_init__(self) -> None:
        if self.n_state % self.n_head or self.head_dim % 2:
            raise ValueError(f"n_state {self.n_state} must split into n_head {self.n_head} even-sized heads")


# ----------------------------------------------------------------------------------------------------
# front end


def _hz_to_slaney_mel(hz: Tensor) -> Tensor:
    # linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4)
    f_sp = 200.0 / 3.0
    logstep = math.log(6.4) / 27.0
    linear = hz / f_sp
    log_part = 15.0 + torch.log(torch.clamp(hz, min=1e-10) / 1000.0) / logstep
    return torch.where(hz >= 1000.0, log_part, linear)


def _slaney_mel_to_hz(mel: Tensor) -> Tensor:
    f_sp = 200.0 / 3.0
    logstep = math.log(6.4) / 27.0
    return torch.where(mel >= 15.0, 1000.0 * torch.exp(logstep * (mel - 15.0)), f_sp * mel)


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """Triangular slaney-scale filterbank with slaney area normalisation, [n_mels, n_fft // 2 + 1].

    Same construction as librosa.filters.mel with its defaults (fmin 0, fmax = Nyquist); built in
    float64 and returned as float32.
    """
    fft_hz = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft)
    nyquist = sample_rate / 2.0
    top = 15.0 + math.log(nyquist / 1000.0) * 27.0 / math.log(6.4) if nyquist >= 1000.0 else nyquist * 0.015
    edges_hz = _slaney_mel_to_hz(torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64))
    widths = edges_hz[1:] - edges_hz[:-1]
    # distance of every fft bin from every band edge: [n_mels + 2, n_bins]
    dist = edges_hz[:, None] - fft_hz[None, :]
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    tri = torch.clamp(torch.minimum(rising, falling), min=0.0)
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    return (tri * area_norm[:, None]).to(torch.float32)


def periodic_hann(n: int) -> Tensor:
    return torch.hann_window(n, periodic=True, dtype=torch.float32)


def _derived_buffer(name: str, config: SpeechTokenizerConfig) -> Tensor:
    if name == "_mel_filters":
        return slaney_mel_filters(config.sample_rate, config.n_fft, config.n_mels)
    if name == "window":
        return periodic_hann(config.n_fft)
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------------
# encoder


def _rope_tables(head_dim: int, positions: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, T, H, D]; cos/sin: [T, D]. Rotates the pair (x[i], x[i + D/2]).
    lo, hi = x.chunk(2, dim=-1)
    turned = torch.cat([-hi, lo], dim=-1)
    return x * cos[None, :, None, :] + turned * sin[None, :, None, :]


class FSMNAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int, kernel_size: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        self.fsmn_block = nn.Conv1d(n_state, n_state, kernel_size, groups=n_state, bias=False)
        left = (kernel_size - 1) // 2
        self._fsmn_pad = (left, kernel_size - 1 - left)

    def forward(self, x: Tensor, keep: Tensor, attend: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, T, C]; keep [B, T, 1] (1 on valid frames); attend [B, 1, 1, T] bool key mask."""
        b, t, c = x.shape
        q = self.query(x).view(b, t, self.n_head, -1)
        k = self.key(x).view(b, t, self.n_head, -1)
        v = self.value(x)

        # FSMN memory: depthwise conv over the (masked) values, plus the values themselves
        v_valid = v * keep
        memory = F.conv1d(
            F.pad(v_valid.transpose(1, 2), self._fsmn_pad),
            self.fsmn_block.weight,
            groups=c,
        ).transpose(1, 2)
        memory = (memory + v_valid) * keep

        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        heads = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_head, -1).transpose(1, 2), attend
        )
        return self.out(heads.transpose(1, 2).reshape(b, t, c)) + memory


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, kernel_size: int) -> None:
        super().__init__()
        self.attn = FSMNAttention(n_state, n_head, kernel_size)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor, keep: Tensor, attend: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x), keep, attend, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


def _conv_len(n: Tensor | int) -> Tensor | int:
    # kernel 3, stride 2, padding 1
    return (n - 1) // 2 + 1


def _valid(lengths: Tensor, t: int) -> Tensor:
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]


class AudioEncoder(nn.Module):
    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        c = config
        self.conv1 = nn.Conv1d(c.n_mels, c.n_state, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(c.n_state, c.n_state, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            EncoderBlock(c.n_state, c.n_head, c.fsmn_kernel_size) for _ in range(c.n_layer)
        )
        cos, sin = _rope_tables(c.head_dim, c.rope_positions, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """mel [B, n_mels, T] -> hidden [B, ceil(T/4), n_state] and its valid lengths [B]."""
        mask = _valid(mel_len, mel.shape[-1])[:, None, :].to(mel.dtype)
        x = F.gelu(self.conv1(mel * mask))
        lens = _conv_len(mel_len)
        mask = _valid(lens, x.shape[-1])[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x * mask))
        lens = _conv_len(lens)
        valid = _valid(lens, x.shape[-1])

        x = x.transpose(1, 2)
        t = x.shape[1]
        if t > self.rope_cos.shape[0]:
            raise UsageError(
                f"speech tokenizer window of {t} frames exceeds its {self.rope_cos.shape[0]} positions; "
                "use shorter audio"
            )
        keep = valid[:, :, None].to(x.dtype)
        attend = valid[:, None, None, :]
        cos = self.rope_cos[:t].to(x.dtype)
        sin = self.rope_sin[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x, keep, attend, cos, sin)
        return x, lens


class FSQCodebook(nn.Module):
    def __init__(self, n_state: int, dim: int) -> None:
        super().__init__()
        self.project_down = nn.Linear(n_state, dim)


class FSQuantizer(nn.Module):
    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.levels = config.fsq_levels
        self._codebook = FSQCodebook(config.n_state, config.fsq_dim)

    def squash(self, hidden: Tensor) -> Tensor:
        """The continuous value that gets rounded, in (-1, 1): [B, T, fsq_dim], fp32."""
        # the official constant is float32(0.999)
        return torch.tanh(self._codebook.project_down(hidden).float()) * 0.9990000128746033

    def forward(self, hidden: Tensor) -> Tensor:
        digits = torch.round(self.squash(hidden)) + 1  # each in {0, 1, 2}
        weights = self.levels ** torch.arange(digits.shape[-1], device=digits.device, dtype=digits.dtype)
        return (digits * weights).sum(-1).long()


class SpeechTokenizer(nn.Module):
    def __init__(self, config: SpeechTokenizerConfig | None = None) -> None:
        super().__init__()
        self.config = config or SpeechTokenizerConfig.english()
        c = self.config
        self.register_buffer("_mel_filters", _derived_buffer("_mel_filters", c))
        self.register_buffer("window", _derived_buffer("window", c))
        self.encoder = AudioEncoder(c)
        self.quantizer = FSQuantizer(c)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in DERIVED_BUFFERS:
            if prefix + name not in state_dict:
                state_dict[prefix + name] = _derived_buffer(name, self.config)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def log_mel_spectrogram(self, wav: Tensor) -> Tensor:
        """One 16 kHz waveform [T] (or [1, T]) -> log-mel [n_mels, T // hop], fp32."""
        c = self.config
        wav = wav.reshape(-1).float()
        if wav.numel() <= c.n_fft // 2:
            raise UsageError(
                f"audio of {wav.numel()} samples is too short for the speech tokenizer; "
                f"give at least {c.n_fft // 2 + 1} samples at {c.sample_rate} Hz"
            )
        window, filters = self.window, self._mel_filters
        if filters.dtype != torch.float32:
            # the module was cast to 16 bits; the front end stays fp32 with exact filters
            window = _derived_buffer("window", c).to(wav.device)
            filters = _derived_buffer("_mel_filters", c).to(wav.device)
        spec = torch.stft(wav, c.n_fft, c.hop_length, window=window, center=True, return_complex=True)
        power = spec[:, :-1].abs() ** 2
        log_mel = torch.clamp(filters @ power, min=1e-10).log10()
        # dynamic range of 8 decades (80 dB) below the loudest bin, then roughly into [-1, 1]
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
        return (log_mel + 4.0) / 4.0

    def mels(self, wavs: list[Tensor], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Log-mels of each clip, zero-padded to a batch: [B, n_mels, T_max] and lengths [B]."""
        feats = []
        for wav in wavs:
            mel = self.log_mel_spectrogram(wav.to(self._mel_filters.device))
            if max_len is not None:
                mel = mel[:, : 4 * max_len]
            feats.append(mel)
        lens = torch.tensor([m.shape[1] for m in feats], device=self._mel_filters.device)
        batch = torch.zeros(len(feats), self.config.n_mels, int(lens.max()), device=lens.device)
        for i, mel in enumerate(feats):
            batch[i, :, : mel.shape[1]] = mel
        return batch, lens

    def encode(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output before quantisation: [B, T', n_state] and token lengths [B]."""
        dtype = self.encoder.conv1.weight.dtype
        return self.encoder(mel.to(dtype), mel_len)

    def quantize(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel batch -> token ids [B, T'] (long) and lengths [B] (long)."""
        if bool((mel_len > self.config.window_frames).any()):
            return self._quantize_windowed(mel, mel_len)
        hidden, lens = self.encode(mel, mel_len)
        return self.quantizer(hidden), lens.long()

    def _quantize_windowed(self, mel: Tensor, mel_len: Tensor) -> tuple[Tensor, Tensor]:
        # Long clips are cut into overlapping windows of `window_frames`; every window (and every
        # short clip) is padded to that size and encoded as one batch. Per long clip the windows'
        # tokens are stitched, dropping half the overlap on each inner seam.
        c = self.config
        win = c.window_frames
        stride = win - c.overlap_seconds * c.sample_rate // c.hop_length
        trim = (c.overlap_seconds // 2) * c.token_rate
        pieces: list[Tensor] = []
        piece_lens: list[int] = []
        owner: list[int] = []
        for i in range(mel.shape[0]):
            n = int(mel_len[i])
            starts = [0] if n <= win else list(range(0, n, stride))
            for s in starts:
                seg = mel[i, :, s : min(s + win, n)]
                pieces.append(F.pad(seg, (0, win - seg.shape[1])))
                piece_lens.append(seg.shape[1])
                owner.append(i)
        hidden, lens = self.encode(torch.stack(pieces), torch.tensor(piece_lens, device=mel.device))
        codes = self.quantizer(hidden)
        per_clip: list[list[Tensor]] = [[] for _ in range(mel.shape[0])]
        for j, i in enumerate(owner):
            per_clip[i].append(codes[j, : int(lens[j])])
        merged: list[Tensor] = []
        for segs in per_clip:
            if len(segs) == 1:
                merged.append(segs[0])
                continue
            kept = [
                s[(trim if k > 0 else 0) : (len(s) - trim if k < len(segs) - 1 else len(s))]
                for k, s in enumerate(segs)
            ]
            merged.append(torch.cat(kept))
        out_lens = torch.tensor([m.numel() for m in merged], dtype=torch.long, device=mel.device)
        out = torch.zeros(len(merged), int(out_lens.max()), dtype=torch.long, device=mel.device)
        for i, m in enumerate(merged):
            out[i, : m.numel()] = m
        return out, out_lens

    @torch.inference_mode()
    def forward(self, wavs: list[Tensor] | Tensor, max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """16 kHz clips -> speech tokens [B, T'] (long) and their lengths [B] (long), 25 tokens/s.

        `wavs` is a list of 1-D (or [1, T]) tensors, or a [B, T] tensor. A clip of n samples gives
        n // 160 mel frames and ceil(frames / 4) tokens (pad clips to a multiple of 640 samples to get
        exactly n / 640). `max_len` caps the token count by cutting the mel before the encoder.
        Positions past a clip's length are padding (their values are not meaningful).
        """
        if isinstance(wavs, Tensor):
            wavs = list(wavs) if wavs.dim() == 2 else [wavs]
        if not wavs:
            raise UsageError("the speech tokenizer needs at least one audio clip")
        mel, mel_len = self.mels(list(wavs), max_len)
        return self.quantize(mel, mel_len)


# ----------------------------------------------------------------------------------------------------
# random weights


def _name_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_state_dict(config: SpeechTokenizerConfig, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random fp32 weights in the official layout (every key of SpeechTokenizer.state_dict()).

    Matrices and convolutions are N(0, 1/fan_in) so activations keep their scale through the stack;
    biases N(0, 0.02); LayerNorm weights 1 + N(0, 0.05); the two derived buffers are exact.
    Each tensor has its own generator seeded from (seed, name), so a tensor does not depend on others.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SpeechTokenizer(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name in DERIVED_BUFFERS:
            out[name] = _derived_buffer(name, config)
            continue
        g = _name_generator(seed, name)
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if "_ln." in name:
            out[name] = 1.0 + 0.05 * noise if name.endswith("weight") else 0.02 * noise
        elif name.endswith("bias"):
            out[name] = 0.02 * noise
        else:
            fan_in = math.prod(shape[1:])
            if name.endswith("fsmn_block.weight"):
                fan_in = shape[-1] * 4  # keep the memory term smaller than the value it is added to
            out[name] = noise / math.sqrt(fan_in)
    return out
