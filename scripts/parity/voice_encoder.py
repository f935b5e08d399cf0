"""Parity fixture for the VoiceEncoder: the reference implementation's mels and embeddings.

Run with the reference environment (see ../shared/reference/README.md for how it is set up):

    /work/refenv/bin/python scripts/parity/voice_encoder.py

It builds our seeded random VE weights (`random_state_dict(VoiceEncoderConfig(), seed=0)`), loads them
strictly into the reference `VoiceEncoder`, feeds two deterministic synthetic 16 kHz clips through the
reference front end (librosa) and network in fp32, and writes inputs and outputs to
tests/fixtures/parity_voice_encoder.safetensors. The Perth watermark is not involved (no TTS call).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.voice_encoder import VoiceEncoder as RefVoiceEncoder  # noqa: E402
from chatterbox.models.voice_encoder.melspec import mel_basis, melspectrogram  # noqa: E402
from librosa.effects import trim  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.voice_encoder import VoiceEncoderConfig, random_state_dict  # noqa: E402

SEED = 0
SR = 16000


def synthetic_clip(seconds: float, seed: int, lead_silence: float, tail_silence: float) -> np.ndarray:
    """Harmonic 'voice' with a gliding pitch and syllable-like envelope, padded with near-silence."""
    rng = np.random.default_rng(seed)
    n_voiced = int(seconds * SR)
    t = np.arange(n_voiced) / SR
    f0 = 120.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum((0.3 / k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 12))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t) ** 2
    voiced = voiced * envelope + 0.02 * rng.standard_normal(n_voiced)
    lead = 1e-3 * rng.standard_normal(int(lead_silence * SR))
    tail = 1e-3 * rng.standard_normal(int(tail_silence * SR))
    return np.concatenate([lead, voiced, tail]).astype(np.float32)


def main() -> None:
    torch.set_num_threads(1)
    ve = RefVoiceEncoder()
    ve.load_state_dict(random_state_dict(VoiceEncoderConfig(), seed=SEED), strict=True)
    ve.eval()
    hp = ve.hp

    clip_a = synthetic_clip(3.2, seed=1, lead_silence=0.45, tail_silence=0.35)  # 4.0 s, trim matters
    clip_b = synthetic_clip(2.86, seed=2, lead_silence=0.0, tail_silence=0.0)  # last partial zero-padded

    trimmed_a = trim(clip_a, top_db=20)[0]
    trimmed_b = trim(clip_b, top_db=20)[0]
    mel_a_raw = np.ascontiguousarray(melspectrogram(clip_a, hp).T, dtype=np.float32)  # untrimmed, [T, 40]
    mel_a = np.ascontiguousarray(melspectrogram(trimmed_a, hp).T, dtype=np.float32)
    mel_b = np.ascontiguousarray(melspectrogram(trimmed_b, hp).T, dtype=np.float32)

    # Network alone, on the first 160 frames (and a shifted window) of clip A's mel.
    windows = np.stack([mel_a[:160], mel_a[77:237]])
    with torch.inference_mode():
        partial_embeds = ve(torch.from_numpy(windows))

    emb_a = ve.embeds_from_wavs([clip_a], sample_rate=SR)  # what tts.prepare_conditionals does
    emb_b = ve.embeds_from_wavs([clip_b], sample_rate=SR)
    emb_ab = ve.embeds_from_wavs([clip_a, clip_b], sample_rate=SR)

    tensors = {
        "filterbank": torch.from_numpy(np.asarray(mel_basis(hp), dtype=np.float32)),
        "clip_a": torch.from_numpy(clip_a),
        "clip_b": torch.from_numpy(clip_b),
        "trim_a": torch.tensor([len(trimmed_a)], dtype=torch.int64),
        "trim_b": torch.tensor([len(trimmed_b)], dtype=torch.int64),
        "mel_a_raw": torch.from_numpy(mel_a_raw),
        "mel_a": torch.from_numpy(mel_a),
        "mel_b": torch.from_numpy(mel_b),
        "windows": torch.from_numpy(windows),
        "partial_embeds": partial_embeds.float().contiguous(),
        "embed_a": torch.from_numpy(emb_a[0]).contiguous(),
        "embed_b": torch.from_numpy(emb_b[0]).contiguous(),
        "embed_ab": torch.from_numpy(emb_ab).contiguous(),
    }
    out = ROOT / "tests" / "fixtures" / "parity_voice_encoder.safetensors"
    save_file(tensors, str(out), metadata={"seed": str(SEED), "source": "chatterbox-tts 0.1.7 VoiceEncoder"})
    for name, t in tensors.items():
        print(f"{name:15s} {tuple(t.shape)} absmax={t.abs().max().item():.4g}")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
