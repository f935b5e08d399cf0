"""Write tests/fixtures/parity_text.json: the reference's punc_norm on varied strings.

Run with the reference environment:  /work/refenv/bin/python scripts/parity/text.py
"""

from __future__ import annotations

import json
from pathlib import Path

from chatterbox.tts import punc_norm

INPUTS: list[str] = [
    "",
    " ",
    "   \t\n ",
    "hello world",
    "Hello world",
    "Hello world.",
    "  leading spaces keep their lower case",
    "trailing spaces   ",
    "multiple    spaces\tand\ttabs\nand newlines",
    "Wait... what?",
    "Trailing ellipsis...",
    "Unicode ellipsis\u2026 here\u2026",
    "Time: 10:30 today",
    "A list; with semicolons; everywhere",
    "spaced ; semicolon",
    "An aside - like this - in the middle",
    "Em\u2014dash and en\u2013dash",
    "Spaced em \u2014 dash",
    "Dash at the end -",
    "Comma at the end,",
    "Question?",
    "Exclamation!",
    "Ends with a quote \u201cquoted\u201d",
    "\u201cSmart quotes\u201d and \u2018single ones\u2019 don\u2019t break",
    "Straight \"double\" and 'single' quotes",
    "number 3.14 and 1,000,000 people",
    "Mr. Smith met Dr. Jones at 5 p.m.",
    "e.g. this starts with an abbreviation",
    "\u00e9cole starts with an accented lower-case letter",
    "\u00dfstrasse starts with sharp s",
    "\u01c6 digraph first",
    "123 starts with digits",
    "Emoji \U0001f600 inside",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u4e2d\u6587\u6587\u672c",
    "Mixed...\u2026:;- punctuation - \u2014 \u2013 ,",
    "Ends with colon:",
    "Ends with semicolon;",
    "ends with space then comma ,",
    "a",
    "...",
    "Non\u00a0breaking\u00a0spaces and thin\u2009spaces",
    "[laughter] That was funny [giggle]",
    "Line one\r\nLine two\r\n",
]


def main() -> None:
    out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity_text.json"
    cases = [{"input": text, "expected": punc_norm(text)} for text in INPUTS]
    out.write_text(
        json.dumps(
            {"source": "chatterbox-tts 0.1.7 chatterbox.tts.punc_norm", "cases": cases},
            ensure_ascii=True,
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
