"""Turbo's tokenizer test files and their parity fixture.

python scripts/parity/gpt2_tokenizer.py files PATH/gpt2.tiktoken
    Writes chatterbox_cli/testing/data/turbo/ (stdlib only). GPT-2's vocabulary cannot be downloaded
    here, so it is rebuilt from `whisper/assets/gpt2.tiktoken` of the openai-whisper sdist
    (`pip download --no-deps openai-whisper==20250625`): base64 token -> rank, where the rank is
    GPT-2's token id and rank 256 + i is the token made by merge i. Each merge is recovered by
    running BPE over the token's bytes with only the lower ranks. Checked: the full rebuild gives
    the 456,318-byte merges.txt and ids such as "Hello world" -> [15496, 995].
    To stay small the files keep the first MERGES merges (ids 0 .. 256 + MERGES - 1, each the real
    GPT-2 id of that token); "<|endoftext|>" and the 19 paralinguistic tags follow without a gap,
    in the official order. The tag files mirror ResembleAI/chatterbox-turbo's added_tokens.json,
    tokenizer_config.json and special_tokens_map.json with those ids. The official tag list and
    files (not downloadable here) are from byte copies of them in the public repository
    voldiguarddevelopment/syrinx (tests/golden/chatterbox/config/), agreeing with resemble-ai/chatterbox
    issue #557 ("19 paralinguistic tags in added_tokens.json, ids 50257-50275"); with MERGES = 50000
    this script writes files of those copies' exact sizes, and the full GPT-2 with the official ids.

/tmp/REFENV/bin/python scripts/parity/gpt2_tokenizer.py fixture [FOLDER]
    Writes tests/fixtures/parity_gpt2_tokenizer.json: the reference (chatterbox-tts 0.1.7,
    transformers AutoTokenizer) on FOLDER (default: the test files): tts_turbo.punc_norm of each
    text, the ids the reference's generate gets for it, the ids and decode of the raw text.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "chatterbox_cli" / "testing" / "data" / "turbo"
FIXTURE = ROOT / "tests" / "fixtures" / "parity_gpt2_tokenizer.json"
MERGES = 8000
EOS = "<|endoftext|>"
sys.path.insert(0, str(ROOT))
from chatterbox_cli.text import TURBO_TAGS as TAGS  # noqa: E402  (ids 50257 .. 50275 in the official files)

# --------------------------------------------------------------------------------------------------
# files


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value: printable Latin-1 bytes stand for themselves,
    the others take code points from 256 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def read_ranks(path: Path) -> list[bytes]:
    """Tokens of a .tiktoken file, indexed by rank."""
    ranked: dict[int, bytes] = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranked[int(rank)] = base64.b64decode(token)
    assert sorted(ranked) == list(range(len(ranked))), "ranks must be 0 .. n-1"
    return [ranked[r] for r in range(len(ranked))]


def recover_merges(tokens: list[bytes], count: int) -> list[tuple[bytes, bytes]]:
    """The pair merged into token 256 + i, for i < count."""
    rank = {token: r for r, token in enumerate(tokens)}
    merges = []
    for r in range(256, 256 + count):
        parts = [bytes([b]) for b in tokens[r]]
        while len(parts) > 2:
            candidates = [
                (rank[parts[i] + parts[i + 1]], i)
                for i in range(len(parts) - 1)
                if rank.get(parts[i] + parts[i + 1], r) < r
            ]
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"token {r} is not one merge of lower ranks"
        merges.append((parts[0], parts[1]))
    return merges


def token_object(content: str, special: bool | None) -> dict[str, object]:
    entry: dict[str, object] = {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }
    if special is not None:
        entry["special"] = special
    return entry


def write_files(tiktoken: Path, merges: int = MERGES) -> None:
    tokens = read_ranks(tiktoken)
    symbols = byte_symbols()
    assert sorted(tokens[:256]) == [bytes([b]) for b in range(256)], "ranks 0-255 must be the bytes"

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    kept = 256 + merges
    vocab = {spell(token): i for i, token in enumerate(tokens[:kept])}
    eos_id = kept
    vocab[EOS] = eos_id
    tag_ids = {tag: eos_id + 1 + i for i, tag in enumerate(TAGS)}
    pairs = recover_merges(tokens, merges)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{spell(a)} {spell(b)}\n" for a, b in pairs)
    (OUT_DIR / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    added = dict(sorted(tag_ids.items()))
    (OUT_DIR / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    decoder = {str(eos_id): token_object(EOS, True)}
    decoder.update({str(i): token_object(tag, False) for tag, i in tag_ids.items()})
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 1024,
        "pad_token": EOS,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOS,
    }
    (OUT_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {
        "bos_token": token_object(EOS, None),
        "eos_token": token_object(EOS, None),
        "pad_token": EOS,
        "unk_token": token_object(EOS, None),
    }
    (OUT_DIR / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {OUT_DIR}: {len(vocab)} vocabulary tokens, {len(pairs)} merges, {len(TAGS)} tags")


# --------------------------------------------------------------------------------------------------
# fixture

TEXTS = [
    "",
    " ",
    "Hello world",
    "hello there, how are you?",
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and trailing spaces  ",
    "Double  spaces,\ttabs\tand\nnew lines\r\nand CRLF.",
    "Punctuation: colons; semicolons - dashes -- and (brackets)!",
    "Wait... what?! No way...",
    "Unicode ellipsis\u2026 and more\u2026",
    "\u201cSmart quotes\u201d and \u2018single ones\u2019 don\u2019t break",
    "Em\u2014dash, en\u2013dash, spaced \u2014 dash \u2013 here",
    "Time: 10:30 , then a space before a comma",
    "Numbers 0123456789, 3.14, 1,000,000 and $19.99 (20%).",
    "Emoji \U0001f600\U0001f44d\U0001f3fd and symbols \u2665 \u2605 \u00a9 \u2122 \u20ac",
    "Caf\u00e9, na\u00efve, fa\u00e7ade, \u00c6r\u00f8, S\u00e3o Paulo, Z\u00fcrich.",
    "\u6f22\u5b57\u3068\u304b\u306a, \u0440\u0443\u0441\u0441\u043a\u0438\u0439, "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\u00e9cole starts with an accented lower-case letter",
    "Ends with a dash -",
    "Ends with a comma,",
    "ALL CAPS AND MiXeD CaSe",
    *TAGS,
    *(f"Well {tag} that is something." for tag in TAGS),
    "[laugh]",
    "[laugh] at the start",
    "at the end [laugh]",
    "Adjacent tags [sigh][laugh][cough] in a row.",
    "Spaced tags [sigh] [laugh]  [cough] in a row",
    "No space:[laugh]around[chuckle]tags",
    "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store.",
    "Hi there [clear throat], sorry... [whispering] can you hear me?",
    "[clear  throat] with two spaces inside",
    "Not tags: [Laugh] [LAUGH] [laughs] [laugh ] [ laugh] [clear-throat] [whisper]",
    "Brackets [that are not tags] and a tag [gasp].",
    "The end token <|endoftext|> typed in text",
    "x[laugh]y",
]


def make_fixture(folder: Path) -> None:
    from chatterbox.tts_turbo import punc_norm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:  # as ChatterboxTurboTTS.from_local does
        tok.pad_token = tok.eos_token

    def generate_ids(text: str) -> list[int]:  # ChatterboxTurboTTS.generate's call
        return tok(text, return_tensors="pt", padding=True, truncation=True).input_ids[0].tolist()

    cases = []
    for text in TEXTS:
        normalized = punc_norm(text)
        raw = tok(text)["input_ids"]
        cases.append(
            {
                "text": text,
                "normalized": normalized,
                "ids": generate_ids(normalized),
                "raw_ids": raw,
                "raw_decoded": tok.decode(raw),
            }
        )
    tags = {tag: tok.convert_tokens_to_ids(tag) for tag in TAGS}
    fixture = {
        "reference": "chatterbox-tts 0.1.7 tts_turbo.punc_norm + transformers AutoTokenizer",
        "folder": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "len": len(tok),
        "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id,
        "tags": tags,
        "cases": cases,
    }
    FIXTURE.write_text(json.dumps(fixture, ensure_ascii=True, indent=1) + "\n")
    print(f"wrote {FIXTURE} ({len(cases)} texts, len(tokenizer) = {len(tok)})")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "files":
        write_files(Path(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "fixture":
        make_fixture(Path(sys.argv[2]).resolve() if len(sys.argv) >= 3 else OUT_DIR)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
