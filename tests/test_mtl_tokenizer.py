from __future__ import annotations

import json
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from chatterbox_cli.errors import CheckpointError, ExitCode, UsageError
from chatterbox_cli.languages import LANGUAGES
from chatterbox_cli.models.mtl_tokenizer import (
    CANGJIE_FILE,
    VOCAB_FILE,
    MtlTokenizer,
    cangjie_spell,
    hangul_to_jamo,
    kanji_to_hiragana,
    load_cangjie,
    segment_words,
)
from chatterbox_cli.testing.checkpoint_writer import MTL_CANGJIE_JSON, MTL_TOKENIZER_JSON

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = json.loads((FIXTURES / "mtl_parity_ids.json").read_text(encoding="utf-8"))["cases"]


def checkpoint_dir(folder: Path) -> Path:
    """A folder holding the synthetic vocabulary and Cangjie table under their official names."""
    shutil.copy(MTL_TOKENIZER_JSON, folder / VOCAB_FILE)
    shutil.copy(MTL_CANGJIE_JSON, folder / CANGJIE_FILE)
    return folder


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> MtlTokenizer:
    return MtlTokenizer(checkpoint_dir(tmp_path_factory.mktemp("mtl")) / VOCAB_FILE)


def needs_extra(code: str) -> None:
    package = LANGUAGES[code].package
    if package is not None:
        pytest.importorskip(package, reason=f"pip install 'chatterbox-cli[{LANGUAGES[code].extra}]'")


def test_the_23_languages_and_their_extras() -> None:
    assert sorted(LANGUAGES) == sorted(
        "ar da de el en es fi fr he hi it ja ko ms nl no pl pt ru sv sw tr zh".split()  # noqa: SIM905
    )
    assert LANGUAGES["ja"].name == "Japanese" and LANGUAGES["zh"].name == "Chinese"
    assert {c: (lang.extra, lang.package) for c, lang in LANGUAGES.items() if lang.extra} == {
        "ja": ("ja", "pykakasi"),
        "zh": ("zh", "jieba"),
    }


def test_pyproject_extras_install_the_packages_named() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for lang in LANGUAGES.values():
        if lang.extra:
            assert any(req.startswith(lang.package) for req in extras[lang.extra]), lang.code


def test_fixture_covers_every_language() -> None:
    assert sorted(PARITY) == sorted(LANGUAGES)


@pytest.mark.parametrize("code", sorted(PARITY))
def test_ids_match_reference(tok: MtlTokenizer, code: str) -> None:
    needs_extra(code)
    case = PARITY[code]
    assert tok.encode(case["text"], code) == case["ids"]


# --------------------------------------------------------------------------------------------------
# Per-language steps


def test_hangul_syllables_become_the_jamo_nfkd_gives() -> None:
    for point in range(0xAC00, 0xD7A4):
        syllable = chr(point)
        assert hangul_to_jamo(syllable) == unicodedata.normalize("NFKD", syllable), hex(point)
    assert hangul_to_jamo("  한국 ") == "\u1112\u1161\u11ab\u1100\u116e\u11a8"


def test_korean_is_stripped_before_the_language_token(tok: MtlTokenizer) -> None:
    assert tok.prepare("  한 국  ", "ko") == "[ko]\u1112\u1161\u11ab[SPACE]\u1100\u116e\u11a8"


def test_kanji_phrases_become_hiragana_with_the_reference_space_rule() -> None:
    phrases = [
        {"orig": "花", "hira": "はな"},
        {"orig": "が", "hira": "が"},
        {"orig": "東京", "hira": "とうきょう"},
        {"orig": "カタカナ", "hira": "かたかな"},
        {"orig": "部屋", "hira": "へや"},
    ]
    out = kanji_to_hiragana("ignored", lambda _: phrases)
    assert out == unicodedata.normalize("NFKD", " はながとうきょうカタカナ へや")


def test_japanese_uses_pykakasi_readings(tok: MtlTokenizer) -> None:
    needs_extra("ja")
    assert tok.prepare("東京へ", "ja") == "[ja]とうきょうへ"
    assert tok.prepare("花", "ja") == "[ja][SPACE]はな"  # a reading starting with は gets a space
    assert tok.prepare("カタカナ", "ja") == "[ja]カタカナ"


def test_cangjie_codes_get_their_index_among_glyphs_sharing_the_code(tmp_path: Path) -> None:
    path = tmp_path / CANGJIE_FILE
    entries = ["日\tabc", "曰\tabc", "甲\tabc\textra field", "口\tr", "日\tzz"]
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    table = load_cangjie(path)
    assert table == {"日": "zz", "曰": "abc1", "甲": "abc2", "口": "r"}
    spelled = cangjie_spell("曰口a，漢", table)
    assert spelled == "[cj_a][cj_b][cj_c][cj_1][cj_.][cj_r][cj_.]a，漢"


def test_whitespace_only_separates_pieces_before_segmenting() -> None:
    def halves(piece: str) -> list[str]:
        return [piece[:1], piece[1:]] if len(piece) > 1 else [piece]

    assert segment_words("  我们 去\t北京 \n", halves) == "我 们 去 北 京"


def test_chinese_words_are_space_joined_and_spelled(tok: MtlTokenizer) -> None:
    needs_extra("zh")
    table = tok._cangjie_table()
    words = ["我们", "去", "北京"]  # jieba's segmentation of 我们去北京
    expected = "[zh]" + "[SPACE]".join(cangjie_spell(w, table) for w in words)
    assert tok.prepare("我们去北京", "zh") == expected
    assert expected.count("[cj_.]") == 5


# --------------------------------------------------------------------------------------------------
# Encoding


