"""Guess which of multilingual Chatterbox's 23 languages a text is written in, from the text alone.

`detect_language` looks at evidence in two steps, and says which evidence decided:

1. Script. Letters are counted per script; the script with the most letters wins, a Han, kana or Hangul
   character counting as three letters (each stands for about a syllable). Scripts used by exactly one
   of the 23 languages decide at once: Arabic -> ar, Hebrew -> he, Devanagari -> hi, Greek -> el,
   Cyrillic -> ru. In East Asian text Hiragana/Katakana mean ja (also with Han mixed in, as
   Japanese always is), Hangul means ko, and Han alone means zh.
2. Latin script. Each language scores one point per occurrence of one of its very common function
   words, one point per letter it shares with other candidates (ä, ö: de/sv/fi) and two per letter only
   it uses (ß: de). The highest score wins; ties go to the earlier language in `_LATIN_LANGUAGES`
   (English first). With no evidence at all the answer is English, and the reason says so.

Limits, by design (no dictionaries, no statistics beyond the tables here):
- Very short texts (one or two words) carry little evidence and often fall back to English.
- Norwegian and Danish share most function words; they are told apart by a few (meg/mig, hva/hvad,
  av/af, nå/nu, mye/meget, ble/blev). A text without any of those goes to Norwegian, listed first.
- Malay and Swahili are recognised by function words only (neither uses special letters), so a short
  Malay or Swahili sentence made of names and content words falls back to English.
- Mixed-script text is given to the script with the most letters: an English sentence quoting one
  Chinese word stays English, and a Chinese sentence naming an English brand stays Chinese.
- Cyrillic always means Russian (the only Cyrillic language of the 23), and Arabic script always means
  Arabic (Persian or Urdu text is reported as Arabic).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from chatterbox_cli.errors import UsageError


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    extra: str | None = None  # pip extra of chatterbox-cli this language needs (its tokenizer step)
    package: str | None = None  # the package that extra installs


# The languages of multilingual Chatterbox (reference SUPPORTED_LANGUAGES in mtl_tts.py), by code.
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("ar", "Arabic"),
        Language("da", "Danish"),
        Language("de", "German"),
        Language("el", "Greek"),
        Language("en", "English"),
        Language("es", "Spanish"),
        Language("fi", "Finnish"),
        Language("fr", "French"),
        Language("he", "Hebrew"),
        Language("hi", "Hindi"),
        Language("it", "Italian"),
        Language("ja", "Japanese", extra="ja", package="pykakasi"),
        Language("ko", "Korean"),
        Language("ms", "Malay"),
        Language("nl", "Dutch"),
        Language("no", "Norwegian"),
        Language("pl", "Polish"),
        Language("pt", "Portuguese"),
        Language("ru", "Russian"),
        Language("sv", "Swedish"),
        Language("sw", "Swahili"),
        Language("tr", "Turkish"),
        Language("zh", "Chinese", extra="zh", package="jieba"),
    )
}


def extra_installed(lang: Language) -> bool:
    """Whether the optional package `lang`'s tokenizer step needs is importable (True if it needs none)."""
    import importlib.util

    return lang.package is None or importlib.util.find_spec(lang.package) is not None


def find_language(code: str) -> Language:
    """The supported language of `code` (case-insensitive); UsageError naming the choices otherwise."""
    found = LANGUAGES.get(code.lower())
    if found is None:
        raise UsageError(f"unknown language {code!r}; choose one of {', '.join(LANGUAGES)}")
    return found


@dataclass(frozen=True)
class Detection:
    """A detected language: its code (one of `LANGUAGES`) and the evidence, as a short phrase."""

    code: str
    reason: str


# --------------------------------------------------------------------------------------------------
# Scripts

