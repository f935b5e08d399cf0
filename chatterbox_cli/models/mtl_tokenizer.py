"""The multilingual text tokenizer: `grapheme_mtl_merged_expanded_v1.json` (a `tokenizers` BPE over
graphemes) plus, for Chinese, the Cangjie table `Cangjie5_TC.json` from the same folder.

`MtlTokenizer.encode(text, language)` gives the ids of chatterbox-tts 0.1.7's MTLTokenizer.encode:
lowercase, NFKD, a per-language step, the "[xx]" language token in front, " " spelled "[SPACE]".
The per-language steps:
  ja  kanji phrases become their hiragana reading (pykakasi); a reading that starts with は or へ gets a
      " " in front (the reference's rule, kept for parity); the result is NFKD-normalized again.
  zh  the text is cut into words joined by " ", then every character of Unicode category "Lo" that the
      Cangjie table knows becomes "[cj_X]" per code character followed by "[cj_.]". A glyph's code gets
      its index among the glyphs sharing that code appended when the index is above 0.
  ko  Hangul syllables become conjoining jamo (NFKD has already done this for assigned syllables), then
      surrounding whitespace is stripped.

Known differences from the reference:
  - Hebrew diacritics (dicta_onnx) and Russian stress marks (russian_text_stresser) are not added. The
    reference skips them too when those packages are missing, so it then gives the same ids as ours.
  - Chinese word segmentation uses jieba (pure Python, bundled dictionary) instead of the reference's
    spacy_pkuseg `pkuseg()`. Measured here (2026-12, spacy-pkuseg 1.0.2): `pkuseg()` downloads its
    default model "spacy_ontonotes" from GitHub on first use and fails offline (URLError), so the
    reference segmenter could not be run to compare segmentations; no agreement rate was measured.
    Like pkuseg.cut, we strip the text, split it on whitespace and segment each piece, so whitespace
    handling matches; word boundaries inside a piece may differ, which changes where "[SPACE]" tokens
    fall (the Cangjie ids of the characters themselves do not depend on the segmenter). With the same
    segmenter, the ids equal the reference's (tests/fixtures/mtl_parity_ids.json).
  - The language code is lowercased before use, and codes outside the 23 supported ones are refused.
    The reference prefixes "[{code.lower()}]" but runs the language step only for exact lowercase codes.
  - A bad or missing Cangjie table is an error; the reference logs a warning and leaves Chinese
    characters (or the entries after the first bad one) unconverted.
  - `text_to_tokens` wraps the ids in [START] ... [STOP] like our EnTokenizer; the reference's does not
    (its caller pads them on).

`for_language(code)` binds it to one language (models.tokenizer.TextTokenizer), as the pipeline uses it.
"""

from __future__ import annotations

import importlib
import json
import logging
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.languages import LANGUAGES, Language, find_language
from chatterbox_cli.models.tokenizer import SPACE, START, STOP, UNK, EncodedText
from chatterbox_cli.text import chunk_text, normalize
from chatterbox_cli.variants import MULTILINGUAL

VOCAB_FILE = MULTILINGUAL.file("tokenizer")
CANGJIE_FILE = MULTILINGUAL.extra_files[0]
CANGJIE_END = "[cj_.]"


def _import_extra(lang: Language) -> Any:
    """The optional package `lang` needs, imported now; UsageError naming the pip extra if it is absent."""
    assert lang.package is not None and lang.extra is not None
    try:
        return importlib.import_module(lang.package)
    except ImportError as e:
        raise UsageError(
            f"{lang.name} needs {lang.package}: pip install 'chatterbox-cli[{lang.extra}]'"
        ) from e


# --------------------------------------------------------------------------------------------------
# Per-language steps


