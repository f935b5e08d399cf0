"""Parity fixture for the S3Gen flow (tokens -> mel): the reference implementation's outputs.

Run with the reference environment:

    /work/refenv/bin/python scripts/parity/flow.py

For two sizes -- `tiny` (our FlowConfig.tiny(); the reference's hard-wired 512-wide look-ahead and
upsampling layers are swapped for the same reference classes at width 64, and its four up-blocks cut
to two) and `english` (the real sizes) -- it builds our seeded random flow weights
(`flow.random_state_dict(config, seed)`), loads them strictly into the reference
`CausalMaskedDiffWithXvec`, and runs in fp32:
  * the encoder path (embedding * mask -> UpsampleConformerEncoder -> encoder_proj) = `mu`,
  * `flow.inference(..., finalize=True)` with the global RNG seeded, so the initial noise is
    `torch.randn(1, 80, T)` after `torch.manual_seed(NOISE_SEED)`; that noise is saved too.
Outputs go to tests/fixtures/parity_flow.safetensors (+ .json with the settings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.s3gen.configs import CFM_PARAMS  # noqa: E402
from chatterbox.models.s3gen.decoder import ConditionalDecoder as RefDecoder  # noqa: E402
from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec  # noqa: E402
from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM  # noqa: E402
from chatterbox.models.s3gen.transformer.upsample_encoder import (  # noqa: E402
    PreLookaheadLayer,
    Upsample1D,
    UpsampleConformerEncoder,
)
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.s3gen.flow import FlowConfig, random_state_dict  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity_flow"
CASES = {
    # name: (config, weight seed, prompt tokens, tokens, flow steps)
    "tiny": (FlowConfig.tiny(), 0, 7, 11, 10),
    "tiny5": (FlowConfig.tiny(), 0, 7, 11, 5),
    "english": (FlowConfig.english(), 1, 6, 9, 10),
}
NOISE_SEED = 1234


def reference_flow(c: FlowConfig) -> CausalMaskedDiffWithXvec:
    encoder = UpsampleConformerEncoder(
        input_size=c.d_model,
        output_size=c.d_model,
        attention_heads=c.n_heads,
        linear_units=c.linear_units,
        num_blocks=c.n_blocks,
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=True,
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
        use_cnn_module=False,
        macaron_style=False,
    )
    if c.d_model != 512:  # the reference hard-wires width 512 for these two layers
        encoder.pre_lookahead_layer = PreLookaheadLayer(channels=c.d_model, pre_lookahead_len=c.pre_lookahead)
        encoder.up_layer = Upsample1D(channels=c.d_model, out_channels=c.d_model, stride=c.token_mel_ratio)
    encoder.up_encoders = encoder.up_encoders[: c.n_up_blocks]
    estimator = RefDecoder(
        in_channels=4 * c.mel_dim,
        out_channels=c.mel_dim,
        causal=True,
        channels=[c.est_channels],
        dropout=0.0,
        attention_head_dim=c.est_head_dim,
        n_blocks=c.est_n_blocks,
        num_mid_blocks=c.est_n_mid,
        num_heads=c.est_n_heads,
        act_fn="gelu",
    )
    decoder = CausalConditionalCFM(spk_emb_dim=c.mel_dim, cfm_params=CFM_PARAMS, estimator=estimator)
    return CausalMaskedDiffWithXvec(
        input_size=c.d_model,
        output_size=c.mel_dim,
        spk_embed_dim=c.spk_embed_dim,
        vocab_size=c.vocab_size,
        encoder=encoder,
        decoder=decoder,
    )


@torch.inference_mode()
def run_case(name: str) -> dict[str, torch.Tensor]:
    config, seed, n_prompt, n_tokens, steps = CASES[name]
    flow = reference_flow(config)
    flow.load_state_dict(random_state_dict(config, seed), strict=True)
    flow.eval()

    g = torch.Generator().manual_seed(seed + 100)
    prompt_token = torch.randint(0, config.vocab_size, (1, n_prompt), generator=g)
    tokens = torch.randint(0, config.vocab_size, (1, n_tokens), generator=g)
    prompt_feat = torch.randn(1, 2 * n_prompt, config.mel_dim, generator=g)
    embedding = torch.randn(1, config.spk_embed_dim, generator=g)

    # encoder path on the concatenated tokens, as flow.inference does it
    all_tokens = torch.cat([prompt_token, tokens], dim=1)
    lengths = torch.tensor([all_tokens.size(1)])
    h, _ = flow.encoder(flow.input_embedding(all_tokens), lengths)
    mu = flow.encoder_proj(h)

    torch.manual_seed(NOISE_SEED)
    noise = torch.randn(1, config.mel_dim, 2 * (n_prompt + n_tokens))
    torch.manual_seed(NOISE_SEED)
    mel, _ = flow.inference(
        token=tokens,
        token_len=torch.tensor([n_tokens]),
        prompt_token=prompt_token,
        prompt_token_len=torch.tensor([n_prompt]),
        prompt_feat=prompt_feat,
        prompt_feat_len=None,
        embedding=embedding,
        finalize=True,
        n_timesteps=steps,
    )
    print(f"{name}: mu {tuple(mu.shape)} std {mu.std():.3f}; mel {tuple(mel.shape)} std {mel.std():.3f}")
    return {
        f"{name}.prompt_token": prompt_token,
        f"{name}.tokens": tokens,
        f"{name}.prompt_feat": prompt_feat,
        f"{name}.embedding": embedding,
        f"{name}.noise": noise,
        f"{name}.mu": mu.contiguous(),
        f"{name}.mel": mel.contiguous(),
    }


def main() -> None:
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    for name in CASES:
        tensors.update(run_case(name))
    save_file(tensors, f"{OUT}.safetensors")
    meta = {
        name: {"config": "english" if c == FlowConfig.english() else "tiny", "seed": s, "n_timesteps": n}
        for name, (c, s, _, _, n) in CASES.items()
    }
    meta["noise_seed"] = NOISE_SEED
    Path(f"{OUT}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
