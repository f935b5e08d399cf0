"""Make tests/fixtures/parity_tokenizer.json: the REFERENCE EnTokenizer's ids for a set of strings.

Run with the reference environment (recipe in ../shared/reference/README.md):

    /work/refenv/bin/python scripts/parity/tokenizer.py

Strings cover plain English, punctuation, digits, repeated/odd whitespace, accented Latin, IPA, typographic
quotes and dashes, emoji, CJK and other scripts. Saved per string: `encode` ids and the reference
`decode` of those ids. The vocabulary is the official tokenizer.json our test checkpoints carry.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox.models.tokenizers import EnTokenizer as RefTokenizer  # noqa: E402

from chatterbox_cli.testing.checkpoint_writer import TOKENIZER_JSON  # noqa: E402

STRINGS = [
    "Hello there.",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "It's 3:45 p.m. on 2024-06-01; the price is $19.99 (approx. 20%).",
    "Wait... what?! No -- really?",
    "  leading and trailing spaces  ",
    "double  spaces and a\ttab and a\nnewline",
    "Café, naïve, façade, Ærø, São Paulo, Zürich.",
    "\u201cSmart quotes\u201d and \u2018single ones\u2019 \u2014 em dash \u2013 en dash \u2026",
    "IPA: \u02c8h\u025bl\u0259\u028a w\u025c\u02d0ld",
    "Emoji 😀👍🏽 and symbols ♥ ★ © ™ €",
    "漢字とかなカナ, 한국어, русский текст, العربية, עברית, ελληνικά",
    "[laughter] Oh my [sigh] well [giggle].",
    "ALL CAPS SHOUTING AND MiXeD CaSe",
    "numbers 0123456789 and math 2+2=4 < 5 > 3",
    "",
]
OUT = ROOT / "tests" / "fixtures" / "parity_tokenizer.json"


def main() -> None:
    tok = RefTokenizer(str(TOKENIZER_JSON))
    cases = []
    for text in STRINGS:
        ids = tok.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": "chatterbox-tts 0.1.7 EnTokenizer", "cases": cases}, indent=1))
    print(f"wrote {OUT} ({len(cases)} strings)")


if __name__ == "__main__":
    main()
