"""Text in: reading input files, the reference's punctuation clean-up, and cutting text into chunks.

The pipeline calls, in order: `read_text_file` (or `decode_text` for stdin bytes), `strip_unspeakable`
with the tokenizer's character set, then `chunk_text` (or `split_items` first for batch conversion),
then `normalize` on each chunk right before tokenising it. `chunk_text` keeps the user's wording (only
whitespace is collapsed) so manifests show what was asked for; its token bound is checked on the
normalized form of every chunk, which is what T3 actually sees.

`normalize`, `estimate_tokens`, `split_sentences` and `chunk_text` take an optional `language` (one of
the multilingual model's codes). None and "en" mean the English behaviour, unchanged; any other code
adds the sentence ends of other scripts (CJK 。！？, Arabic ؟ ۔, Devanagari । ॥, and ; in Greek), a
per-character token estimate for non-Latin scripts, and the multilingual reference's clean-up.

Chatterbox Turbo has its own clean-up, `normalize_turbo`, and chunker, `chunk_turbo_text`: English
sentence rules that never cut inside a paralinguistic tag such as "[laugh]" or "[clear throat]".
"""

from __future__ import annotations

import codecs
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Literal

from chatterbox_cli.errors import UsageError
from chatterbox_cli.languages import LANGUAGES

TokenCounter = Callable[[str], int]

# Chunks are meant to be about one sentence: ~150 text tokens is ~230 characters of English, ~15 s of
# speech, well below the 1,000 speech tokens (40 s) T3 may generate per chunk.
DEFAULT_MAX_TOKENS = 150
# Sentences shorter than this are joined with their neighbours ("Yes. No." alone makes poor prompts).
DEFAULT_PACK_TOKENS = 60

# --------------------------------------------------------------------------------------------------
# Normalisation (must equal the reference's punc_norm byte for byte; see tests/test_text.py)

_NO_TEXT_SENTENCE = "You need to add some text for me to talk."

# Applied in this order; later rules see the output of earlier ones.
_PUNCTUATION_REWRITES: tuple[tuple[str, str], ...] = (
    ("...", ", "),
    ("\u2026", ", "),
    (":", ","),
    (" - ", ", "),
    (";", ", "),
    ("\u2014", "-"),
    ("\u2013", "-"),
    (" ,", ","),
    ("\u201c", '"'),
    ("\u201d", '"'),
    ("\u2018", "'"),
    ("\u2019", "'"),
)
_ACCEPTED_ENDINGS = (".", "!", "?", "-", ",")


# The multilingual reference (mtl_tts.py punc_norm) also accepts these CJK marks as endings.
_CJK_ACCEPTED_ENDINGS = ("\u3001", "\uff0c", "\u3002", "\uff1f", "\uff01")  # 、，。？！
# Our addition: a sentence already closed by its own script's mark gets no Latin period after it.
_SCRIPT_ACCEPTED_ENDINGS = ("\u061f", "\u06d4", "\u0964", "\u0965")  # ؟ ۔ । ॥
# Greek writes its question mark as ";" (U+037E, which NFC turns into ";"): keep it, do not make it ", ".
_GREEK_QUESTION_MARKS = (";", "\u037e")


def language_code(language: str | None) -> str | None:
    """The lower-case code of `language`, or None for English (None or "en"); ValueError if unknown.

    English is one code path everywhere in this module, the one of the English-only model.
    """
    if language is None:
        return None
    code = language.lower()
    if code not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected one of {', '.join(LANGUAGES)}")
    return None if code == "en" else code


