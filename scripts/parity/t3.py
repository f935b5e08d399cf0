"""Make tests/fixtures/parity_t3.safetensors: outputs of the REFERENCE T3 on our seeded random weights.

Run with the reference environment (chatterbox-tts 0.1.7 and its deps next to torch 2.13 CPU; recipe in
../shared/reference/README.md):

    /work/refenv/bin/python scripts/parity/t3.py

The reference T3 is built at our tiny size: a tiny Llama config is added to its LLAMA_CONFIGS, its
T3Config is pointed at it, and its Perceiver (whose sizes are hard-coded to 1024) is built at the tiny
width. Our writer's `random_state_dict(T3Config.tiny(), SEED)` is loaded strictly, so the test regenerates
the same weights from the seed. Saved: the conditioning prefix (with and without a speech prompt),
teacher-forced text and speech logits without CFG (one row) and with CFG (conditional + unconditional
rows; the test combines them as cond + w * (cond - uncond)), the final hidden states, and speech
tokens from the reference's own decoding loop under fixed seeds (one run greedy). Everything in fp32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.t3 import t3 as ref_t3_module  # noqa: E402
from chatterbox.models.t3.llama_configs import LLAMA_520M_CONFIG_DICT, LLAMA_CONFIGS  # noqa: E402
from chatterbox.models.t3.modules import cond_enc as ref_cond_enc  # noqa: E402
from chatterbox.models.t3.modules.cond_enc import T3Cond as RefT3Cond  # noqa: E402
from chatterbox.models.t3.modules.perceiver import Perceiver as RefPerceiver  # noqa: E402
from chatterbox.models.t3.modules.t3_config import T3Config as RefT3Config  # noqa: E402
from chatterbox.models.tokenizers import EnTokenizer as RefTokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from chatterbox_cli.models.t3 import T3Config, random_state_dict  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import TOKENIZER_JSON, random_conds  # noqa: E402

SEED = 1234
TEXT = "Hello, world!"
SPEECH_LEN = 5  # start token + 4 speech tokens (speech logits are the bulk of the fixture)
CFG_WEIGHT = 0.5
DECODE_RUNS = [  # (torch seed, max_new_tokens, cfg_weight, temperature, min_p, top_p, repetition_penalty)
    (7, 24, 0.5, 0.8, 0.05, 1.0, 1.2),
    (11, 24, 0.7, 1.0, 0.02, 0.9, 1.3),
    # Greedy in the reference's terms: top_p 1e-9 keeps only the most likely token. Random weights give
    # flat logits, so in the sampled runs the random draws dominate; this run checks the model's own
    # choice through the KV-cache decode path, and equals our temperature-0 greedy decoding.
    (5, 24, 0.5, 0.8, 0.05, 1e-9, 1.2),
]
OUT = ROOT / "tests" / "fixtures" / "parity_t3.safetensors"


def build_reference(ours: T3Config, hp: RefT3Config | None = None, seed: int = SEED) -> torch.nn.Module:
    """The reference T3 at our config's size (`hp`: its T3Config, English by default), holding our random
    weights of `seed`."""
    LLAMA_CONFIGS["Llama_tiny"] = dict(
        LLAMA_520M_CONFIG_DICT,
        hidden_size=ours.hidden_size,
        intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.n_layers,
        num_attention_heads=ours.n_heads,
        num_key_value_heads=ours.n_heads,
        head_dim=ours.head_dim,
    )
    hp = hp or RefT3Config.english_only()
    hp.llama_config_name = "Llama_tiny"
    hp.max_text_tokens = ours.max_text_tokens
    hp.max_speech_tokens = ours.max_speech_tokens

    def tiny_perceiver() -> RefPerceiver:
        return RefPerceiver(ours.perceiver_queries, ours.hidden_size, ours.hidden_size, ours.perceiver_heads)

    ref_cond_enc.Perceiver = tiny_perceiver
    model = ref_t3_module.T3(hp)
    model.load_state_dict(random_state_dict(ours, seed), strict=True)
    return model.eval()


def ref_cond(t3: dict, with_prompt: bool = True) -> RefT3Cond:
    return RefT3Cond(
        speaker_emb=t3["speaker_emb"],
        cond_prompt_speech_tokens=t3["cond_prompt_speech_tokens"] if with_prompt else None,
        emotion_adv=t3["emotion_adv"],
    )


def random_speech(ours: T3Config, seed: int) -> torch.Tensor:
    """[1, SPEECH_LEN] speech tokens: the start token, then random codebook tokens."""
    gen = torch.Generator().manual_seed(seed)
    random = torch.randint(0, 6561, (1, SPEECH_LEN - 1), generator=gen)
    return torch.cat([torch.tensor([[ours.start_speech_token]]), random], dim=1)


def teacher_forced(
    model: torch.nn.Module, conds: dict, text: torch.Tensor, speech: torch.Tensor, cfg_weight: float
) -> dict[str, torch.Tensor]:
    """The reference's teacher-forced outputs for one text: one row without CFG, and with CFG the
    conditional and unconditional rows of its decoding prefix path (second row's text embeddings zeroed)."""
    res = model(
        t3_cond=ref_cond(conds),
        text_tokens=text,
        text_token_lens=torch.tensor([text.shape[1]]),
        speech_tokens=speech,
        speech_token_lens=torch.tensor([speech.shape[1]]),
    )
    embeds, n_cond = model.prepare_input_embeds(
        t3_cond=ref_cond(conds),
        text_tokens=text.expand(2, -1).clone(),
        speech_tokens=speech.expand(2, -1).clone(),
        cfg_weight=cfg_weight,
    )
    states = model.tfmr(inputs_embeds=embeds, output_hidden_states=True, return_dict=True).hidden_states
    hidden, n_text = states[-1], text.shape[1]
    return {
        "text_logits": res.text_logits,
        "speech_logits": res.speech_logits,
        "hidden": res.hidden_states,
        "cfg_hidden": hidden,
        "cfg_text_logits": model.text_head(hidden[:, n_cond : n_cond + n_text]),
        "cfg_speech_logits": model.speech_head(hidden[:, n_cond + n_text :]),
    }


def main() -> None:
    torch.set_num_threads(1)
    ours = T3Config.tiny()
    model = build_reference(ours)
    conds = random_conds(SEED)["t3"]

    tok = RefTokenizer(str(TOKENIZER_JSON))
    text_ids = [ours.start_text_token, *tok.encode(TEXT), ours.stop_text_token]
    text = torch.tensor([text_ids], dtype=torch.long)
    speech = random_speech(ours, SEED + 1)
    out: dict[str, torch.Tensor] = {
        "text_tokens": text,
        "speech_tokens": speech,
        "speaker_emb": conds["speaker_emb"],
        "cond_prompt_speech_tokens": conds["cond_prompt_speech_tokens"],
        "emotion_adv": conds["emotion_adv"],
    }

    with torch.inference_mode():
        out["cond_emb"] = model.prepare_conditioning(ref_cond(conds))
        out["cond_emb_no_prompt"] = model.prepare_conditioning(ref_cond(conds, with_prompt=False))

        out.update(teacher_forced(model, conds, text, speech, CFG_WEIGHT))

        for i, (seed, n_new, w, temp, min_p, top_p, rep) in enumerate(DECODE_RUNS):
            torch.manual_seed(seed)
            tokens = model.inference(
                t3_cond=ref_cond(conds),
                text_tokens=text.expand(2, -1).clone(),
                max_new_tokens=n_new,
                temperature=temp,
                cfg_weight=w,
                repetition_penalty=rep,
                min_p=min_p,
                top_p=top_p,
            )
            out[f"decode{i}_tokens"] = tokens[0].clone()

    meta = {
        "seed": str(SEED),
        "config": "tiny",
        "text": TEXT,
        "cfg_weight": str(CFG_WEIGHT),
        "decode_runs": json.dumps(DECODE_RUNS),
        "reference": "chatterbox-tts 0.1.7, transformers " + __import__("transformers").__version__,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")
    for k, v in out.items():
        print(f"  {k}: {tuple(v.shape)} {v.dtype}")


if __name__ == "__main__":
    main()
