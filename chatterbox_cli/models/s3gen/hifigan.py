"""HiFT vocoder: mel [B, 80, T] at 50 frames/s -> 24 kHz waveform [B, T * 480].

Neural-source-filter + iSTFT generator. An F0 predictor reads the mel; the F0 drives a harmonic sine
source (plus noise) at the output rate; the mel is upsampled by transposed convolutions with
Snake-activated residual blocks, the source's short-time spectrum is mixed in at every scale, and the
network ends in a 16-point magnitude/phase spectrum that an inverse STFT (hop 4) turns into samples.

Weight norm: the official checkpoint stores weight-normed convolutions as
``<conv>.parametrizations.weight.original0`` (g) and ``.original1`` (v); older exports use
``weight_g``/``weight_v``. We read either form and fold it into a plain weight at load time
(w = g * v / ||v||, the norm taken per slice of dim 0), so inference runs plain convolutions.
``state_dict()`` writes the official ``parametrizations`` form back out.

Batches: rows are padded to one mel length; pass ``lengths`` (valid mel frames per row). `inference`
runs the network on each row's own frames only, so a row's waveform is the one it gets alone (padding
cannot leak in) and padding costs nothing. On the CPU it goes row by row (measured, one thread: a padded
batch of 4 rows took 1.4x the time of the 4 rows one by one), long mels in chunks (`decode`), so the
workspace is one row's chunk. On CUDA, where one row's chunks are too small to keep the GPU busy, the
chunks of all rows are run together (`decode_rows`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Long mels are decoded in chunks: bytes of one last-stage activation [B, 64, 120 * frames] per chunk
# (five are alive at once), and context frames on each side of a chunk. The upsampling network's
# receptive field is ~20 frames by kernel arithmetic (measured, random weights: 8 context frames leave
# differences of 7e-5, 12 or more only rounding, 3e-7).
DECODE_CHUNK_BYTES = 16 * 1024**2
DECODE_CONTEXT_FRAMES = 24
# On CUDA all rows' chunks go through the network together, grouped by length: every chunk is
# DECODE_WINDOW_FRAMES long (a row's last one ends at the row's end, overlapping the one before), so a
# batch has two span lengths (window + one or two contexts) whatever its rows' lengths. One call per
# length instead of one per row and chunk, and few shapes to plan kernels for.
DECODE_WINDOW_FRAMES = 128
# float32 rows of [samples] alive while the excitation is made: 9 of noise, F0, sum, sine, noise term
SOURCE_ROWS = 13


def decode_windows(total: int, window: int, context: int, align_end: bool) -> list[tuple[int, int, int, int]]:
    """How `total` mel frames are decoded in chunks: (lo, hi, start, end) per chunk, in order. Output frames
    [start, end) come from the network run on frames [lo, hi), which include `context` frames on each
    side where the mel has them. With `align_end` the last chunk is a whole window ending at `total`."""
    if total <= window + 2 * context:
        return [(0, total, 0, total)]
    spans = []
    for start in range(0, total, window):
        end = min(start + window, total)
        first = max(0, end - window) if align_end else start
        spans.append((max(0, first - context), min(total, end + context), start, end))
    return spans


_G_KEYS = ("parametrizations.weight.original0", "weight_g")
_V_KEYS = ("parametrizations.weight.original1", "weight_v")


@dataclass
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # amplitude of the sine source
    nsf_sigma: float = 0.003  # noise std on voiced samples
    nsf_voiced_threshold: float = 10.0  # Hz; F0 above it counts as voiced
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_channels: int = 512
    f0_num_class: int = 1
    f0_layers: int = 5

    @classmethod
    def english(cls) -> HiFTConfig:
        return cls()

    @classmethod
    def tiny(cls) -> HiFTConfig:
        return cls(base_channels=32, f0_channels=16)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop


# ---------------------------------------------------------------------------------------------
# weight norm, folded


def _weight_norm_scale(v: torch.Tensor) -> torch.Tensor:
    """||v|| over every dim but 0, shaped to broadcast against v."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)


