from __future__ import annotations

import codecs
import json
import random
import time
from pathlib import Path

import pytest

from chatterbox_cli.errors import UsageError
from chatterbox_cli.text import (
    chars_in_vocab,
    chunk_text,
    decode_text,
    estimate_tokens,
    normalize,
    read_text_file,
    split_items,
    split_sentences,
    strip_unspeakable,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity_text.json"
TOKENIZER_CANDIDATES = [
    ROOT / "chatterbox_cli" / "testing" / "data" / "tokenizer.json",
    Path("/work/shared/reference/tokenizer.json"),
]


@pytest.fixture(scope="module")
def real_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    for path in TOKENIZER_CANDIDATES:
        if path.exists():
            return tokenizers.Tokenizer.from_file(str(path))
    pytest.skip("the official tokenizer.json is not available")


@pytest.fixture(scope="module")
def count_real(real_tokenizer):
    # The reference encodes spaces as the [SPACE] token.
    def count(text: str) -> int:
        return len(real_tokenizer.encode(text.replace(" ", "[SPACE]")).ids)

    return count


def _split_words(text: str) -> list[str]:
    return text.split()


# ---- normalisation parity


def test_normalize_matches_reference_punc_norm_exactly():
    cases = json.loads(FIXTURE.read_text())["cases"]
    assert len(cases) >= 40
    mismatches = [(c["input"], c["expected"], normalize(c["input"])) for c in cases]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert mismatches == []


# ---- reading input


def test_read_text_file_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(codecs.BOM_UTF8 + "Caf\u00e9 one.\r\nTwo.\rThree.\r\n".encode())
    assert read_text_file(path) == "Caf\u00e9 one.\nTwo.\nThree.\n"


def test_read_text_file_accepts_utf16_with_bom(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("Hello there.\r\n".encode("utf-16"))
    assert read_text_file(path) == "Hello there.\n"


def test_binary_file_is_a_usage_error_naming_the_file(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(UsageError, match=r"picture\.png is not a text file.*UTF-8"):
        read_text_file(path)


def test_non_utf8_text_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me.".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin\.txt is not UTF-8 text \(byte 0xe9 at offset 3\).*iconv"):
        read_text_file(path)


def test_control_character_soup_is_not_text():
    with pytest.raises(UsageError, match="stdin is not a text file"):
        decode_text(bytes(range(1, 32)) * 10, "stdin")


def test_missing_and_folder_inputs(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="is a folder"):
        read_text_file(tmp_path)


# ---- sentences


@pytest.mark.parametrize(
    "text",
    [
        "Mr. Smith and Mrs. Jones met Dr. Brown at St. Mary's.",
        "Bring fruit, e.g. apples, i.e. the red ones, and bread.",
        "Pi is 3.14 and e is 2.718 roughly.",
        "The U.S. economy grew in 2020.",
        "J. R. R. Tolkien and John F. Kennedy were born in different years.",
        "I was... going to say something.",
        "Apples, pears, etc. are fruit.",
        "See No. 5 and Fig. 3 for details.",
        "We met at 5 p.m. yesterday.",
        "Version 2.0.1 shipped on time.",
    ],
)
def test_no_split_inside_a_sentence(text):
    assert split_sentences(text) == [text]


def test_sentence_ends_are_split():
    text = (
        'He moved to the U.S. The weather was nice. "Stop!" she said. Really? Yes! Wait... What? '
        "Apples, pears, etc. The end."
    )
    assert split_sentences(text) == [
        "He moved to the U.S.",
        "The weather was nice.",
        '"Stop!" she said.',
        "Really?",
        "Yes!",
        "Wait...",
        "What?",
        "Apples, pears, etc.",
        "The end.",
    ]


# ---- chunking


def test_empty_and_whitespace_only_text_is_a_usage_error():
    for text in ["", "   ", "\n\n\t \r\n"]:
        with pytest.raises(UsageError, match="no text to speak"):
            chunk_text(text)


def test_punctuation_only_text_is_a_usage_error():
    with pytest.raises(UsageError, match="no text to speak"):
        chunk_text("... !!! ???")


def test_short_sentences_are_packed_and_words_are_kept():
    text = "Yes. No. Maybe. This one is a somewhat longer sentence that stands on its own for sure."
    chunks = chunk_text(text, 60, pack_tokens=20)
    assert chunks[0] == "Yes. No. Maybe."
    assert " ".join(chunks).split() == text.split()


def test_paragraphs_are_never_packed_together():
    chunks = chunk_text("One.\n\nTwo.")
    assert chunks == ["One.", "Two."]


def test_sixty_word_sentence_without_punctuation_is_cut_at_clause_words(count_real):
    words = _split_words(
        "the quick brown fox jumps over the lazy dog and then it runs away into the forest where "
        "nobody can see it because it is very fast and clever while the dog keeps sleeping under "
        "the old tree next to the house that was built by the farmer who lived there many years ago "
        "with his wife and four children"
    )
    assert len(words) == 60
    text = " ".join(words)
    chunks = chunk_text(text, 60, count_tokens=count_real)
    assert len(chunks) >= 3
    assert all(count_real(normalize(c)) <= 60 for c in chunks)
    assert " ".join(chunks).split() == words
    # Each cut falls before a conjunction/relative word, and no piece is a stub.
    joiners = {"and", "but", "or", "so", "because", "while", "where", "which", "that", "who", "when", "with"}
    assert all(c.split()[0] in joiners for c in chunks[1:])
    assert all(len(c.split()) >= 5 for c in chunks)


def test_long_sentence_prefers_commas(count_real):
    text = ", ".join(["the rain kept falling over the quiet harbour town"] * 6) + "."
    chunks = chunk_text(text, 50, count_tokens=count_real)
    assert len(chunks) >= 2
    assert all(c.endswith((",", ".")) for c in chunks)
    assert all(count_real(normalize(c)) <= 50 for c in chunks)


def test_five_thousand_character_word_is_cut_hard_at_the_bound(count_real):
    word = ("supercalifragilistic" * 250)[:5000]
    for counter in (None, count_real):
        chunks = chunk_text(word, 100, count_tokens=counter)
        measure = counter or estimate_tokens
        assert "".join(chunks) == word
        sizes = [measure(normalize(c)) for c in chunks]
        assert max(sizes) <= 100
        assert min(sizes[:-1]) >= 99  # every piece but the last is filled up to the bound


def test_chunks_respect_real_token_bound_on_varied_text(count_real):
    text = _book(2000, seed=3)
    chunks = chunk_text(text, 80, count_tokens=count_real)
    assert all(count_real(normalize(c)) <= 80 for c in chunks)
    assert " ".join(chunks).split() == text.split()


def test_default_estimate_is_close_to_the_real_tokenizer(count_real):
    sentences = split_sentences(" ".join(_book(3000, seed=5).split()))
    ratios = [estimate_tokens(s) / count_real(s) for s in sentences if len(s) > 40]
    ratios.sort()
    median = ratios[len(ratios) // 2]
    assert 0.95 <= median <= 1.25
    assert ratios[int(0.05 * len(ratios))] >= 0.8


def test_ten_thousand_words_chunk_in_under_a_second():
    text = _book(10_000, seed=1)
    assert len(text.split()) >= 10_000
    start = time.perf_counter()
    chunks = chunk_text(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"chunking took {elapsed:.2f} s"
    assert len(chunks) > 100
    assert all(estimate_tokens(normalize(c)) <= 150 for c in chunks)
    assert " ".join(chunks).split() == text.split()


# ---- batch items


def test_split_items_lines_and_paragraphs():
    text = "First line.\n\n   \nSecond  line\nthird line\n\n\nFourth."
    assert split_items(text, "lines") == ["First line.", "Second line", "third line", "Fourth."]
    assert split_items(text, "paragraphs") == ["First line.", "Second line third line", "Fourth."]
    with pytest.raises(UsageError, match="no text to speak"):
        split_items("\n \n\t\n", "paragraphs")
    with pytest.raises(ValueError):
        split_items("x", "words")  # type: ignore[arg-type]


# ---- unspeakable characters


def test_emoji_and_non_latin_are_dropped_and_reported(real_tokenizer):
    allowed = chars_in_vocab(real_tokenizer.get_vocab())
    text = (
        "Hello \U0001f600 world\u2764\ufe0f, \u041f\u0440\u0438\u0432\u0435\u0442! Cafe\u0301 \u4e2d\u6587."
    )
    kept, dropped = strip_unspeakable(text, allowed)
    assert dropped == [
        "\U0001f600",
        "\u2764",
        "\u041f",
        "\u0440",
        "\u0438",
        "\u0432",
        "\u0435",
        "\u0442",
        "\u4e2d",
        "\u6587",
    ]
    assert normalize(kept) == "Hello world,! Caf\u00e9."
    assert real_tokenizer.token_to_id("[UNK]") not in real_tokenizer.encode(normalize(kept)).ids


def test_text_that_is_all_unspeakable_leaves_nothing_to_speak(real_tokenizer):
    allowed = chars_in_vocab(real_tokenizer.get_vocab())
    kept, dropped = strip_unspeakable("\U0001f600\U0001f680 \u4f60\u597d", allowed)
    assert dropped == ["\U0001f600", "\U0001f680", "\u4f60", "\u597d"]
    with pytest.raises(UsageError, match="no text to speak"):
        chunk_text(kept)


def test_strip_unspeakable_keeps_everything_allowed():
    text = "plain ascii text.\nsecond line"
    assert strip_unspeakable(text, lambda c: c.isascii()) == (text, [])


# ---- helpers

_WORDS = _split_words(
    "the a of and to in is was he she it that with for as his her on by at from they we you "
    "this old house river morning light window garden letter children silence story winter road "
    "village walked remembered whispered decided opened carried noticed believed understood "
    "returned"
)
_TEMPLATES = [
    "{s}.",
    "{s}, {s}.",
    "{s}; {s}!",
    "Mr. Smith said {s}.",
    "It cost 3.50 dollars, e.g. {s}.",
    '"{s}?" she asked.',
    "{s}... {s}.",
    "The U.S. team {s}.",
    "J. K. {s}.",
]


def _book(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    paragraphs, sentences, count = [], [], 0
    while count < n_words:
        template = rng.choice(_TEMPLATES)
        parts = []
        for _ in range(template.count("{s}")):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 30))]
            parts.append(" ".join(words))
        sentence = template.format(s="{s}").replace("{s}", "\0")
        for part in parts:
            sentence = sentence.replace("\0", part, 1)
        sentence = sentence[0].upper() + sentence[1:]
        sentences.append(sentence)
        count += len(sentence.split())
        if rng.random() < 0.15:
            paragraphs.append(" ".join(sentences))
            sentences = []
    paragraphs.append(" ".join(sentences))
    return "\n\n".join(p for p in paragraphs if p)