def normalize(text: str, language: str | None = None) -> str:
    """The reference's punctuation clean-up, applied to one chunk right before tokenisation.

    Note the reference's quirks, kept for parity: an empty string becomes a fixed English sentence,
    and only a lower-case *first character* is capitalised (before leading spaces are removed).

    With a `language` other than English this is the multilingual reference's version, which also
    accepts 、，。？！ as endings, with two deliberate differences: a chunk ending in ؟ ۔ । or ॥ gets no
    "." appended, and in Greek ";" (the question mark) is kept instead of becoming ", ".
    """
    code = language_code(language)
    if code is None:
        return _punc_norm(text, _PUNCTUATION_REWRITES, _ACCEPTED_ENDINGS)
    rewrites = _PUNCTUATION_REWRITES
    endings = _ACCEPTED_ENDINGS + _CJK_ACCEPTED_ENDINGS + _SCRIPT_ACCEPTED_ENDINGS
    if code == "el":
        rewrites = tuple(rule for rule in rewrites if rule[0] != ";")
        endings += _GREEK_QUESTION_MARKS
    return _punc_norm(text, rewrites, endings)


def _punc_norm(text: str, rewrites: tuple[tuple[str, str], ...], endings: tuple[str, ...]) -> str:
    if not text:
        return _NO_TEXT_SENTENCE
    if text[0].islower():
        text = text[0].upper() + text[1:]
    text = " ".join(text.split())
    for old, new in rewrites:
        text = text.replace(old, new)
    text = text.rstrip(" ")
    if not text.endswith(endings):
        text = text + "."
    return text


# Chatterbox Turbo's (tts_turbo.py punc_norm): English's without the "...", " - " and ";" rules.
_TURBO_PUNCTUATION_REWRITES = tuple(
    rule for rule in _PUNCTUATION_REWRITES if rule[0] not in ("...", " - ", ";")
)
# The tags of ResembleAI/chatterbox-turbo's added_tokens.json, in id order; each is one token.
TURBO_TAGS: tuple[str, ...] = (
    "[angry]",
    "[fear]",
    "[surprised]",
    "[whispering]",
    "[advertisement]",
    "[dramatic]",
    "[narration]",
    "[crying]",
    "[happy]",
    "[sarcastic]",
    "[clear throat]",
    "[sigh]",
    "[shush]",
    "[cough]",
    "[groan]",
    "[sniff]",
    "[gasp]",
    "[chuckle]",
    "[laugh]",
)


def normalize_turbo(text: str) -> str:
    """Chatterbox Turbo's punctuation clean-up (the reference's tts_turbo.punc_norm), for one chunk.

    Like `normalize` but it keeps "...", " - " and ";". Tags stay intact: none holds a character
    that is rewritten, a leading "[" is not capitalised, and one at the end gets the "." any other
    last word would ("[laugh]" -> "[laugh].", as in the reference).
    """
    return _punc_norm(text, _TURBO_PUNCTUATION_REWRITES, _ACCEPTED_ENDINGS)


# --------------------------------------------------------------------------------------------------
# Reading input

# C0 controls other than tab/newline/vertical tab/form feed/carriage return, and DEL.
_CONTROL_CHARS = re.compile(r"[\x01-\x08\x0e-\x1f\x7f]")