class _FoldedWeightNorm:
    """Mixin for conv layers whose checkpoint weight is weight-normed (g, v) but which run on w."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for g_key, v_key in zip(_G_KEYS, _V_KEYS, strict=True):
            g_name, v_name = prefix + g_key, prefix + v_key
            if g_name in state_dict and v_name in state_dict:
                g = state_dict.pop(g_name).to(torch.float32)
                v = state_dict.pop(v_name).to(torch.float32)
                state_dict[prefix + "weight"] = torch._weight_norm(v, g, 0)
                break
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + _G_KEYS[0]] = _weight_norm_scale(weight)
        destination[prefix + _V_KEYS[0]] = weight


class WNConv1d(_FoldedWeightNorm, nn.Conv1d):
    pass


class WNConvTranspose1d(_FoldedWeightNorm, nn.ConvTranspose1d):
    pass


# ---------------------------------------------------------------------------------------------
# building blocks


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one alpha per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        # one new tensor instead of four: the last stage's activations are [B, 64, 120 x mel frames]
        return (x * alpha).sin_().pow_(2).mul_(1.0 / (alpha + 1e-9)).add_(x)


class ResBlock(nn.Module):
    """Pairs of (Snake, dilated conv, Snake, conv), each pair added back onto its input."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """`inplace`: accumulate into x (when the caller no longer needs it)."""
        for i, (act1, conv1, act2, conv2) in enumerate(
            zip(self.activations1, self.convs1, self.activations2, self.convs2, strict=True)
        ):
            y = conv2(act2(conv1(act1(x))))
            x = x.add_(y) if inplace or i > 0 else x + y
            del y  # before the next pair's tensors exist
        return x


class F0Predictor(nn.Module):
    """Mel [B, 80, T] -> non-negative F0 in Hz [B, T]: stacked conv+ELU, then a per-frame linear map."""

    def __init__(self, in_channels: int, channels: int, num_class: int = 1, layers: int = 5) -> None:
        super().__init__()
        stack: list[nn.Module] = []
        for i in range(layers):
            stack += [WNConv1d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*stack)
        self.classifier = nn.Linear(channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


@dataclass
class SourceNoise:
    """The random inputs of the harmonic source, for a batch of B rows of `samples` output samples.

    phase: [B, H+1, 1] initial phase of each harmonic, uniform in [-pi, pi) (the fundamental's is 0).
    noise: [B, H+1, samples] standard normal; scaled by the voiced/unvoiced noise amplitude.
    """

    phase: torch.Tensor
    noise: torch.Tensor


def draw_source_noise(
    batch: int,
    harmonics: int,
    samples: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> SourceNoise:
    """Draw SourceNoise from `generator` (on the generator's device), then move it to `device`."""
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    phase = torch.rand(batch, harmonics, 1, generator=generator, device=gen_device) * (2 * math.pi) - math.pi
    phase[:, 0] = 0.0
    noise = torch.randn(batch, harmonics, samples, generator=generator, device=gen_device)
    target = torch.device(device) if device is not None else gen_device
    return SourceNoise(phase.to(target), noise.to(target))


class SourceModule(nn.Module):
    """Harmonic-plus-noise excitation from a per-sample F0, merged to one channel by linear + tanh."""

    def __init__(self, config: HiFTConfig) -> None:
        super().__init__()
        self.harmonics = config.nb_harmonics + 1
        self.sampling_rate = config.sampling_rate
        self.sine_amp = config.nsf_alpha
        self.noise_std = config.nsf_sigma
        self.voiced_threshold = config.nsf_voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def forward(self, f0: torch.Tensor, noise: SourceNoise) -> torch.Tensor:
        """f0 [B, 1, L] in Hz (float32) -> source [B, 1, L] in the layer's dtype.

        One harmonic at a time, summed straight into the linear merge: besides the [B, H+1, L] noise,
        only a few [B, 1, L] tensors are alive (the merge's sum runs in float32, in harmonic order).
        """
        multiples = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=f0.dtype)[None, :, None]
        voiced = (f0 > self.voiced_threshold).to(f0.dtype)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        weight = self.l_linear.weight[0].to(torch.float32)
        merged = torch.zeros_like(f0, dtype=torch.float32)
        for h in range(self.harmonics):
            # fractional cycle count (the `% 1` keeps the sine argument small), then the sine
            cycles = torch.cumsum(f0 * multiples[:, h : h + 1] / self.sampling_rate, dim=-1)
            cycles.remainder_(1).mul_(2 * math.pi).add_(noise.phase[:, h : h + 1]).sin_()
            harmonic = cycles.mul_(self.sine_amp).mul_(voiced).add_(noise_amp * noise.noise[:, h : h + 1])
            merged.addcmul_(harmonic, weight[h])
            del cycles, harmonic
        merged.add_(self.l_linear.bias.to(torch.float32)).tanh_()
        return merged.to(self.l_linear.weight.dtype)


# ---------------------------------------------------------------------------------------------
# generator


class HiFTGenerator(nn.Module):
    """State-dict keys equal the official ``mel2wav.*`` keys without the prefix."""

    def __init__(self, config: HiFTConfig | None = None) -> None:
        super().__init__()
        cfg = config or HiFTConfig.english()
        self.config = cfg
        n_bins = cfg.istft_n_fft // 2 + 1
        base = cfg.base_channels
        self.m_source = SourceModule(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(base >> i, base >> (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        # The source spectrum is brought down to each upsampling stage's rate: the stage after
        # upsample i runs at prod(rates[: i + 1]) x the mel rate, the spectrum at prod(rates) x.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        stages = len(cfg.upsample_rates)
        for i in range(stages):
            stride = math.prod(cfg.upsample_rates[i + 1 :])
            out_ch = base >> (i + 1)
            if stride == 1:
                self.source_downs.append(nn.Conv1d(2 * n_bins, out_ch, 1))
            else:
                self.source_downs.append(
                    nn.Conv1d(2 * n_bins, out_ch, 2 * stride, stride, padding=stride // 2)
                )
            self.source_resblocks.append(
                ResBlock(out_ch, cfg.source_resblock_kernel_sizes[i], cfg.source_resblock_dilation_sizes[i])
            )
        self.resblocks = nn.ModuleList(
            ResBlock(base >> (i + 1), k, d)
            for i in range(stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = WNConv1d(base >> stages, 2 * n_bins, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_channels, cfg.f0_num_class, cfg.f0_layers)
        window = torch.hann_window(cfg.istft_n_fft, periodic=True, dtype=torch.float64).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)

    def to_inference_dtype(self, dtype: torch.dtype) -> HiFTGenerator:
        """Cast the upsampling network to `dtype`; keep the F0 predictor and source in float32.

        F0 is integrated into the source phase over every output sample: a 16-bit F0 predictor moves
        F0 by ~0.2 Hz, which drifts the phase of the whole excitation (the waveform then differs by
        up to ~0.15 from the fp32 one while sounding the same). The float32 part is ~4 M parameters.
        """
        for name, child in self.named_children():
            if name not in ("f0_predictor", "m_source"):
                child.to(dtype)
        return self

    # --- pieces -------------------------------------------------------------------------------

    def predict_f0(self, mel: torch.Tensor) -> torch.Tensor:
        """F0 in Hz [B, T] (float32) for mel [B, 80, T]."""
        return self.f0_predictor(mel.to(self.f0_predictor.classifier.weight.dtype)).to(torch.float32)

    def source(
        self,
        f0: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: SourceNoise | None = None,
    ) -> torch.Tensor:
        """Excitation [B, 1, T * samples_per_frame] from frame-rate F0 [B, T]; computed in float32."""
        f0_samples = f0.to(torch.float32).repeat_interleave(self.config.samples_per_frame, dim=-1)[:, None]
        if noise is None:
            noise = draw_source_noise(
                f0.shape[0], self.m_source.harmonics, f0_samples.shape[-1], generator, f0.device
            )
        return self.m_source(f0_samples, noise)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop
        spec = torch.stft(
            x.to(torch.float32), n_fft, hop, n_fft, window=self.stft_window, return_complex=True
        )
        return torch.cat([spec.real, spec.imag], dim=1)

    def _istft(self, x: torch.Tensor) -> torch.Tensor:
        """Waveform [B, hop * (N - 1)] from log-magnitude and phase [B, 2 * bins, N], one row at a time
        (the float32 complex spectrum of a whole batch would outgrow the decoder's chunks)."""
        n_fft, hop = self.config.istft_n_fft, self.config.istft_hop
        n_bins = n_fft // 2 + 1
        wav = torch.empty(x.shape[0], hop * (x.shape[-1] - 1), device=x.device)
        for row in range(x.shape[0]):
            magnitude = torch.exp(x[row : row + 1, :n_bins].to(torch.float32)).clamp(max=1e2)
            phase = torch.sin(x[row : row + 1, n_bins:].to(torch.float32))
            spec = torch.polar(magnitude, phase)
            del magnitude, phase
            wav[row] = torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)[0]
            del spec
        return wav

    def decode(
        self, mel: torch.Tensor, source: torch.Tensor, chunk_frames: int | None = None
    ) -> torch.Tensor:
        """Waveform [B, T * samples_per_frame] from mel [B, 80, T] and excitation [B, 1, samples], each row
        on its own (decode_rows). Long mels go through the upsampling network in chunks of `chunk_frames`
        frames (default: `decode_chunk_frames`); the last chunk takes what is left."""
        window = chunk_frames or self.decode_chunk_frames(1, self.conv_pre.weight.dtype)
        rows = self.decode_rows(list(mel.split(1)), list(source.split(1)), window=window, align_end=False)
        return torch.cat(rows)

    def decode_rows(
        self,
        mels: Sequence[torch.Tensor],
        sources: Sequence[torch.Tensor],
        window: int = DECODE_WINDOW_FRAMES,
        align_end: bool = True,
    ) -> list[torch.Tensor]:
        """Waveforms [1, T_i * samples_per_frame] of several rows (mel [1, 80, T_i], excitation
        [1, 1, samples_i]). The upsampling network runs on chunks of `window` frames (decode_windows), each
        with DECODE_CONTEXT_FRAMES of context on both sides: more than the network's receptive field, so a
        row's waveform equals one pass up to rounding and does not depend on the other rows; only the
        18-channel spectra span a whole row. Chunks of equal span length go through together (see
        DECODE_WINDOW_FRAMES), while the last-stage activations of one call stay within
        DECODE_CHUNK_BYTES per row."""
        cfg = self.config
        dtype = self.conv_pre.weight.dtype
        specs = [self._stft(s.squeeze(1)).to(dtype) for s in sources]
        totals = [m.shape[-1] for m in mels]
        by_length: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for row, total in enumerate(totals):
            for lo, hi, start, end in decode_windows(total, window, DECODE_CONTEXT_FRAMES, align_end):
                by_length.setdefault(hi - lo, []).append((row, lo, hi, start, end))
        budget = DECODE_CHUNK_BYTES * len(mels)
        pieces: list[dict[int, torch.Tensor]] = [{} for _ in totals]  # per row: chunk start -> spectra
        for length, spans in by_length.items():
            per_call = max(1, budget // (length * self._last_stage_bytes_per_frame(dtype)))
            for i in range(0, len(spans), per_call):
                part = spans[i : i + per_call]
                x = self._decode_span(
                    torch.cat([mels[r][:, :, lo:hi] for r, lo, hi, _, _ in part]),
                    torch.cat([self._spec_span(specs[r], lo, hi) for r, lo, hi, _, _ in part]),
                )
                for k, (r, lo, _, start, end) in enumerate(part):
                    pieces[r][start] = self._cut(x[k : k + 1], lo, start, end, totals[r])
                del x
        del specs
        wavs = []
        for row_pieces in pieces:
            x = torch.cat([row_pieces[start] for start in sorted(row_pieces)], dim=-1)
            row_pieces.clear()
            wavs.append(self._istft(x).clamp_(-cfg.audio_limit, cfg.audio_limit))
        return wavs

    def _spec_span(self, source_spec: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        rate = self.config.samples_per_frame // self.config.istft_hop  # last-stage positions per frame
        return source_spec[:, :, rate * lo : rate * hi + 1]

    def _cut(self, span: torch.Tensor, lo: int, start: int, end: int, total: int) -> torch.Tensor:
        """The part of a decoded span [.., 18, rate * (hi - lo) + 1] for output frames [start, end): span
        position k is last-stage position rate * lo + k, and the final position closes the mel."""
        rate = self.config.samples_per_frame // self.config.istft_hop
        return span[:, :, rate * (start - lo) : rate * (end - lo) + (end == total)]

    def _last_stage_bytes_per_frame(self, dtype: torch.dtype) -> int:
        cfg = self.config
        rate = cfg.samples_per_frame // cfg.istft_hop
        channels = cfg.base_channels >> len(cfg.upsample_rates)
        return channels * rate * torch.empty((), dtype=dtype).element_size()

    def decode_chunk_frames(self, batch: int, dtype: torch.dtype) -> int:
        """Mel frames per decode chunk: one [batch, last channels, frames * 120] tensor within
        DECODE_CHUNK_BYTES, and at least 2 x the context."""
        per_frame = batch * self._last_stage_bytes_per_frame(dtype)
        return max(2 * DECODE_CONTEXT_FRAMES, DECODE_CHUNK_BYTES // per_frame)

    def _decode_span(self, mel: torch.Tensor, source_spec: torch.Tensor) -> torch.Tensor:
        """The upsampling network: mel [B, 80, T] and the source spectrum [B, 18, 120 T + 1] ->
        log-magnitude and phase [B, 18, 120 T + 1]."""
        cfg = self.config
        x = self.conv_pre(mel.to(self.conv_pre.weight.dtype))
        kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](source_spec), inplace=True)
            blocks = self.resblocks[i * kernels : (i + 1) * kernels]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc.add_(block(x))
            x = acc.div_(kernels)
            del acc  # or it outlives the next stage's first tensors
        return self.conv_post(F.leaky_relu(x))

    # --- entry points -------------------------------------------------------------------------

    @torch.inference_mode()
    def inference(
        self,
        speech_feat: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: SourceNoise | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (waveform [B, T * 480] float32, source [B, 1, T * 480] float32).

        Row b runs alone on its first lengths[b] frames (default: all T); its samples past that are zero.
        cache_source [1 or B, 1, n]: overwrites the first n source samples (streaming continuity).
        noise: the source's random phase and noise for the batch. Without it they are drawn: from one
        `generator` for the whole batch at once ([B, 9, T * 480]), or, from a list of B generators, row
        b's from its own for its own length, exactly as for the row alone (and one row's at a time).
        """
        b, _, total = speech_feat.shape
        device, spf = speech_feat.device, self.config.samples_per_frame
        frames = [total] * b if lengths is None else [min(int(n), total) for n in lengths.tolist()]
        per_row = isinstance(generator, Sequence)
        if per_row and len(generator) != b:
            raise ValueError(f"{b} rows but {len(generator)} generators")
        if noise is None and not per_row:
            noise = draw_source_noise(b, self.m_source.harmonics, total * spf, generator, device)
        wav = torch.zeros(b, total * spf, device=device)
        sources = torch.zeros(b, 1, total * spf, device=device)
        voiced = [(row, n) for row, n in enumerate(frames) if n > 0]
        for rows in self._source_groups(voiced, speech_feat.is_cuda):
            n = frames[rows[0]]
            mel = speech_feat[rows, :, :n]
            if noise is None:
                draws = [
                    draw_source_noise(1, self.m_source.harmonics, n * spf, generator[r], device) for r in rows
                ]
                group_noise = SourceNoise(
                    torch.cat([d.phase for d in draws]), torch.cat([d.noise for d in draws])
                )
                del draws
            else:
                group_noise = SourceNoise(noise.phase[rows], noise.noise[rows, :, : n * spf])
            source = self.source(self.predict_f0(mel), noise=group_noise)
            del group_noise
            if cache_source is not None and cache_source.shape[-1] > 0:
                for k, row in enumerate(rows):
                    cached = cache_source[min(row, cache_source.shape[0] - 1), :, : n * spf]
                    source[k, :, : cached.shape[-1]] = cached.to(source.dtype)
            sources[rows, :, : n * spf] = source
            if not speech_feat.is_cuda:  # on the CPU row by row (see the module notes)
                wav[rows[0], : n * spf] = self.decode(mel, source)[0]
        if speech_feat.is_cuda and voiced:
            rows = self.decode_rows(
                [speech_feat[row : row + 1, :, :n] for row, n in voiced],
                [sources[row : row + 1, :, : n * spf] for row, n in voiced],
            )
            for (row, n), row_wav in zip(voiced, rows, strict=True):
                wav[row, : n * spf] = row_wav[0]
        return wav, sources

    def _source_groups(self, voiced: list[tuple[int, int]], together: bool) -> list[list[int]]:
        """Rows whose excitation is made in one call: on the CPU one at a time; on CUDA rows of one length
        together (each row's F0 and source are its own computation, batched), as many as keep the
        source's SOURCE_ROWS float32 rows of samples within DECODE_CHUNK_BYTES (as estimate.py counts)."""
        if not together:
            return [[row] for row, _ in voiced]
        by_length: dict[int, list[int]] = {}
        for row, n in voiced:
            by_length.setdefault(n, []).append(row)
        groups = []
        for n, rows in by_length.items():
            step = max(1, DECODE_CHUNK_BYTES // (SOURCE_ROWS * 4 * n * self.config.samples_per_frame))
            groups += [rows[i : i + step] for i in range(0, len(rows), step)]
        return groups

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.inference(mel, generator=generator)[0]


# ---------------------------------------------------------------------------------------------
# random weights for tests


def _name_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def _weight_gain(name: str) -> float:
    """Target L2 norm of each output slice of a weight-normed conv (about the output/input std ratio)."""
    if "resblocks" in name:
        return 0.3  # residual branches stay small so the stacks do not blow up
    if name.startswith("conv_post"):
        return 0.5
    return 1.0


def random_state_dict(config: HiFTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights under the official key names (weight norm as parametrizations g/v).

    Each tensor has its own generator seeded from (seed, name), so adding a tensor changes no other.
    F0 comes out around 40 +- 150 Hz on speech-like mels, so both voiced and unvoiced samples occur.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HiFTGenerator(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        gen = torch.Generator().manual_seed(_name_seed(seed, name))
        randn = torch.randn(shape, generator=gen)
        if name.endswith(_G_KEYS[0]):
            t = _weight_gain(name) * torch.exp(0.1 * randn)
        elif name.endswith(_V_KEYS[0]):
            t = randn
        elif name.endswith(".alpha"):
            t = torch.exp(0.2 * randn)
        elif name == "f0_predictor.classifier.weight":
            t = randn * (100.0 / math.sqrt(shape[-1]))
        elif name == "f0_predictor.classifier.bias":
            t = 40.0 + randn
        elif name.endswith(".weight"):
            t = randn / math.sqrt(math.prod(shape[1:]))
        else:  # biases
            t = 0.02 * randn
        out[name] = t.contiguous()
    return out
