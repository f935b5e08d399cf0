"""Make tests/fixtures/parity_turbo_t3.safetensors: the REFERENCE Turbo T3 (chatterbox-tts 0.1.7, GPT-2
backbone) on our seeded random weights: the conditioning prefix, teacher-forced hidden states and logits,
and seeded decoding through its `inference_turbo` (temperature, top-k, top-p, then the repetition penalty).

Run with the reference environment (recipe in ../shared/reference/README.md):

    /tmp/REFENV/bin/python scripts/parity/turbo_t3.py

The reference T3 is built as `ChatterboxTurboTTS.from_local` builds it (no perceiver, no emotion input, no
segment positions, a biased speech head), at our tiny Turbo size: a tiny GPT-2 config is added to its
LLAMA_CONFIGS. Our writer's `random_state_dict(T3Config.tiny_turbo(), SEED)` (the official layout: Conv1D
weights [in, out], GPT-2's unused `wte` included) is loaded strictly, so the test regenerates the same
weights from the seed. Text ids are random ids of the tiny text vocabulary, not wrapped in start/stop
tokens (Turbo's tokenizer output goes in as it is). Everything in fp32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.t3 import t3 as ref_t3_module  # noqa: E402
from chatterbox.models.t3.llama_configs import GPT2_MEDIUM_CONFIG, LLAMA_CONFIGS  # noqa: E402
from chatterbox.models.t3.modules.cond_enc import T3Cond as RefT3Cond  # noqa: E402
from chatterbox.models.t3.modules.t3_config import T3Config as RefT3Config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.t3 import T3Config, random_state_dict  # noqa: E402

SEED = 2468
TEXT_LEN = 12
SPEECH_LEN = 6  # start token + 5 speech tokens
# (torch seed, max_gen_len, temperature, top_k, top_p, repetition_penalty); Turbo's defaults first. The
# reference's loop samples once before it and then up to max_gen_len more (max_gen_len + 1 in all).
DECODE_RUNS = [
    (7, 60, 0.8, 1000, 0.95, 1.2),
    (11, 60, 1.0, 50, 0.8, 1.5),
    (3, 60, 0.5, 6563, 1.0, 1.2),  # top-k over the whole vocabulary and top-p 1: the penalty alone
    (5, 60, 0.8, 1, 1.0, 1.2),  # top-k 1: the model's own choice, through the KV-cache decode path
]
# Runs on "eager-start" weights, whose speech_head bias of the start token is raised by START_BIAS (about
# ln 6563: the start token is then about as likely as all others together), so whether the repetition
# penalty's history holds the start token decides draws.
START_BIAS = 8.0
START_RUNS = [(13, 60, 0.8, 6563, 1.0, 2.0), (17, 60, 1.0, 1000, 1.0, 2.0)]  # no top-p: the penalty decides
OUT = ROOT / "tests" / "fixtures" / "parity_turbo_t3.safetensors"


def build_reference(ours: T3Config, seed: int) -> torch.nn.Module:
    LLAMA_CONFIGS["GPT2_tiny"] = dict(
        GPT2_MEDIUM_CONFIG,
        n_embd=ours.hidden_size,
        hidden_size=ours.hidden_size,
        n_head=ours.n_heads,
        n_layer=ours.n_layers,
        n_positions=ours.gpt2_positions,
        n_ctx=ours.gpt2_positions,
        vocab_size=ours.backbone_vocab_size,
    )
    assert ours.intermediate_size == 4 * ours.hidden_size  # GPT-2's inner width when n_inner is unset
    hp = RefT3Config(text_tokens_dict_size=ours.text_vocab_size)
    hp.llama_config_name = "GPT2_tiny"
    hp.speech_tokens_dict_size = ours.speech_vocab_size
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = ours.speech_cond_prompt_len
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    model = ref_t3_module.T3(hp)
    model.load_state_dict(random_state_dict(ours, seed), strict=True)
    del model.tfmr.wte  # as from_local does: T3 feeds embeddings
    return model.eval()


def main() -> None:
    torch.set_num_threads(1)
    ours = T3Config.tiny_turbo()
    model = build_reference(ours, SEED)
    gen = torch.Generator().manual_seed(SEED)
    speaker = torch.randn(1, ours.speaker_embed_size, generator=gen)
    prompt = torch.randint(0, 6561, (1, ours.speech_cond_prompt_len), generator=gen)
    text = torch.randint(0, ours.text_vocab_size, (1, TEXT_LEN), generator=gen)
    speech = torch.cat(
        [
            torch.tensor([[ours.start_speech_token]]),
            torch.randint(0, 6561, (1, SPEECH_LEN - 1), generator=gen),
        ],
        dim=1,
    )
    out: dict[str, torch.Tensor] = {
        "speaker_emb": speaker,
        "cond_prompt_speech_tokens": prompt,
        "emotion_adv": torch.full((1, 1, 1), 0.5),  # unused by Turbo
        "text_tokens": text,
        "speech_tokens": speech,
    }

    def cond() -> RefT3Cond:
        return RefT3Cond(
            speaker_emb=speaker, cond_prompt_speech_tokens=prompt, emotion_adv=out["emotion_adv"]
        )

    with torch.inference_mode():
        out["cond_emb"] = model.prepare_conditioning(cond())
        embeds, n_cond = model.prepare_input_embeds(t3_cond=cond(), text_tokens=text, speech_tokens=speech)
        hidden = model.tfmr(inputs_embeds=embeds, return_dict=True).last_hidden_state
        out["hidden"] = hidden
        out["text_logits"] = model.text_head(hidden[:, n_cond : n_cond + TEXT_LEN])
        out["speech_logits"] = model.speech_head(hidden[:, n_cond + TEXT_LEN :])

        for i, (seed, n, temperature, top_k, top_p, penalty) in enumerate(DECODE_RUNS):
            torch.manual_seed(seed)
            tokens = model.inference_turbo(
                cond(), text, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=penalty, max_gen_len=n,
            )  # fmt: skip
            out[f"decode{i}_tokens"] = tokens[0].clone()
            print(f"run {i}: {tokens.shape[1]} tokens, first {tokens[0, :6].tolist()}")

        model.speech_head.bias[ours.start_speech_token] += START_BIAS
        for i, (seed, n, temperature, top_k, top_p, penalty) in enumerate(START_RUNS):
            torch.manual_seed(seed)
            tokens = model.inference_turbo(
                cond(), text, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=penalty, max_gen_len=n,
            )  # fmt: skip
            out[f"start{i}_tokens"] = tokens[0].clone()
            starts = int((tokens[0] == ours.start_speech_token).sum())
            print(f"eager-start run {i}: {tokens.shape[1]} tokens, {starts} start tokens")

    meta = {
        "seed": str(SEED),
        "config": "tiny_turbo",
        "decode_runs": json.dumps(DECODE_RUNS),
        "start_runs": json.dumps(START_RUNS),
        "start_bias": str(START_BIAS),
        "reference": "chatterbox-tts 0.1.7, transformers " + __import__("transformers").__version__,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