def _is_kanji(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def kanji_to_hiragana(text: str, convert: Callable[[str], list[dict[str, str]]]) -> str:
    """Kanji phrases of `text` replaced by their hiragana reading; `convert` is pykakasi's."""
    out = []
    for phrase in convert(text):
        orig, reading = phrase["orig"], phrase["hira"]
        if any(_is_kanji(c) for c in orig):
            out.append(" " + reading if reading[:1] in ("は", "へ") else reading)
        else:
            out.append(orig)  # kana and everything else stay as written
    return unicodedata.normalize("NFKD", "".join(out))


def _syllable_to_jamo(char: str) -> str:
    # The reference's range runs past the last syllable (U+D7A3) to U+D7AF; kept for parity.
    if not "\uac00" <= char <= "\ud7af":
        return char
    index = ord(char) - 0xAC00
    lead, rest = divmod(index, 21 * 28)
    vowel, tail = divmod(rest, 28)
    return chr(0x1100 + lead) + chr(0x1161 + vowel) + (chr(0x11A7 + tail) if tail else "")


def hangul_to_jamo(text: str) -> str:
    """Hangul syllables as conjoining jamo, surrounding whitespace stripped."""
    return "".join(_syllable_to_jamo(c) for c in text).strip()


def load_cangjie(path: Path) -> dict[str, str]:
    """Glyph -> Cangjie code from a JSON list of "glyph\\tcode[\\t...]" strings. A glyph that is not the
    first glyph listed under its code gets its index among them appended ("abc" then "abc1", "abc2")."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError("not a JSON list")
        pairs = [_cangjie_entry(entry) for entry in entries]
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{path} is missing; Chinese needs it. Download {CANGJIE_FILE} of ResembleAI/chatterbox "
            f"into {path.parent}"
        ) from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the Cangjie table {path} ({e}); download it again") from e
    code_of: dict[str, str] = {}
    glyphs_of: dict[str, list[str]] = {}
    for glyph, code in pairs:
        code_of[glyph] = code  # a glyph listed twice keeps its last code
        glyphs_of.setdefault(code, []).append(glyph)
    table = {}
    for glyph, code in code_of.items():
        index = glyphs_of[code].index(glyph)
        table[glyph] = f"{code}{index}" if index else code
    return table


def _cangjie_entry(entry: object) -> tuple[str, str]:
    fields = entry.split("\t") if isinstance(entry, str) else []
    if len(fields) < 2:
        raise ValueError(f"entry {entry!r} is not 'glyph<TAB>code'")
    return fields[0], fields[1]


def cangjie_spell(text: str, table: dict[str, str]) -> str:
    """Each "Lo" character with a Cangjie code spelled as [cj_X]... [cj_.]; other characters kept."""
    out = []
    for char in text:
        code = table.get(char) if unicodedata.category(char) == "Lo" else None
        out.append(char if code is None else "".join(f"[cj_{c}]" for c in code) + CANGJIE_END)
    return "".join(out)


def segment_words(text: str, cut: Callable[[str], list[str]]) -> str:
    """Words of `text` joined by single spaces. Like pkuseg.cut, whitespace only separates pieces: each
    whitespace-free piece is segmented on its own."""
    return " ".join(word for piece in text.split() for word in cut(piece))


# --------------------------------------------------------------------------------------------------
# The tokenizer


class MtlTokenizer:
    def __init__(self, path: str | Path, cangjie_path: str | Path | None = None) -> None:
        path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise CheckpointError(
                f"cannot read tokenizer {path} ({e}); download {VOCAB_FILE} of the multilingual "
                "checkpoint again"
            ) from e
        self.vocab = self.tokenizer.get_vocab()
        missing = [t for t in (START, STOP, UNK, SPACE) if t not in self.vocab]
        if missing:
            raise CheckpointError(f"tokenizer {path} lacks the special tokens {missing}; is it Chatterbox's?")
        self.start_id = self.vocab[START]
        self.stop_id = self.vocab[STOP]
        self.unk_id = self.vocab[UNK]
        self.cangjie_path = Path(cangjie_path) if cangjie_path is not None else path.parent / CANGJIE_FILE
        self._cangjie: dict[str, str] | None = None  # loaded on first Chinese text
        self._kakasi: Any = None
        self._jieba: Any = None
        self._char_status: dict[tuple[str, str], str] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    # Lazily loaded per-language resources

    def _hiragana(self, text: str) -> str:
        if self._kakasi is None:
            self._kakasi = _import_extra(LANGUAGES["ja"]).kakasi()
        return kanji_to_hiragana(text, self._kakasi.convert)

    def _words(self, text: str) -> str:
        if self._jieba is None:
            jieba = _import_extra(LANGUAGES["zh"])
            jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading to stderr at DEBUG
            self._jieba = jieba.Tokenizer()
        return segment_words(text, self._jieba.lcut)

    def _cangjie_table(self) -> dict[str, str]:
        if self._cangjie is None:
            self._cangjie = load_cangjie(self.cangjie_path)
        return self._cangjie

    # Encoding

    def _language_token(self, lang: Language) -> str:
        token = f"[{lang.code}]"
        if token not in self.vocab:
            raise CheckpointError(
                f"tokenizer has no {token} token: this checkpoint does not speak {lang.name}"
            )
        return token

    def _language_step(self, text: str, lang: Language) -> str:
        if lang.code == "ja":
            return self._hiragana(text)
        if lang.code == "zh":
            return cangjie_spell(self._words(text), self._cangjie_table())
        if lang.code == "ko":
            return hangul_to_jamo(text)
        return text

    def prepare(self, text: str, language: str) -> str:
        """The string the BPE encodes: normalized, language step applied, "[xx]" prefixed, spaces spelled."""
        lang = find_language(language)
        prefix = self._language_token(lang)
        text = unicodedata.normalize("NFKD", text.lower())
        return (prefix + self._language_step(text, lang)).replace(" ", SPACE)

    def encode(self, text: str, language: str) -> list[int]:
        """Token ids of `text` (no start/stop), like the reference MTLTokenizer.encode."""
        return self.tokenizer.encode(self.prepare(text, language)).ids

    def text_to_tokens(self, text: str, language: str) -> torch.Tensor:
        """LongTensor [T] = start, encode(text, language), stop — what T3 decoding takes."""
        return torch.tensor([self.start_id, *self.encode(text, language), self.stop_id], dtype=torch.long)

    def for_language(self, language: str | None) -> LanguageTokenizer:
        if language is None:
            raise UsageError("the multilingual model needs a language; pass --language (e.g. --language fr)")
        return LanguageTokenizer(self, find_language(language).code)

    def speaks(self, char: str, language: str) -> bool:
        return self._status(char, find_language(language)) == "ok"

    def _status(self, char: str, lang: Language) -> str:
        """'ok', 'unknown' or 'dropped' for one input character, put through the steps on its own."""
        key = (char, lang.code)
        status = self._char_status.get(key)
        if status is None:
            text = self._language_step(unicodedata.normalize("NFKD", char.lower()), lang)
            ids = self.tokenizer.encode(text).ids
            status = "dropped" if not ids else ("unknown" if self.unk_id in ids else "ok")
            self._char_status[key] = status
        return status

    def encode_report(self, text: str, language: str) -> EncodedText:
        """Ids plus the input characters that (partly) became [UNK] or produced no token. Each distinct
        character is checked on its own: exact, since the BPE maps a grapheme to [UNK] regardless of its
        neighbours, except that a Japanese kanji is checked with its reading as a lone character."""
        ids = self.encode(text, language)
        lang = find_language(language)
        unknown: list[str] = []
        dropped: list[str] = []
        for char in dict.fromkeys(text):
            if char == " ":
                continue
            status = self._status(char, lang)
            if status == "unknown":
                unknown.append(char)
            elif status == "dropped":
                dropped.append(char)
        return EncodedText(ids, unknown, dropped)


class LanguageTokenizer:
    """The multilingual tokenizer bound to one language (models.tokenizer.TextTokenizer)."""

    def __init__(self, tokenizer: MtlTokenizer, language: str) -> None:
        self.tokenizer, self.language = tokenizer, language

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, self.language)

    def encode_report(self, text: str) -> EncodedText:
        return self.tokenizer.encode_report(text, self.language)

    def speaks(self, char: str) -> bool:
        return self.tokenizer.speaks(char, self.language)

    def normalize(self, chunk: str) -> str:
        return normalize(chunk, self.language)

    def chunk(self, text: str, max_tokens: int) -> list[str]:
        return chunk_text(
            text, max_tokens, count_tokens=lambda piece: len(self.encode(piece)), language=self.language
        )
