"""Make tests/fixtures/parity_mtl_t3.safetensors: the REFERENCE multilingual T3 (chatterbox-tts 0.1.7) on our
seeded random weights: teacher-forced logits with and without CFG, and seeded decoding with its alignment
stream analyzer on.

Run with the reference environment (recipe in ../shared/reference/README.md):

    /tmp/REFENV/bin/python scripts/parity/mtl_t3.py

The reference T3 is built at our tiny size as in scripts/parity/t3.py, with the multilingual text
vocabulary (2,454: its `T3Config.multilingual()`, which turns the analyzer on). The tiny backbone has 2
layers of 4 heads, so the analyzer's LLAMA_ALIGNED_HEADS is set to the heads our T3 watches at that size
(models.alignment.alignment_heads); everything else of the analyzer runs as released, its attention hooks
included (the reference switches the backbone to eager attention for them). Text ids come from our
MtlTokenizer on the synthetic vocabulary, between T3's start and stop text tokens as the reference pads
them. Everything in fp32.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.t3.inference import alignment_stream_analyzer as ref_analyzer  # noqa: E402
from chatterbox.models.t3.modules.t3_config import T3Config as RefT3Config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from t3 import build_reference, random_speech, ref_cond, teacher_forced  # noqa: E402  (scripts/parity/t3.py)

from chatterbox_cli.models.alignment import alignment_heads  # noqa: E402
from chatterbox_cli.models.mtl_tokenizer import MtlTokenizer  # noqa: E402
from chatterbox_cli.models.t3 import T3Config  # noqa: E402
from chatterbox_cli.testing.checkpoint_writer import MTL_TOKENIZER_JSON, random_conds  # noqa: E402

SEED = 4321
TEXTS = {  # language -> text: long enough (> 5 tokens) that the analyzer holds the stop token back
    "fr": "Bonjour, comment allez-vous aujourd'hui ?",
    "de": "Guten Morgen.",
}
CFG_WEIGHT = 0.5
# Runs on "eager-stop" weights have the stop token's row of speech_head scaled by this: random weights
# then want to stop at about every other step, so the analyzer's holding back decides when they stop.
STOP_ROW_SCALE = 8.0
# (weights, text, torch seed, max_new_tokens, cfg_weight, temperature, min_p, top_p, repetition_penalty);
# the multilingual defaults (penalty 2.0) first. top_p 1e-9 is greedy in the reference's terms (see
# scripts/parity/t3.py); greedy without a penalty repeats a token, which forces the stop token.
DECODE_RUNS = [
    ("plain", "fr", 7, 200, 0.5, 0.8, 0.05, 1.0, 2.0),
    ("plain", "de", 11, 200, 0.5, 0.8, 0.05, 1.0, 2.0),
    ("plain", "fr", 3, 200, 0.3, 1.0, 0.02, 0.9, 1.2),
    ("plain", "de", 5, 200, 0.5, 0.8, 0.05, 1e-9, 2.0),
    ("plain", "fr", 9, 200, 0.5, 0.8, 0.05, 1e-9, 1.0),
    ("eager-stop", "fr", 13, 200, 0.5, 0.8, 0.05, 1.0, 2.0),
    ("eager-stop", "de", 17, 200, 0.5, 0.8, 0.05, 1.0, 2.0),
]


def speech_head(plain: torch.Tensor, kind: str, stop_token: int) -> torch.Tensor:
    """speech_head's weight for runs on `kind` weights ("plain" or "eager-stop")."""
    head = plain.clone()
    if kind == "eager-stop":
        head[stop_token] *= STOP_ROW_SCALE
    return head


OUT = ROOT / "tests" / "fixtures" / "parity_mtl_t3.safetensors"


def main() -> None:
    torch.set_num_threads(1)
    ours = replace(T3Config.tiny(), text_vocab_size=2454)
    ref_analyzer.LLAMA_ALIGNED_HEADS = list(alignment_heads(ours.n_layers, ours.n_heads))
    model = build_reference(ours, RefT3Config.multilingual(), SEED)
    assert model.hp.is_multilingual
    plain_head = model.speech_head.weight.detach().clone()
    conds = random_conds(SEED)["t3"]
    tokenizer = MtlTokenizer(MTL_TOKENIZER_JSON)
    out: dict[str, torch.Tensor] = {
        "speaker_emb": conds["speaker_emb"],
        "cond_prompt_speech_tokens": conds["cond_prompt_speech_tokens"],
        "emotion_adv": conds["emotion_adv"],
    }
    texts = {}
    for language, text in TEXTS.items():
        ids = [ours.start_text_token, *tokenizer.encode(text, language), ours.stop_text_token]
        texts[language] = torch.tensor([ids], dtype=torch.long)
        out[f"text_{language}"] = texts[language]
    text = texts["fr"]
    speech = random_speech(ours, SEED + 1)
    out["speech_tokens"] = speech

    with torch.inference_mode():
        out.update(teacher_forced(model, conds, text, speech, CFG_WEIGHT))

        for i, (kind, language, seed, n_new, w, temp, min_p, top_p, rep) in enumerate(DECODE_RUNS):
            model.speech_head.weight.copy_(speech_head(plain_head, kind, ours.stop_speech_token))
            torch.manual_seed(seed)
            tokens = model.inference(
                t3_cond=ref_cond(conds),
                text_tokens=texts[language].expand(2, -1).clone(),  # mtl_tts always duplicates the text
                max_new_tokens=n_new,
                temperature=temp,
                cfg_weight=w,
                repetition_penalty=rep,
                min_p=min_p,
                top_p=top_p,
            )
            out[f"decode{i}_tokens"] = tokens[0].clone()
            print(f"run {i}: {tokens.shape[1]} tokens, last {tokens[0, -3:].tolist()}")

    meta = {
        "seed": str(SEED),
        "config": "tiny, text vocabulary 2454",
        "alignment_heads": json.dumps(ref_analyzer.LLAMA_ALIGNED_HEADS),
        "cfg_weight": str(CFG_WEIGHT),
        "stop_row_scale": str(STOP_ROW_SCALE),
        "decode_runs": json.dumps(DECODE_RUNS),
        "reference": "chatterbox-tts 0.1.7, transformers " + __import__("transformers").__version__,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
