"""Make the multilingual tokenizer fixtures: chatterbox_cli/testing/data/mtl_vocab.json and mtl_cangjie.json,
and tests/fixtures/mtl_parity_ids.json (language -> text and the REFERENCE MTLTokenizer's ids).

Run in our own venv with the ja and zh extras installed, the reference source unpacked at /tmp/ref:

    python scripts/parity/mtl_tokenizer.py [/tmp/ref/src/chatterbox/models/tokenizers/tokenizer.py]

The official grapheme_mtl_merged_expanded_v1.json and Cangjie5_TC.json cannot be downloaded here, so
both are synthetic:
  - the vocabulary is a BPE over the single graphemes the reference feeds its BPE for the sentences
    below (plus ASCII letters, digits and punctuation), a few two-letter merges, and as added special
    tokens [STOP] [UNK] [SPACE] [START], the 23 "[xx]" language tokens, [cj_a]..[cj_z], [cj_.] and
    [cj_0]..[cj_9]; its pre-tokenizer is Whitespace, as in the official English tokenizer.json;
  - the Cangjie table gives each Chinese glyph of the sentences a made-up code, with decoy glyphs
    sharing codes (so index suffixes 1 and 2 occur), one glyph listed twice (the last code wins), one
    entry with a third field, and one "Lo" glyph left without a code.
The reference module is loaded straight from its file; its hf_hub_download is replaced by a function
returning the synthetic Cangjie file. Its segmenter, spacy_pkuseg's pkuseg(), downloads a model on first
use and cannot run offline, so the reference's Chinese converter is given jieba behind pkuseg's `cut`
interface (strip, split on whitespace, segment each piece) -- the segmenter our MtlTokenizer uses.
dicta_onnx and russian_text_stresser are not installed, so the reference skips Hebrew diacritics and
Russian stress marks, as ours does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import jieba
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
DATA = ROOT / "chatterbox_cli" / "testing" / "data"  # the checkpoint writer copies these two
REF_TOKENIZER = Path("/tmp/ref/src/chatterbox/models/tokenizers/tokenizer.py")

SENTENCES = {
    "ar": "مرحبا، كيف حالك اليوم؟ الطقس جميل جداً.",
    "da": "Hvordan går det? Æblet er rødt, og søen er blå.",
    "de": "Grüße aus München! Die Straße ist schön, nicht wahr?",
    "el": "Καλημέρα, πώς είσαι; ΤΟ ΠΟΤΑΜΙ ΡΕΕΙ ΣΤΗΝ ΟΔΟΣ.",
    "en": "Hello there, how are you doing today?",
    "es": "¿Dónde está la estación? ¡Mañana llegaré temprano!",
    "fi": "Hyvää huomenta, miten menee? Äiti söi jäätelöä.",
    "fr": "Où est la bibliothèque ? C'était déjà l'été, ça va.",
    "he": "שלום, מה שלומך היום? מזג האוויר נאה.",
    "hi": "नमस्ते, आप कैसे हैं? आज मौसम बहुत अच्छा है।",
    "it": "Perché non andiamo al caffè? È già tardi, però.",
    "ja": "私は花が好きです。東京へ行きました、カタカナもガギグ。",
    "ko": "  안녕하세요, 만나서 반갑습니다. 오늘 날씨가 좋네요!  ",
    "ms": "Selamat pagi, apa khabar? Saya suka makan nasi lemak.",
    "nl": "Goedemorgen, hoe gaat het? Ik drink graag koffie.",
    "no": "Hvordan har du det? Jeg liker å gå på tur i skogen.",
    "pl": "Dzień dobry, jak się masz? Żółć gęślą jaźń.",
    "pt": "Olá, como você está? A situação não é fácil.",
    "ru": "Здравствуйте, как дела? Ёлка стоит в углу.",
    "sv": "Hur mår du? Jag älskar kött och blåbär.",
    "sw": "Habari za asubuhi? Ninapenda kusoma vitabu.",
    "tr": "Günaydın, nasılsın? Şu ağacın altında oturuyoruz.",
    "zh": "今天天气很好，我们去北京的公园散步吧。 你好 龘！",
}
LANGUAGES = list(SENTENCES)
SPECIALS = ["[STOP]", "[UNK]", "[SPACE]", "[START]"]
CJ_TOKENS = [f"[cj_{c}]" for c in "abcdefghijklmnopqrstuvwxyz.0123456789"]
MERGES = [("t", "h"), ("e", "r"), ("a", "n"), ("e", "n"), ("i", "n"), ("o", "n")]
UNCODED_GLYPH = "龘"  # category "Lo", deliberately given no Cangjie code


class PkusegLikeJieba:
    """jieba behind spacy_pkuseg.pkuseg's `cut`: whitespace only separates pieces, never a word."""

    def __init__(self) -> None:
        jieba.setLogLevel(logging.WARNING)
        self._jieba = jieba.Tokenizer()

    def cut(self, text: str) -> list[str]:
        return [word for piece in text.split() for word in self._jieba.lcut(piece)]