def decode_text(data: bytes, source: str) -> str:
    """Bytes of a text file (or stdin) to str. UTF-8 with or without BOM, UTF-16 with BOM; any line ends.

    Raises UsageError naming `source` when the bytes are not text.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{source} starts like UTF-16 text but cannot be decoded ({exc.reason}); "
                "save it as UTF-8 text"
            ) from exc
    else:
        if b"\x00" in data:
            raise UsageError(f"{source} is not a text file (it contains binary data); give a UTF-8 text file")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                f"convert it, e.g. `iconv -f latin1 -t utf-8 {source} > converted.txt`"
            ) from exc
    controls = len(_CONTROL_CHARS.findall(text))
    if controls and controls > len(text) // 100:
        raise UsageError(
            f"{source} is not a text file ({controls} control characters); give a UTF-8 text file"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file for speaking (see `decode_text`); every failure is a UsageError."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as exc:
        raise UsageError(f"{name} does not exist; check the path given to --input") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{name} is a folder; give a text file to --input") from exc
    except OSError as exc:
        raise UsageError(
            f"{name} cannot be read ({exc.strerror or exc}); check its permissions and path"
        ) from exc
    return decode_text(data, name)


def split_items(text: str, mode: Literal["lines", "paragraphs"]) -> list[str]:
    """Items for batch conversion: one per non-blank line, or one per blank-line-separated paragraph.

    Whitespace inside an item is collapsed to single spaces.
    """
    if mode == "lines":
        blocks: Iterable[str] = text.splitlines()
    elif mode == "paragraphs":
        blocks = re.split(r"\n[ \t\f\v]*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    else:
        raise ValueError(f"unknown split mode {mode!r}; expected 'lines' or 'paragraphs'")
    items = [" ".join(block.split()) for block in blocks]
    items = [item for item in items if item]
    if not items:
        raise UsageError(f"no text to speak: the input has no non-blank {mode}; give some text")
    return items


def chars_in_vocab(vocab: Iterable[str]) -> Callable[[str], bool]:
    """An `allowed` predicate for `strip_unspeakable`: characters that are single tokens of `vocab`."""
    singles = frozenset(token for token in vocab if len(token) == 1)
    return singles.__contains__


def strip_unspeakable(text: str, allowed: Callable[[str], bool]) -> tuple[str, list[str]]:
    """Remove characters the tokenizer cannot encode; return the kept text and what was dropped.

    The text is NFC-composed first (a decomposed "é" becomes the single character the vocabulary has).
    Whitespace is kept. A run of dropped visible characters becomes one space ("a 😀 b" -> "a b", and
    "a😀b" stays two words), or nothing before punctuation and at line edges; invisible ones (joiners,
    variation selectors, combining marks) vanish and are not reported.
    Dropped characters are listed once each, in order of first appearance.
    """
    text = unicodedata.normalize("NFC", text)
    replacement: dict[str, str] = {}
    dropped: list[str] = []
    for char in dict.fromkeys(text):
        if char != "\x00" and (char.isspace() or allowed(char)):
            continue
        if char == "\x00" or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            replacement[char] = ""
        else:
            replacement[char] = "\x00"
            dropped.append(char)
    if not replacement:
        return text, []
    kept = "".join(replacement.get(char, char) for char in text)
    # Each run of dropped characters (with the blanks around it) becomes one space, or nothing next to
    # punctuation and line edges.
    kept = _DROPPED_RUN.sub("\x00", kept)
    kept = _DROPPED_AT_EDGE.sub("", kept)
    return kept.replace("\x00", " "), dropped


_DROPPED_RUN = re.compile(r"[ \t]*\x00[\x00 \t]*")
_DROPPED_AT_EDGE = re.compile(r"\x00(?=[.,!?;:)\]\"'\n]|$)|(?:^|(?<=\n))\x00")


# --------------------------------------------------------------------------------------------------
# Token estimate

_NOT_LOWER_ASCII = re.compile(r"[^a-z]+")
# Measured on English prose with the official 704-token BPE: lower-case letters average ~1.8 per token,
# everything else (spaces, capitals, digits, punctuation) is nearly always one token each. This
# over-counts real token counts by ~5 % (median; 1st percentile 0.91x, 99th 1.2x per sentence).
_LOWER_CHARS_PER_TOKEN = 1.8


def estimate_tokens(text: str, language: str | None = None) -> int:
    """Cheap, tokenizer-free estimate of the number of text tokens in `text`.

    English (None or "en") uses the measured English rate above. Other languages are estimated per
    code point of what the multilingual tokenizer sees after lower-casing and NFKD (accents become
    separate marks), plus one for the language tag it puts first: its vocabulary hardly merges letters
    (measured ~0.93 tokens per Latin letter on the sentences of tests/test_languages.py, ~0.97 per
    code point in Arabic, Hebrew, Devanagari, Cyrillic, Greek and Hangul), so each counts one. A Han
    character counts 5 in Chinese (its Cangjie code of up to five letters, an end mark, word spaces)
    and 3 elsewhere (Japanese reads it as two or three kana); a Hangul syllable counts one per jamo (2
    or 3), as the tokenizer decomposes it. This errs on the high side, so chunks stay under the bound.
    """
    code = language_code(language)
    if code is None:
        lower = len(_NOT_LOWER_ASCII.sub("", text))
        return (len(text) - lower) + math.ceil(lower / _LOWER_CHARS_PER_TOKEN)
    han_tokens = _HAN_TOKENS.get(code, _HAN_TOKENS_DEFAULT)
    tokens = _LANGUAGE_TAG_TOKENS
    for char in text.lower():
        if _is_han(char):
            tokens += han_tokens
        elif _HANGUL_FIRST <= ord(char) <= _HANGUL_LAST:
            tokens += 2 if (ord(char) - _HANGUL_FIRST) % 28 == 0 else 3
        else:
            tokens += len(unicodedata.normalize("NFKD", char))
    return tokens


_LANGUAGE_TAG_TOKENS = 1  # "[fr]" etc., which the multilingual tokenizer puts before the text
_HAN_TOKENS = {"zh": 5}
_HAN_TOKENS_DEFAULT = 3
_HANGUL_FIRST, _HANGUL_LAST = 0xAC00, 0xD7A3
_HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF))


def _is_han(char: str) -> bool:
    code = ord(char)
    return any(first <= code <= last for first, last in _HAN_RANGES)


# --------------------------------------------------------------------------------------------------
# Sentence splitting


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Always an abbreviation when followed by a period (titles and Latin shorthand).
_NEVER_FINAL = _word_set(
    "mr mrs ms mx dr prof sr jr st gen col capt cpt lt sgt cmdr adm rev hon gov sen rep pres supt insp "
    "mt messrs mme mlle e.g i.e cf viz vs approx ca al"
)
# Abbreviations that take a number after them ("No. 5", "p. 12", "Fig. 3").
_BEFORE_NUMBER = _word_set("no nos p pp fig figs vol vols ch sec art op ed eq eqs")
# May end a sentence; we split after them only if the next word usually starts one.
_AMBIGUOUS = _word_set(
    "etc inc ltd co corp bros dept est jan feb mar apr jun jul aug sep sept oct nov dec "
    "mon tue wed thu fri sat sun"
)
_SENTENCE_STARTERS = _word_set(
    "the a an i he she it we they you this that these those there then but so yet however "
    "my our his her their its in on at after before when if what why how who"
)
_DOTTED_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")
_SENTENCE_END = re.compile(r"(?:[.!?\u2026]+)[\"'\u201d\u2019)\]]*(?= )")
_LEADING_PUNCT = "\"'(\u201c\u2018["


def _next_word(text: str, start: int) -> str:
    end = text.find(" ", start)
    return text[start : end if end >= 0 else len(text)].lstrip(_LEADING_PUNCT)


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    """Decide whether the punctuation run in `match` (followed by a space) closes a sentence."""
    follower = _next_word(text, match.end() + 1)
    if not follower or follower[0].islower():
        return False
    marks = match.group().rstrip("\"'\u201d\u2019)]")
    if marks != ".":
        return True  # ! ? ellipsis, or runs like "?!" followed by a non-lower-case word
    word_start = text.rfind(" ", 0, match.start()) + 1
    word = text[word_start : match.start()].lstrip(_LEADING_PUNCT)
    lowered = word.lower()
    if lowered in _NEVER_FINAL:
        return False
    if lowered in _BEFORE_NUMBER and follower[0].isdigit():
        return False
    starts_sentence = follower.rstrip(",;:").lower() in _SENTENCE_STARTERS
    if lowered in _AMBIGUOUS:
        return starts_sentence
    if len(word) == 1 and word.isupper():
        return False  # an initial: "J. Smith"
    if _DOTTED_ACRONYM.fullmatch(word):
        return starts_sentence  # "U.S." / "a.m." end a sentence only before a typical first word
    return True


# Other languages: marks that always end a sentence, with or without a space after them (CJK text has
# none): 。！？｡ (CJK), ؟ ۔ (Arabic question mark and Urdu full stop), । ॥ (Devanagari danda), followed by
# any closing quotes or brackets.
_SCRIPT_SENTENCE_MARKS = "\u3002\uff01\uff1f\uff61\u061f\u06d4\u0964\u0965"
_CLOSERS = "\"'\u201d\u2019)\\]\u300d\u300f\uff09\u3011\u3015\u3009\u300b"  # ” ’ 」 』 ） 】 〕 〉 》
_SCRIPT_SENTENCE_END = re.compile(f"[{_SCRIPT_SENTENCE_MARKS}]+[{_CLOSERS}]*")
# Greek: ";" and U+037E are question marks, treated like "?".
_GREEK_SENTENCE_END = re.compile(r"(?:[.!?;\u037e\u2026]+)[\"'\u201d\u2019)\]]*(?= )")


def _sentence_ends(paragraph: str, code: str | None) -> list[int]:
    """Offsets just past the end of each sentence (its marks and closing quotes)."""
    latin = _GREEK_SENTENCE_END if code == "el" else _SENTENCE_END
    ends = [match.end() for match in latin.finditer(paragraph) if _ends_sentence(paragraph, match)]
    if code is not None:
        ends.extend(match.end() for match in _SCRIPT_SENTENCE_END.finditer(paragraph))
        ends.sort()
    return ends


def split_sentences(paragraph: str, language: str | None = None) -> list[str]:
    """Sentences of one paragraph whose whitespace is already collapsed to single spaces.

    `language` None (or "en") splits English; other languages also split after the marks of
    `_SCRIPT_SENTENCE_END` (no space needed) and, in Greek, after ";".
    """
    sentences: list[str] = []
    start = 0
    for end in _sentence_ends(paragraph, language_code(language)):
        if end <= start:
            continue
        sentences.append(paragraph[start:end])
        start = end + 1 if paragraph.startswith(" ", end) else end
    if start < len(paragraph):
        sentences.append(paragraph[start:])
    return [s for s in sentences if s]


# --------------------------------------------------------------------------------------------------
# Cutting over-long sentences

_STRONG_BREAK = re.compile(r"[;:](?= )| (?:-|--|\u2013|\u2014)(?= )|[\u2014\u2013](?=\S)")
_COMMA_BREAK = re.compile(r"[,)](?= )")
_CONJUNCTION_BREAK = re.compile(
    r" (?=(?:and|but|or|nor|so|yet|because|although|though|while|whereas|which|who|whom|whose|where|"
    r"when|if|unless|until|since|after|before|then|that|as|with|without)\b)",
    re.IGNORECASE,
)
_SPACE = re.compile(r" ")
# Other languages: full-width ；： and the Arabic semicolon ؛ are strong breaks, ，、 and the Arabic comma ،
# comma breaks, none of them needing a space after (English conjunctions are not used).
_SCRIPT_STRONG_BREAK = re.compile(f"{_STRONG_BREAK.pattern}|[\uff1b\uff1a\u061b]")
_SCRIPT_COMMA_BREAK = re.compile(f"{_COMMA_BREAK.pattern}|[\uff0c\u3001\u060c]")
_ENGLISH_BREAKS = (_STRONG_BREAK, _COMMA_BREAK, _CONJUNCTION_BREAK, _SPACE)
_SCRIPT_BREAKS = (_SCRIPT_STRONG_BREAK, _SCRIPT_COMMA_BREAK, _SPACE)


def _cut_positions(pattern: re.Pattern[str], text: str) -> list[int]:
    """Offsets at which `text` may be cut: the end of each match (the cut keeps punctuation left)."""
    return [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]


def _hard_cut(text: str, max_tokens: int, count: TokenCounter) -> list[str]:
    """Cut text with no usable break into the longest pieces that fit, by binary search on length."""
    pieces: list[str] = []
    while text:
        if count(text) <= max_tokens:
            pieces.append(text)
            break
        lo, hi = 1, len(text) - 1  # lo always fits (guaranteed by the max_tokens floor in chunk_text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(text[:lo])
        text = text[lo:].lstrip(" ")
    return pieces


def _split_long(
    sentence: str, max_tokens: int, count: TokenCounter, breaks: tuple[re.Pattern[str], ...] = _ENGLISH_BREAKS
) -> list[str]:
    """Cut a sentence that is over the bound, preferring clause breaks (`breaks`, best first) near its
    middle."""
    if count(sentence) <= max_tokens:
        return [sentence]
    length = len(sentence)
    middle = length / 2
    low, high = 0.2 * length, 0.8 * length
    cut = None
    for pattern in breaks:
        central = [p for p in _cut_positions(pattern, sentence) if low <= p <= high]
        if central:
            cut = min(central, key=lambda p: abs(p - middle))
            break
    if cut is None:
        spaces = _cut_positions(_SPACE, sentence)
        if not spaces:
            return _hard_cut(sentence, max_tokens, count)
        cut = min(spaces, key=lambda p: abs(p - middle))
    left, right = sentence[:cut].strip(), sentence[cut:].strip()
    if not left or not right:
        return _hard_cut(sentence, max_tokens, count)
    return _split_long(left, max_tokens, count, breaks) + _split_long(right, max_tokens, count, breaks)


# --------------------------------------------------------------------------------------------------
# Chunking


def _has_word(text: str) -> bool:
    return any(char.isalnum() for char in text)


def chunk_text(
    text: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    count_tokens: TokenCounter | None = None,
    pack_tokens: int = DEFAULT_PACK_TOKENS,
    language: str | None = None,
) -> list[str]:
    """Cut text into sentence-sized chunks for T3.

    Every chunk `c` satisfies `count_tokens(normalize(c, language)) <= max_tokens`; `count_tokens`
    defaults to `estimate_tokens` for `language` (pass the real tokenizer's counter for an exact bound).
    Sentences end at . ! ? and ellipses, not after abbreviations, initials, decimals or an ellipsis
    continued in lower case.
    Consecutive sentences of one paragraph are joined while the join stays within `pack_tokens`.
    Longer-than-bound sentences are cut at ; : dashes, then commas, then before conjunctions, then
    between words; a word longer than the bound is cut hard. Raises UsageError when there is nothing
    to speak.

    `language` None or "en" is exactly the above. Other languages also end sentences at the script
    marks of `split_sentences` (CJK 。！？ without spaces, Arabic ؟ ۔, Devanagari । ॥, Greek ;), cut long
    sentences at ；：؛ and ，、، as well (not before English conjunctions), and join neighbours with the
    space that separated them in the text, or none (Chinese and Japanese have none).
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    code = language_code(language)

    def base(piece: str) -> int:
        return count_tokens(piece) if count_tokens is not None else estimate_tokens(piece, code)

    def count(piece: str) -> int:
        return base(normalize(piece, code))

    return _chunk(text, max_tokens, count, pack_tokens, code)


def chunk_turbo_text(
    text: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    count_tokens: TokenCounter | None = None,
    pack_tokens: int = DEFAULT_PACK_TOKENS,
    tags: Iterable[str] = TURBO_TAGS,
) -> list[str]:
    """`chunk_text` for Chatterbox Turbo: English rules, the bound checked on `normalize_turbo` of each
    chunk, and no cut inside any of `tags` (pass the tokenizer's; whitespace inside a tag may be any run,
    which the chunk spells with one space). A tag is no word: one alone joins a neighbouring sentence
    when the join fits, so "Hi. [laugh] Yes." keeps "[laugh]" with "Yes.". A text of tags only is
    spoken (the reference gives T3 "[laugh]." too).
    """
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    masked, reveal = _mask_tags(text, tags)

    def count(piece: str) -> int:
        normalized = normalize_turbo(reveal(piece))
        return count_tokens(normalized) if count_tokens is not None else estimate_tokens(normalized)

    return _chunk(masked, max_tokens, count, pack_tokens, None, reveal)


def _mask_tags(text: str, tags: Iterable[str]) -> tuple[str, Callable[[str], str]]:
    """`text` with each tag written as one private-use character that no cut can split (no space, not
    punctuation, not a letter), and the function that writes them back."""
    spellings = sorted({tag for tag in tags if tag.strip()}, key=len, reverse=True)
    if not spellings:
        return text, lambda piece: piece
    free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in text)
    mark = {tag: next(free) for tag in spellings}
    tag_of = {char: tag for tag, char in mark.items()}
    pattern = re.compile("|".join(r"\s+".join(map(re.escape, tag.split(" "))) for tag in spellings))
    masked = pattern.sub(lambda m: mark[" ".join(m.group().split())], text)
    marks = re.compile("[" + "".join(tag_of) + "]")
    return masked, lambda piece: marks.sub(lambda m: tag_of[m.group()], piece)