# (first, last code point, script). Ranges not listed (digits, punctuation, symbols) are no evidence.
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "latin"),
    (0x0061, 0x007A, "latin"),
    (0x00C0, 0x024F, "latin"),
    (0x1E00, 0x1EFF, "latin"),
    (0xFF21, 0xFF3A, "latin"),
    (0xFF41, 0xFF5A, "latin"),
    (0x0370, 0x03FF, "greek"),
    (0x1F00, 0x1FFF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0590, 0x05FF, "hebrew"),
    (0xFB1D, 0xFB4F, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x1100, 0x11FF, "hangul"),
    (0x3130, 0x318F, "hangul"),
    (0xAC00, 0xD7A3, "hangul"),
    (0x3040, 0x309F, "kana"),
    (0x30A0, 0x30FF, "kana"),
    (0x31F0, 0x31FF, "kana"),
    (0xFF66, 0xFF9D, "kana"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xF900, 0xFAFF, "han"),
    (0x20000, 0x2FFFF, "han"),
)

# Scripts that belong to exactly one of the 23 languages.
_SCRIPT_LANGUAGES: dict[str, tuple[str, str]] = {
    "arabic": ("ar", "Arabic script"),
    "hebrew": ("he", "Hebrew script"),
    "devanagari": ("hi", "Devanagari script"),
    "greek": ("el", "Greek script"),
    "cyrillic": ("ru", "Cyrillic script"),
}
_EAST_ASIAN = frozenset({"han", "kana", "hangul"})
# A Han, kana or Hangul character stands for about a syllable, i.e. a few Latin letters.
_EAST_ASIAN_WEIGHT = 3


def _script(char: str) -> str | None:
    code = ord(char)
    for first, last, script in _SCRIPT_RANGES:
        if first <= code <= last:
            return script
    return None


def _script_counts(text: str) -> Counter[str]:
    """Letters per script; punctuation, digits and symbols are not counted."""
    counts: Counter[str] = Counter()
    for char in text:
        script = _script(char)
        if script is not None and (char.isalpha() or script in _EAST_ASIAN):
            counts[script] += 1
    return counts


def _dominant_script(counts: Counter[str]) -> str | None:
    """'east_asian', another script name, or None for text without letters."""
    weighted: Counter[str] = Counter()
    for script, count in counts.items():
        if script in _EAST_ASIAN:
            weighted["east_asian"] += count * _EAST_ASIAN_WEIGHT
        else:
            weighted[script] += count
    if not weighted:
        return None
    return max(weighted, key=lambda script: weighted[script])


def _east_asian(counts: Counter[str]) -> Detection:
    """Japanese if there is kana (Japanese mixes Han with kana), Korean for Hangul, else Chinese."""
    kana, hangul, han = counts["kana"], counts["hangul"], counts["han"]
    if kana and kana >= hangul:
        mixed = " with Han characters" if han else ""
        return Detection("ja", f"Hiragana/Katakana letters{mixed}")
    if hangul:
        return Detection("ko", "Hangul letters")
    return Detection("zh", "Han characters without kana or Hangul")


# --------------------------------------------------------------------------------------------------
# Latin-script languages

# Very common function words (lower case). Words shared by several languages are listed for each; they
# raise all of them and leave the decision to the rest.
_COMMON_WORDS: dict[str, str] = {
    "en": "the a i and is are was were of to that it with for this you not have has be on at from they what",
    "de": "und der die das nicht ist ich ein eine zu mit den dem auch sich auf für es sie wir",
    "fr": "le la les et est des une un du que qui dans pour pas je nous vous il elle ce avec sur au",
    "es": "el la los las y es que de en un una por para con no se del al muy pero está",
    "it": "il lo la gli le e è di che non un una per con sono del della questo ma anche",
    "pt": "o os as e é que de do da em um uma não para com se por mas você está",
    "nl": "de het een en is van dat niet ik je met op zijn voor er maar ook wat",
    "sv": "och är att det en ett som på inte jag med för till har av den om vi mig vad",
    "no": "og er det en et som på ikke jeg med for til har den om vi meg deg seg hva av noe mye nå ble",
    "da": "og er det en et som på ikke jeg med for til har den om vi mig dig sig hvad af noget meget nu blev",
    "fi": "ja on ei se että minä sinä hän ole oli mutta kun niin tämä kanssa myös ovat olen",
    "pl": "w nie jest to się na z że do jak co ale tak jestem już tylko",
    "tr": "ve bir bu da çok ne için ile ben sen değil var mı ama gibi daha",
    "ms": "dan yang di ini itu saya tidak ada dengan untuk ke dari akan kami mereka adalah pada sudah",
    "sw": "na ya wa ni kwa za katika mimi wewe yeye sisi hii kuwa hapana ndiyo sana lakini kama",
}
_LATIN_LANGUAGES: tuple[str, ...] = tuple(_COMMON_WORDS)  # tie-break order: English first, no before da
_WORD_SETS: dict[str, frozenset[str]] = {
    code: frozenset(words.split()) for code, words in _COMMON_WORDS.items()
}