def load_reference(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("ref_mtl_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cangjie_entries() -> list[str]:
    """Synthetic 'glyph<TAB>code' entries for the Chinese sentence's glyphs, with decoys and quirks."""
    glyphs = [c for c in dict.fromkeys(SENTENCES["zh"]) if unicodedata.category(c) == "Lo"]
    glyphs.remove(UNCODED_GLYPH)
    letters = "abcdefghijklmnopqrstuvwxy"
    entries = []
    for i, glyph in enumerate(glyphs):
        code = letters[i % 25] + letters[(i * 7 + 3) % 25] + letters[(i * 11 + 5) % 25][: i % 3]
        if i % 4 == 1:  # a decoy glyph first under the same code: this glyph's index is 1
            entries.append(f"{chr(0x4E00 + i)}\t{code}")
        if i % 5 == 2:  # two decoys: index 2
            entries += [f"{chr(0x4E80 + i)}\t{code}", f"{chr(0x4F00 + i)}\t{code}"]
        entries.append(f"{glyph}\t{code}")
    first = glyphs[0]
    entries.append(f"{first}\tzz")  # listed again: its last code wins
    entries.append(f"{glyphs[3]}x\tqq\textra")  # a two-glyph word with a third field (never looked up)
    return entries


def build_vocab(graphemes: set[str]) -> Tokenizer:
    """BPE over single graphemes + a few merges, special and added tokens as in the official file."""
    alphabet = sorted(graphemes | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()"))
    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIALS[:3])}
    for token in [*alphabet, *(a + b for a, b in MERGES)]:
        vocab.setdefault(token, len(vocab))
    for token in [SPECIALS[3], *(f"[{code}]" for code in LANGUAGES), *CJ_TOKENS]:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab, MERGES, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([*SPECIALS, *(f"[{code}]" for code in LANGUAGES), *CJ_TOKENS])
    return tokenizer


class Recorder:
    """Stands in for the reference's Tokenizer to capture the string it would encode."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, text: str) -> object:
        self.seen.append(text)
        return type("Encoding", (), {"ids": []})()


def bpe_inputs(ref: ModuleType, vocab_path: Path) -> dict[str, str]:
    """What the reference MTLTokenizer hands its BPE for each sentence."""
    tok = make_reference(ref, vocab_path)
    recorder = Recorder()
    tok.tokenizer = recorder
    for code, text in SENTENCES.items():
        tok.encode(text, language_id=code)
    return dict(zip(SENTENCES, recorder.seen, strict=True))


def graphemes_of(prepared: str) -> set[str]:
    for token in [*SPECIALS, *(f"[{code}]" for code in LANGUAGES), *CJ_TOKENS]:
        prepared = prepared.replace(token, " ")
    return {c for c in prepared if not c.isspace()}


def make_reference(ref: ModuleType, vocab_path: Path) -> object:
    tok = ref.MTLTokenizer(str(vocab_path))
    tok.cangjie_converter.segmenter = PkusegLikeJieba()
    return tok


def main() -> None:
    ref = load_reference(Path(sys.argv[1]) if len(sys.argv) > 1 else REF_TOKENIZER)
    cangjie_path = DATA / "mtl_cangjie.json"
    vocab_path = DATA / "mtl_vocab.json"
    cangjie_path.write_text(json.dumps(cangjie_entries(), ensure_ascii=False, indent=0) + "\n")
    ref.hf_hub_download = lambda **_: str(cangjie_path)

    build_vocab(set()).save(str(vocab_path))  # provisional, to learn the graphemes needed
    prepared = bpe_inputs(ref, vocab_path)
    build_vocab(set().union(*map(graphemes_of, prepared.values()))).save(str(vocab_path))

    tok = make_reference(ref, vocab_path)
    cases = {
        code: {"text": text, "ids": tok.encode(text, language_id=code)} for code, text in SENTENCES.items()
    }
    unk = tok.tokenizer.token_to_id("[UNK]")
    assert not any(unk in case["ids"] for case in cases.values()), "the vocabulary misses a grapheme"
    out = {
        "reference": "chatterbox-tts 0.1.7 MTLTokenizer.encode (zh segmented by jieba, see the script)",
        "cases": cases,
    }
    (FIXTURES / "mtl_parity_ids.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {vocab_path.name}, {cangjie_path.name}, mtl_parity_ids.json ({len(cases)} languages)")
    for code, text in prepared.items():
        print(f"{code}: {text}")


if __name__ == "__main__":
    main()
