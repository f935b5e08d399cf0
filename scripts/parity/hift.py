"""Parity fixture for the s3gen mel front end and the HiFT vocoder.

Run with the reference environment:  /work/refenv/bin/python scripts/parity/hift.py
Writes tests/fixtures/parity_hift.safetensors (+ .json).

The reference HiFTGenerator is built as the reference S3Token2Wav builds it, loaded (strict) with our
seeded random weights, and run in fp32 on the mel of a synthetic 1 s clip. Its random source
(SineGen's harmonic phases and noise) is replaced by tensors drawn with our `draw_source_noise`
from a fixed seed; the test draws the same tensors again, so the fixture stores no noise.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import librosa
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import chatterbox.models.s3gen.hifigan as ref_hifigan  # noqa: E402
from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor  # noqa: E402
from chatterbox.models.s3gen.utils.mel import mel_spectrogram as ref_mel  # noqa: E402

from chatterbox_cli.models.s3gen.hifigan import HiFTConfig, draw_source_noise, random_state_dict  # noqa: E402

WEIGHT_SEED = 3  # chosen so that both sizes predict some unvoiced (F0 <= 10 Hz) frames
NOISE_SEED = 77
SOURCE_SLICE = 4800  # stored source samples per row


def synthetic_clip() -> torch.Tensor:
    """[2, 24000]: a gliding two-partial tone with a silent gap, and low-level seeded noise."""
    t = torch.arange(24000, dtype=torch.float64) / 24000
    f0 = 120 + 40 * torch.sin(2 * math.pi * 2 * t)
    phase = 2 * math.pi * torch.cumsum(f0 / 24000, 0)
    tone = 0.3 * torch.sin(phase) + 0.1 * torch.sin(3 * phase)
    tone[12000:15000] = 0
    hiss = 0.05 * torch.randn(24000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return torch.stack([tone, hiss]).to(torch.float32)


def build_reference(config: HiFTConfig) -> torch.nn.Module:
    return ref_hifigan.HiFTGenerator(
        in_channels=config.in_channels,
        base_channels=config.base_channels,
        nb_harmonics=config.nb_harmonics,
        sampling_rate=config.sampling_rate,
        upsample_rates=list(config.upsample_rates),
        upsample_kernel_sizes=list(config.upsample_kernel_sizes),
        source_resblock_kernel_sizes=list(config.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in config.source_resblock_dilation_sizes],
        f0_predictor=ConvRNNF0Predictor(cond_channels=config.f0_channels),
    ).eval()


def run_reference_with_noise(model: torch.nn.Module, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run model.inference with SineGen's Uniform phase and randn noise replaced by our seeded draws."""
    frames = mel.shape[-1]
    noise = draw_source_noise(
        mel.shape[0], model.nb_harmonics + 1, frames * 480, torch.Generator().manual_seed(NOISE_SEED)
    )
    queue = [noise.noise]

    class FixedUniform:
        def __init__(self, low: float, high: float) -> None:
            pass

        def sample(self, sample_shape: tuple[int, ...]) -> torch.Tensor:
            assert tuple(sample_shape) == tuple(noise.phase.shape)
            return noise.phase.clone()

    real_randn_like = torch.randn_like

    def fixed_randn_like(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if queue:  # SineGen's harmonic noise
            n = queue.pop(0)
            assert n.shape == x.shape, (n.shape, x.shape)
            return n.clone()
        return torch.zeros_like(x)  # SourceModuleHnNSF's noise branch, which inference discards

    real_uniform = ref_hifigan.Uniform
    ref_hifigan.Uniform = FixedUniform
    torch.randn_like = fixed_randn_like
    try:
        wav, source = model.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))
    finally:
        ref_hifigan.Uniform = real_uniform
        torch.randn_like = real_randn_like
    assert not queue, "SineGen did not draw its noise"
    return wav, source


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {
        "weight_seed": WEIGHT_SEED,
        "noise_seed": NOISE_SEED,
        "source_slice": SOURCE_SLICE,
    }

    fb = torch.from_numpy(librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000))
    nz = fb.flatten().nonzero().squeeze(1)
    out["filterbank_index"] = nz
    out["filterbank_values"] = fb.flatten()[nz].contiguous()
    meta["filterbank_shape"] = list(fb.shape)

    wav = synthetic_clip()
    mel = ref_mel(wav)
    out["clip"] = wav
    out["mel"] = mel.contiguous()

    for size, config in (("tiny", HiFTConfig.tiny()), ("english", HiFTConfig.english())):
        model = build_reference(config)
        model.load_state_dict(random_state_dict(config, WEIGHT_SEED), strict=True)
        if size == "english":
            meta["english_keys"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        with torch.inference_mode():
            f0 = model.f0_predictor(mel)
        wav_out, source = run_reference_with_noise(model, mel)
        out[f"{size}.f0"] = f0.contiguous()
        out[f"{size}.wav"] = wav_out.contiguous()
        out[f"{size}.source"] = source[:, :, :SOURCE_SLICE].contiguous()
        meta[f"{size}.stats"] = {
            "f0_min": f0.min().item(),
            "f0_max": f0.max().item(),
            "unvoiced_fraction": (f0 <= config.nsf_voiced_threshold).float().mean().item(),
            "wav_std": wav_out.std().item(),
            "wav_absmax": wav_out.abs().max().item(),
        }
        print(size, meta[f"{size}.stats"])

    fixtures = ROOT / "tests" / "fixtures"
    save_file(out, str(fixtures / "parity_hift.safetensors"))
    (fixtures / "parity_hift.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", fixtures / "parity_hift.safetensors")


if __name__ == "__main__":
    main()
