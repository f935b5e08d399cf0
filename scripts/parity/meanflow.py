"""Parity fixture for Turbo's mean-flow S3Gen: speech tokens -> mel -> 24 kHz waveform.

Run with the reference environment:

    /tmp/REFENV/bin/python scripts/parity/meanflow.py

For `tiny` and `english` sizes it takes our seeded random mean-flow S3Gen weights
(`random_state_dict(S3GenConfig.<size>(meanflow=True), SEED)`: the plain weights plus the estimator's
time mixer), loads the `flow.*` and `mel2wav.*` parts strictly into the reference classes (tiny: at our
tiny sizes, see scripts/parity/flow.py and hift.py) with the reference decoder in mean-flow mode, and
runs the reference `S3Token2Wav.inference` with `meanflow=True` (its flow_inference draws the generated
frames' noise, the CFM draws noise for all frames and keeps only the prompt's, then 2 or 3 Euler steps
on a linear schedule without CFG; HiFT; the trim fade) in fp32, with a conditioning dict and the global
RNG seeded with NOISE_SEED before each call. The 2-step cases are Turbo as shipped
(`n_cfm_timesteps=2`); the 3-step ones stand for `--flow-steps 3`.
Writes tests/fixtures/parity_meanflow.safetensors (+ .json).
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

from chatterbox.models.s3gen.utils.intmeanflow import get_intmeanflow_time_mixer  # noqa: E402

from chatterbox_cli.models.s3gen import S3GenConfig, random_state_dict  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity_meanflow"
SEED = 0
NOISE_SEED = 2025
CASES = {
    # name: (size, prompt tokens, tokens, flow steps)
    "tiny2": ("tiny", 8, 12, 2),
    "tiny3": ("tiny", 8, 12, 3),
    "english2": ("english", 6, 10, 2),
}


def _load_sibling(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"_parity_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_meanflow_model(config: S3GenConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference S3Token2Wav (speaking parts only) in mean-flow mode, holding `weights`."""
    s3gen_parity = _load_sibling("s3gen")
    flow = _load_sibling("flow").reference_flow(config.flow)
    # what ConditionalDecoder(meanflow=True) adds to the plain decoder; its weights come from `weights`
    estimator = flow.decoder.estimator
    estimator.meanflow = True
    estimator.time_embed_mixer = get_intmeanflow_time_mixer(4 * config.flow.est_channels)
    flow.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("flow.")}, strict=True)
    hift = s3gen_parity.reference_hift(config)
    hift.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("mel2wav.")}, strict=True)
    model = s3gen_parity.reference_s3token2wav(flow, hift)
    model.meanflow = True
    return model


@torch.inference_mode()
def run_case(name: str) -> dict[str, torch.Tensor]:
    size, n_prompt, n_tokens, steps = CASES[name]
    config = getattr(S3GenConfig, size)(meanflow=True)
    weights = random_state_dict(config, SEED)
    model = reference_meanflow_model(config, weights)
    del weights

    g = torch.Generator().manual_seed(SEED + 700)
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
    wav, _ = model.inference(tokens, ref_dict=dict(cond), n_cfm_timesteps=steps)
    torch.manual_seed(NOISE_SEED)
    mel = model.flow_inference(tokens, ref_dict=dict(cond), n_cfm_timesteps=steps, finalize=True)
    print(f"{name}: mel {tuple(mel.shape)} std {mel.std():.3f}; wav {tuple(wav.shape)} std {wav.std():.4f}")
    out = {f"{name}.tokens": tokens, f"{name}.mel": mel.contiguous(), f"{name}.wav": wav.contiguous()}
    out.update({f"{name}.{k}": v for k, v in saved.items()})
    return out


def main() -> None:
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    for name in CASES:
        tensors.update(run_case(name))
    save_file(tensors, f"{OUT}.safetensors")
    meta = {name: {"config": size, "n_timesteps": steps} for name, (size, _, _, steps) in CASES.items()}
    meta.update({"seed": SEED, "noise_seed": NOISE_SEED})
    Path(f"{OUT}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
