from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.models.gpt2_tokenizer import (
    TEST_TOKENIZER_DIR,
    TOKENIZER_FILES,
    Gpt2Tokenizer,
    open_gpt2_tokenizer,
)
from chatterbox_cli.text import TURBO_TAGS, chunk_turbo_text, normalize, normalize_turbo

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "parity_gpt2_tokenizer.json").read_text())
CASES = FIXTURE["cases"]
IDS = [repr(c["text"][:28]) for c in CASES]


@pytest.fixture(scope="module")
def tok() -> Gpt2Tokenizer:
    return open_gpt2_tokenizer(TEST_TOKENIZER_DIR)


def test_fixture_was_made_on_the_test_files() -> None:
    assert (ROOT / FIXTURE["folder"]).resolve() == TEST_TOKENIZER_DIR


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_normalization_matches_reference(case: dict) -> None:
    assert normalize_turbo(case["text"]) == case["normalized"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ids_match_reference(tok: Gpt2Tokenizer, case: dict) -> None:
    assert tok.encode(normalize_turbo(case["text"])) == case["ids"]
    assert tok.encode(case["text"]) == case["raw_ids"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_matches_reference(tok: Gpt2Tokenizer, case: dict) -> None:
    assert tok.decode(case["raw_ids"]) == case["raw_decoded"]


def test_sizes_and_special_ids_match_reference(tok: Gpt2Tokenizer) -> None:
    assert tok.vocab_size == FIXTURE["len"] == 8276
    assert tok.eos_id == FIXTURE["eos_id"] == FIXTURE["pad_id"]
    assert tok.tags == FIXTURE["tags"]


def test_tags_are_single_tokens_in_official_order(tok: Gpt2Tokenizer) -> None:
    assert list(tok.tags) == list(TURBO_TAGS)
    ids = [tok.tags[tag] for tag in TURBO_TAGS]
    assert ids == list(range(tok.eos_id + 1, tok.vocab_size))
    for tag, tag_id in tok.tags.items():
        assert tok.encode(tag) == [tag_id]
        sentence = tok.encode(normalize_turbo(f"well {tag} then"))
        assert sentence.count(tag_id) == 1
        assert tok.decode(sentence) == f"Well {tag} then."


def test_encode_has_no_start_or_stop(tok: Gpt2Tokenizer) -> None:
    ids = tok.encode("Hello world")
    assert ids == [39, 695, 78, 995]  # real GPT-2 ids: "H" "ell" "o" " world" with 8,000 merges
    assert tok.text_to_tokens("Hello world").tolist() == ids


def test_every_character_is_spoken(tok: Gpt2Tokenizer) -> None:
    text = "Hi 😀 漢字\tnew\nline \x7f é"
    report = tok.encode_report(text)
    assert report.ids == tok.encode(text)
    assert report.unknown_chars == [] and report.dropped_chars == []
    assert all(tok.speaks(c) for c in text)
    assert tok.decode(report.ids) == text


def test_english_only(tok: Gpt2Tokenizer) -> None:
    assert tok.for_language(None) is tok and tok.for_language("en") is tok
    with pytest.raises(UsageError, match="English only"):
        tok.for_language("fr")


def test_opens_from_folder_or_vocab_file() -> None:
    a = open_gpt2_tokenizer(TEST_TOKENIZER_DIR)
    b = open_gpt2_tokenizer(TEST_TOKENIZER_DIR / "vocab.json")
    assert a.encode("[sigh] Fine.") == b.encode("[sigh] Fine.")


def test_test_files_are_the_official_layout_and_small() -> None:
    sizes = [(TEST_TOKENIZER_DIR / name).stat().st_size for name in TOKENIZER_FILES]
    assert sum(sizes) < 300_000
    config = json.loads((TEST_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and not config["add_bos_token"]


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(TEST_TOKENIZER_DIR, folder)
    return folder


def test_reads_added_tokens_json_alone(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "tokenizer_config.json").unlink()
    tok = open_gpt2_tokenizer(folder)
    assert tok.tags == FIXTURE["tags"]
    assert tok.encode("Oh [laugh] no") == open_gpt2_tokenizer(TEST_TOKENIZER_DIR).encode("Oh [laugh] no")


def test_missing_files_are_checkpoint_errors(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="merges.txt"):
        open_gpt2_tokenizer(folder)
    folder = _copy(tmp_path / "b")
    (folder / "tokenizer_config.json").unlink()
    (folder / "added_tokens.json").unlink()
    with pytest.raises(CheckpointError, match="added_tokens.json"):
        open_gpt2_tokenizer(folder)


def test_gapped_or_conflicting_ids_are_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    decoder["9000"] = decoder.pop(str(FIXTURE["tags"]["[laugh]"]))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").unlink()
    with pytest.raises(CheckpointError, match="without a gap"):
        open_gpt2_tokenizer(folder)
    folder = _copy(tmp_path / "b")
    added = json.loads((folder / "added_tokens.json").read_text())
    added["[giggle]"] = added.pop("[laugh]")
    (folder / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(CheckpointError, match="giggle"):
        open_gpt2_tokenizer(folder)


# --------------------------------------------------------------------------------------------------
# Normalisation and chunking with tags


@pytest.mark.parametrize("tag", TURBO_TAGS)
def test_normalization_keeps_tags(tag: str) -> None:
    assert normalize_turbo(tag) == f"{tag}."
    assert normalize_turbo(f"{tag} oh no") == f"{tag} oh no."
    assert normalize_turbo(f"oh no {tag}") == f"Oh no {tag}."
    assert normalize_turbo(f"so\u2026{tag}: \u201cyes\u201d") == f'So, {tag}, "yes".'


def test_turbo_normalization_keeps_what_english_rewrites() -> None:
    text = "Wait... one - two; three"
    assert normalize_turbo(text) == "Wait... one - two; three."
    assert normalize(text) == "Wait,  one, two,  three."


def _tags_in(text: str) -> list[str]:
    return re.findall("|".join(map(re.escape, TURBO_TAGS)), text)


def test_chunks_never_split_a_tag(tok: Gpt2Tokenizer) -> None:
    rng = random.Random(3)
    words = ["alpha", "beta,", "gamma.", "delta!", "and", "so;", "then:", "x" * 40, *TURBO_TAGS * 2]
    for _ in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        if not re.search("[a-z]", re.sub(r"\[[^\]]*\]", "", text)):
            text += " word"
        chunks = chunk_turbo_text(text, 12, count_tokens=lambda s: len(tok.encode(s)), pack_tokens=8)
        assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
        assert [t for c in chunks for t in _tags_in(c)] == _tags_in(text)
        assert all(len(tok.encode(normalize_turbo(chunk))) <= 12 for chunk in chunks)


def test_hard_cuts_keep_tags_whole(tok: Gpt2Tokenizer) -> None:
    text = "a" * 30 + "[clear throat]" + "b" * 30 + "[laugh]" + "c" * 30
    chunks = chunk_turbo_text(text, 8, count_tokens=lambda s: len(tok.encode(s)))
    assert "".join(chunks) == text
    assert [t for c in chunks for t in _tags_in(c)] == ["[clear throat]", "[laugh]"]


def test_tag_between_sentences_goes_with_the_next(tok: Gpt2Tokenizer) -> None:
    count = lambda s: len(tok.encode(s))  # noqa: E731
    assert chunk_turbo_text("Hi there. [laugh] Yes.", 8, count_tokens=count, pack_tokens=4) == [
        "Hi there.",
        "[laugh] Yes.",
    ]
    assert chunk_turbo_text("Hi there. [laugh] Yes.") == ["Hi there. [laugh] Yes."]


def test_tag_whitespace_is_collapsed_and_tags_alone_are_text() -> None:
    assert chunk_turbo_text("Well [clear\n  throat]\tthen") == ["Well [clear throat] then"]
    assert chunk_turbo_text("[sigh] [laugh]") == ["[sigh] [laugh]"]
    with pytest.raises(UsageError):
        chunk_turbo_text(" \n ")
    with pytest.raises(UsageError):
        chunk_turbo_text("... !")
