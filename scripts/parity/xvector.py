"""Parity fixture for CAMPPlus and its Kaldi fbank (run with the reference env: /work/refenv/bin/python).

Loads our seeded random full-size weights into the reference CAMPPlus (strict), runs synthetic 16 kHz
clips through torchaudio's Kaldi fbank and the network, and writes inputs and outputs to
tests/fixtures/parity_xvector.safetensors (+ .json with the facts).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.s3gen.xvector import CAMPPlus as RefCAMPPlus  # noqa: E402
from chatterbox.models.s3gen.xvector import extract_feature  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.s3gen.xvector import CAMPPlusConfig, random_state_dict  # noqa: E402

SEED = 0
SR = 16_000


def synthetic_clip(n: int, seed: int) -> torch.Tensor:
    """Harmonic tones with a slow pitch glide and an amplitude envelope plus noise, as int16 PCM."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 180.0 + 50.0 * torch.sin(2 * math.pi * 0.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    x = sum(0.3 / k * torch.sin(k * phase) for k in range(1, 7))
    x = x * (0.55 + 0.45 * torch.sin(2 * math.pi * 3.1 * t))
    x = x + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.round(x.clamp(-1, 1) * 32767).to(torch.int16)


def main() -> None:
    torch.set_num_threads(1)
    ref = RefCAMPPlus(memory_efficient=False)
    ref.load_state_dict(random_state_dict(CAMPPlusConfig.english(), SEED), strict=True)
    ref.eval()

    pcm_a = synthetic_clip(3 * SR + 4321, seed=3)  # 3.27 s
    pcm_b = synthetic_clip(2 * SR + 1234, seed=4)  # 2.08 s
    wav_a, wav_b = pcm_a.float() / 32768, pcm_b.float() / 32768

    with torch.inference_mode():
        feats_a, _, _ = extract_feature(wav_a[None])
        xvec_a = ref.inference(wav_a[None])
        # two clips of different lengths: the reference zero-pads the shorter one's features
        feats_ab, feat_lens, _ = extract_feature([wav_a, wav_b])
        xvec_ab = ref.inference([wav_a, wav_b])

    out = {
        "pcm_a": pcm_a,
        "pcm_b": pcm_b,
        "fbank_a": feats_a[0].contiguous(),
        "fbank_b": feats_ab[1, : feat_lens[1]].contiguous(),
        "xvector_a": xvec_a.contiguous(),
        "xvector_ab": xvec_ab.contiguous(),
    }
    fixtures = ROOT / "tests" / "fixtures"
    save_file(out, str(fixtures / "parity_xvector.safetensors"))
    facts = {
        "reference": "chatterbox-tts 0.1.7 CAMPPlus(memory_efficient=False).inference + torchaudio fbank",
        "config": "CAMPPlusConfig.english()",
        "seed": SEED,
        "wav": "pcm_* are int16; wav = pcm / 32768",
        "torch": torch.__version__,
    }
    (fixtures / "parity_xvector.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
    print({k: tuple(v.shape) for k, v in out.items()})
    print("xvector_a[:6]", xvec_a[0, :6].tolist(), "norm", xvec_a.norm().item())


if __name__ == "__main__":
    main()
