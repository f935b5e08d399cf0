"""Parity fixture for S3Gen's whole speaking path: speech tokens -> mel -> 24 kHz waveform.

Run with the reference environment:

    /work/refenv/bin/python scripts/parity/s3gen.py

For `tiny` and `english` sizes it takes our seeded random S3Gen weights
(`chatterbox_cli.models.s3gen.random_state_dict(config, SEED)`), loads the `flow.*` and `mel2wav.*`
parts strictly into the reference CausalMaskedDiffWithXvec and HiFTGenerator (tiny: the reference
classes at our tiny sizes, see scripts/parity/flow.py and hift.py), and runs the reference
`S3Token2Wav.inference` (flow with finalize=True and CFG, HiFT, the trim fade) in fp32 with a
conditioning dict and the global RNG seeded with NOISE_SEED. That RNG gives the flow's start noise
and then HiFT's source phases and noise, in the order our `S3Gen.synthesize(generator=...)` draws
them from a generator with the same seed. The tokenizer and CAMPPlus are not involved (a
stand-in module only answers `.device`); the Perth watermark is not either.
Writes tests/fixtures/parity_s3gen.safetensors (+ .json).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor  # noqa: E402
from chatterbox.models.s3gen.hifigan import HiFTGenerator as RefHiFT  # noqa: E402
from chatterbox.models.s3gen.s3gen import S3Token2Wav  # noqa: E402

from chatterbox_cli.models.s3gen import S3GenConfig, random_state_dict  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity_s3gen"
SEED = 0
NOISE_SEED = 2024
CASES = {
    # name: (config, prompt tokens, tokens, flow steps)
    "tiny": (S3GenConfig.tiny(), 8, 12, 10),
    "english": (S3GenConfig.english(), 6, 10, 5),
}


def _load_sibling(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"_parity_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_hift(config: S3GenConfig) -> torch.nn.Module:
    h = config.hift
    return RefHiFT(
        in_channels=h.in_channels,
        base_channels=h.base_channels,
        nb_harmonics=h.nb_harmonics,
        sampling_rate=h.sampling_rate,
        upsample_rates=list(h.upsample_rates),
        upsample_kernel_sizes=list(h.upsample_kernel_sizes),
        source_resblock_kernel_sizes=list(h.source_resblock_kernel_sizes),
        source_resblock_dilation_sizes=[list(d) for d in h.source_resblock_dilation_sizes],
        f0_predictor=ConvRNNF0Predictor(cond_channels=h.f0_channels),
    )


def reference_s3token2wav(flow: torch.nn.Module, hift: torch.nn.Module) -> S3Token2Wav:
    """An S3Token2Wav holding only the speaking parts, so its own inference() glue runs unchanged."""
    model = S3Token2Wav.__new__(S3Token2Wav)
    torch.nn.Module.__init__(model)
    model.meanflow = False
    model.tokenizer = torch.nn.Linear(1, 1)  # only asked for .device
    model.flow = flow
    model.mel2wav = hift
    n = 24000 // 50
    fade = torch.zeros(2 * n)
    fade[n:] = 0.5 * (1.0 + torch.cos(torch.linspace(torch.pi, 0.0, n)))
    model.register_buffer("trim_fade", fade, persistent=False)
    return model.eval()


@torch.inference_mode()
def run_case(name: str, reference_flow) -> dict[str, torch.Tensor]:  # noqa: ANN001
    config, n_prompt, n_tokens, steps = CASES[name]
    weights = random_state_dict(config, SEED)
    flow = reference_flow(config.flow)
    flow.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("flow.")}, strict=True)
    hift = reference_hift(config)
    hift.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("mel2wav.")}, strict=True)
    del weights
    model = reference_s3token2wav(flow, hift)

    g = torch.Generator().manual_seed(SEED + 500)
    tokens = torch.randint(0, config.flow.vocab_size, (1, n_tokens), generator=g)
    cond = {
        "prompt_token": torch.randint(0, config.flow.vocab_size, (1, n_prompt), generator=g),
        "prompt_token_len": torch.tensor([n_prompt]),
        # a log-mel-like level so HiFT's F0 predictor sees realistic input
        "prompt_feat": torch.randn(1, 2 * n_prompt, 80, generator=g) * 2.0 - 6.0,
        "prompt_feat_len": None,
        "embedding": torch.randn(1, config.flow.spk_embed_dim, generator=g),
    }
    saved = {k: v.clone() for k, v in cond.items() if v is not None}
    torch.manual_seed(NOISE_SEED)
    wav, _ = model.inference(tokens, ref_dict=cond, n_cfm_timesteps=steps)
    torch.manual_seed(NOISE_SEED)
    mel = model.flow_inference(tokens, ref_dict=dict(cond), n_cfm_timesteps=steps, finalize=True)
    print(f"{name}: mel {tuple(mel.shape)} std {mel.std():.3f}; wav {tuple(wav.shape)} std {wav.std():.4f}")
    out = {f"{name}.tokens": tokens, f"{name}.mel": mel.contiguous(), f"{name}.wav": wav.contiguous()}
    out.update({f"{name}.{k}": v for k, v in saved.items()})
    return out


def main() -> None:
    torch.set_num_threads(1)
    reference_flow = _load_sibling("flow").reference_flow
    tensors: dict[str, torch.Tensor] = {}
    for name in CASES:
        tensors.update(run_case(name, reference_flow))
    save_file(tensors, f"{OUT}.safetensors")
    meta = {name: {"config": name, "n_timesteps": steps} for name, (_, _, _, steps) in CASES.items()}
    meta.update({"seed": SEED, "noise_seed": NOISE_SEED})
    Path(f"{OUT}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