def _chunk(
    text: str,
    max_tokens: int,
    count: TokenCounter,
    pack_tokens: int,
    code: str | None,
    reveal: Callable[[str], str] | None = None,
) -> list[str]:
    """chunk_text's work on `text`, `count` giving the tokens of a piece; `reveal` maps each chunk
    to its final text before the emptiness checks."""
    breaks = _ENGLISH_BREAKS if code is None else _SCRIPT_BREAKS
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t\f\v]*\n", text)]
    chunks: list[str] = []
    for paragraph in paragraphs:
        if not paragraph:
            continue
        pieces: list[str] = []
        for sentence in split_sentences(paragraph, code):
            pieces.extend(_split_long(sentence, max_tokens, count, breaks))
        separators = None if code is None else _separators(paragraph, pieces)
        chunks.extend(_pack(pieces, max_tokens, min(pack_tokens, max_tokens), count, separators))
    if reveal is not None:
        chunks = [reveal(chunk) for chunk in chunks]
    if not chunks:
        raise UsageError("no text to speak: the text is empty or only whitespace; give some words")
    if not any(_has_word(chunk) for chunk in chunks):
        raise UsageError("no text to speak: the text has no letters or digits; give some words")
    return chunks


def _separators(paragraph: str, pieces: list[str]) -> list[str]:
    """For each piece (consecutive substrings of `paragraph`), the space before it there, or ""."""
    separators: list[str] = []
    position = 0
    for piece in pieces:
        at = paragraph.find(piece, position)
        if at < 0:  # not expected: pieces are cut from the paragraph in order
            separators.append(" ")
            continue
        separators.append(" " if at > 0 and paragraph[at - 1] == " " else "")
        position = at + len(piece)
    return separators


def _pack(
    pieces: list[str],
    max_tokens: int,
    pack_tokens: int,
    count: TokenCounter,
    separators: list[str] | None = None,
) -> list[str]:
    """Join short neighbours; pieces without any letter or digit always join a neighbour if they fit.

    `separators[i]` joins piece i to the one before it; a space for all when None (English).
    """
    seps = separators if separators is not None else [" "] * len(pieces)
    packed: list[str] = []
    packed_seps: list[str] = []
    for piece, sep in zip(pieces, seps, strict=True):
        if packed:
            joined = packed[-1] + sep + piece
            limit = max_tokens if not (_has_word(piece) and _has_word(packed[-1])) else pack_tokens
            if count(joined) <= limit:
                packed[-1] = joined
                continue
        packed.append(piece)
        packed_seps.append(sep)
    # A leading punctuation-only piece ("... Well then.") joins the piece after it.
    if len(packed) > 1 and not _has_word(packed[0]):
        joined = packed[0] + packed_seps[1] + packed[1]
        if count(joined) <= max_tokens:
            packed[:2] = [joined]
    return packed