# Letters (lower case) and the languages that use them; a letter of one language counts double.
_MARKER_LETTERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ß", ("de",)),
    ("ñ¿¡", ("es",)),
    ("ãõ", ("pt",)),
    ("ç", ("pt", "fr", "tr")),
    ("å", ("sv", "no", "da")),
    ("æø", ("da", "no")),
    ("ğşı", ("tr",)),
    ("łąęśźżćń", ("pl",)),
    ("äö", ("de", "sv", "fi")),
    ("ü", ("de", "tr")),
    ("œêîûëïù", ("fr",)),
    ("àè", ("fr", "it", "pt")),
    ("ìò", ("it",)),
    ("áíú", ("es", "pt")),
)
_UNIQUE_LETTER_POINTS = 2
_WORD = re.compile(r"[^\W\d_]+")


@dataclass
class _Evidence:
    words: list[str]
    letters: list[str]

    @property
    def score(self) -> int:
        return len(self.words) + sum(self._letter_points(letter) for letter in self.letters)

    @staticmethod
    def _letter_points(letter: str) -> int:
        users = next(langs for chars, langs in _MARKER_LETTERS if letter in chars)
        return _UNIQUE_LETTER_POINTS if len(users) == 1 else 1


def _latin_evidence(text: str) -> dict[str, _Evidence]:
    lowered = text.lower()
    words = _WORD.findall(lowered)
    evidence = {code: _Evidence([], []) for code in _LATIN_LANGUAGES}
    for word in words:
        for code in _LATIN_LANGUAGES:
            if word in _WORD_SETS[code]:
                evidence[code].words.append(word)
    for chars, users in _MARKER_LETTERS:
        for char in lowered:
            if char in chars:
                for code in users:
                    evidence[code].letters.append(char)
    return evidence


def _listing(items: list[str], limit: int = 3) -> str:
    return ", ".join(list(dict.fromkeys(items))[:limit])


def _latin(text: str) -> Detection:
    evidence = _latin_evidence(text)
    best = max(_LATIN_LANGUAGES, key=lambda code: evidence[code].score)  # first wins a tie
    found = evidence[best]
    if found.score == 0:
        return Detection("en", "no evidence for another language; English by default")
    parts = []
    if found.words:
        parts.append(f"common words ({_listing(found.words)})")
    if found.letters:
        parts.append(f"letters ({_listing(found.letters)})")
    return Detection(best, f"{LANGUAGES[best].name} " + " and ".join(parts))


# --------------------------------------------------------------------------------------------------


def detect_language(text: str) -> Detection:
    """The most likely of `LANGUAGES` for `text`, by script and then by common words and letters.

    See the module docstring for the rules and their limits; text without letters is English.
    """
    text = unicodedata.normalize("NFC", text)
    counts = _script_counts(text)
    script = _dominant_script(counts)
    if script is None:
        return Detection("en", "no letters; English by default")
    if script == "east_asian":
        return _east_asian(counts)
    if script in _SCRIPT_LANGUAGES:
        return Detection(*_SCRIPT_LANGUAGES[script])
    return _latin(text)