def test_language_token_comes_first_and_spaces_are_spelled(tok: MtlTokenizer) -> None:
    assert tok.prepare("Hello World", "en") == "[en]hello[SPACE]world"
    ids = tok.encode("Hello World", "en")
    vocab = tok.tokenizer.get_vocab()
    assert ids[0] == vocab["[en]"]
    assert ids.count(vocab["[SPACE]"]) == 1
    assert tok.encode("Hello World", "EN") == ids


def test_text_is_lowercased_and_nfkd_normalized(tok: MtlTokenizer) -> None:
    assert tok.prepare("ÉTÉ", "fr") == "[fr]e\u0301te\u0301"


def test_text_to_tokens_adds_start_and_stop(tok: MtlTokenizer) -> None:
    tokens = tok.text_to_tokens("Hej då", "sv")
    assert tokens.dtype == torch.long and tokens.shape == (len(tok.encode("Hej då", "sv")) + 2,)
    assert tokens[0].item() == tok.start_id and tokens[-1].item() == tok.stop_id
    assert tokens[1:-1].tolist() == tok.encode("Hej då", "sv")


def test_bound_to_a_language_it_encodes_as_that_language(tok: MtlTokenizer) -> None:
    swedish = tok.for_language("SV")
    assert swedish.language == "sv"
    assert swedish.encode("Hej då") == tok.encode("Hej då", "sv") != tok.encode("Hej då", "da")
    assert swedish.encode_report("Hej 😀").unknown_chars == ["😀"]
    assert swedish.speaks("å") and not swedish.speaks("😀")
    with pytest.raises(UsageError, match="--language"):
        tok.for_language(None)


def test_report_names_unknown_and_dropped_input_characters(tok: MtlTokenizer) -> None:
    text = "Hi 😀 there\tyou 漢😀\n"
    report = tok.encode_report(text, "en")
    assert report.unknown_chars == ["😀", "漢"]
    assert report.dropped_chars == ["\t", "\n"]
    assert report.ids == tok.encode(text, "en")
    assert report.ids.count(tok.unk_id) == 3


def test_report_attributes_unknown_combining_marks_to_the_input_character(tok: MtlTokenizer) -> None:
    report = tok.encode_report("ça ǎ", "fr")  # ǎ is a + U+030C, a mark no test sentence has
    assert report.unknown_chars == ["ǎ"] and tok.unk_id in report.ids


def test_report_on_chinese_checks_cangjie_spelling(tok: MtlTokenizer) -> None:
    needs_extra("zh")
    report = tok.encode_report("今天好，漢", "zh")  # 漢 has neither a Cangjie code nor a vocabulary entry
    assert report.unknown_chars == ["漢"] and report.dropped_chars == []


def test_clean_text_reports_nothing(tok: MtlTokenizer) -> None:
    for code in ("de", "ko", "ru", "el"):
        report = tok.encode_report(PARITY[code]["text"], code)
        assert report.unknown_chars == [] and report.dropped_chars == [], code


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_language_is_a_usage_error(tok: MtlTokenizer) -> None:
    with pytest.raises(UsageError, match=r"unknown language 'xx'; choose one of ar, da, .*zh") as e:
        tok.encode("hello", "xx")
    assert e.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("code", "package", "message"),
    [
        ("ja", "pykakasi", "Japanese needs pykakasi: pip install 'chatterbox-cli[ja]'"),
        ("zh", "jieba", "Chinese needs jieba: pip install 'chatterbox-cli[zh]'"),
    ],
)
def test_missing_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, package: str, message: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    fresh = MtlTokenizer(checkpoint_dir(tmp_path) / VOCAB_FILE)
    with pytest.raises(UsageError) as e:
        fresh.encode("東京", code)
    assert str(e.value) == message
    assert fresh.encode("hello", "en")  # other languages still work


def test_bad_vocabulary_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / VOCAB_FILE
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read tokenizer .*download {VOCAB_FILE}"):
        MtlTokenizer(bad)


def vocabulary_without(token: str, folder: Path) -> Path:
    """The synthetic vocabulary with `token` removed, written into `folder`."""
    data = json.loads(MTL_TOKENIZER_JSON.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != token]
    del data["model"]["vocab"][token]
    path = folder / VOCAB_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_vocabulary_without_special_tokens_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"lacks the special tokens \['\[SPACE\]'\]"):
        MtlTokenizer(vocabulary_without("[SPACE]", tmp_path))


def test_language_missing_from_the_vocabulary_is_a_checkpoint_error(tmp_path: Path) -> None:
    fresh = MtlTokenizer(vocabulary_without("[sw]", tmp_path))
    with pytest.raises(CheckpointError, match=r"no \[sw\] token.*Swahili"):
        fresh.encode("habari", "sw")
    assert fresh.encode("hallo", "nl")


def test_missing_cangjie_table_is_a_checkpoint_error_only_for_chinese(tmp_path: Path) -> None:
    needs_extra("zh")
    shutil.copy(MTL_TOKENIZER_JSON, tmp_path / VOCAB_FILE)
    fresh = MtlTokenizer(tmp_path / VOCAB_FILE)
    assert fresh.encode(PARITY["de"]["text"], "de") == PARITY["de"]["ids"]
    with pytest.raises(CheckpointError, match=f"{CANGJIE_FILE} is missing; Chinese needs it"):
        fresh.encode("今天", "zh")


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', '["no tab here"]', "[3]"])
def test_bad_cangjie_table_is_a_checkpoint_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / CANGJIE_FILE
    path.write_text(content)
    with pytest.raises(CheckpointError, match="cannot read the Cangjie table"):
        load_cangjie(path)
