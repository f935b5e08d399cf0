"""Parity fixture for the S3 speech tokenizer (run with the reference env: /work/refenv/bin/python).

Loads our seeded random full-size weights (without the two derived buffers, so the reference keeps its
own librosa filterbank and Hann window) into the reference S3Tokenizer, runs synthetic 16 kHz clips
and writes inputs and outputs to tests/fixtures/parity_s3tok.safetensors (+ .json with the facts).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.s3tokenizer import S3Tokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.s3gen.speech_tokenizer import (  # noqa: E402
    DERIVED_BUFFERS,
    SpeechTokenizerConfig,
    random_state_dict,
)

SEED = 0
SR = 16_000


def synthetic_clip(n: int, seed: int) -> torch.Tensor:
    """Harmonic tones with a slow pitch glide and an amplitude envelope plus noise, as int16 PCM."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 140.0 + 40.0 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    x = sum(0.3 / k * torch.sin(k * phase) for k in range(1, 6))
    x = x * (0.55 + 0.45 * torch.sin(2 * math.pi * 2.3 * t))
    x = x + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.round(x.clamp(-1, 1) * 32767).to(torch.int16)


def main() -> None:
    torch.set_num_threads(1)
    cfg = SpeechTokenizerConfig.english()
    sd = random_state_dict(cfg, SEED)
    ref = S3Tokenizer("speech_tokenizer_v2_25hz").eval()
    filters_diff = (ref._mel_filters - sd["_mel_filters"]).abs().max().item()
    window_diff = (ref.window - sd["window"]).abs().max().item()
    weights = {k: v for k, v in sd.items() if k not in DERIVED_BUFFERS}
    result = ref.load_state_dict(weights, strict=False)
    assert sorted(result.missing_keys) == sorted(DERIVED_BUFFERS), result
    assert not result.unexpected_keys, result

    pcm_a = synthetic_clip(3 * SR + 5337, seed=1)  # 3.33 s, not a multiple of the 640-sample token hop
    pcm_b = synthetic_clip(SR + 11_000, seed=2)  # 1.69 s
    wav_a, wav_b = pcm_a.float() / 32768, pcm_b.float() / 32768
    # a long clip (> 30 s, 3000 mel frames) goes through the windowed path; rebuilt in tests from a, b
    wav_long = torch.cat([wav_a] * 9 + [wav_b])

    with torch.inference_mode():
        mel_a = ref.log_mel_spectrogram(wav_a[None])[0]
        mel_b = ref.log_mel_spectrogram(wav_b[None])[0]
        mels = torch.zeros(2, mel_a.shape[0], mel_a.shape[1])
        mels[0], mels[1, :, : mel_b.shape[1]] = mel_a, mel_b
        mel_lens = torch.tensor([mel_a.shape[1], mel_b.shape[1]], dtype=torch.int32)
        hidden, hidden_lens = ref.encoder(mels, mel_lens)
        squash = torch.tanh(ref.quantizer._codebook.project_down(hidden).float()) * 0.9990000128746033
        tokens, lens = ref([wav_a, wav_b])
        assert torch.equal(tokens, ref.quantizer.encode(hidden).long())
        tokens_max, lens_max = ref([wav_a, wav_b], max_len=40)
        t0 = time.time()
        tokens_long, lens_long = ref([wav_long, wav_b])
        long_s = time.time() - t0

    out = {
        "pcm_a": pcm_a,
        "pcm_b": pcm_b,
        "mel_a": mel_a.contiguous(),
        "mel_b": mel_b.contiguous(),
        "hidden_a": hidden[0].contiguous(),  # full-length clip: all positions valid
        "squash": squash.contiguous(),  # [2, T, 8] pre-rounding FSQ values, both clips
        "tokens": tokens.to(torch.int32),
        "lens": lens.to(torch.int32),
        "tokens_max40": tokens_max.to(torch.int32),
        "lens_max40": lens_max.to(torch.int32),
        "tokens_long": tokens_long.to(torch.int32),
        "lens_long": lens_long.to(torch.int32),
    }
    fixtures = ROOT / "tests" / "fixtures"
    save_file(out, str(fixtures / "parity_s3tok.safetensors"))
    facts = {
        "reference": "chatterbox-tts 0.1.7 S3Tokenizer('speech_tokenizer_v2_25hz') on s3tokenizer model_v2",
        "config": "SpeechTokenizerConfig.english()",
        "seed": SEED,
        "wav": "pcm_* are int16; wav = pcm / 32768; long clip = cat([wav_a] * 9 + [wav_b])",
        "filters_max_abs_diff_vs_librosa": filters_diff,
        "window_max_abs_diff_vs_torch": window_diff,
        "long_clip_seconds_reference_cpu_1_thread": round(long_s, 2),
        "torch": torch.__version__,
    }
    (fixtures / "parity_s3tok.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
    print({k: tuple(v.shape) for k, v in out.items()})
    print("tokens a[:20]", tokens[0, :20].tolist(), "unique", tokens[0].unique().numel())
    print("squash near boundary (| |x|-0.5 | < 1e-3):", int(((squash.abs() - 0.5).abs() < 1e-3).sum()))


if __name__ == "__main__":
    main()
