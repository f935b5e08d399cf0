from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.models.tokenizer import EnTokenizer
from chatterbox_cli.testing.checkpoint_writer import TOKENIZER_JSON

FIXTURE = Path(__file__).parent / "fixtures" / "parity_tokenizer.json"
CASES = json.loads(FIXTURE.read_text())["cases"]


@pytest.fixture(scope="module")
def tok() -> EnTokenizer:
    return EnTokenizer(TOKENIZER_JSON)


def test_bundled_vocabulary_is_the_official_one() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tokenizer.json"
    if not shared.exists():
        pytest.skip("../shared/reference is not present outside the dev machine")
    assert TOKENIZER_JSON.read_bytes() == shared.read_bytes()


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:24] or "<empty>" for c in CASES])
def test_ids_match_reference(tok: EnTokenizer, case: dict) -> None:
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:24] or "<empty>" for c in CASES])
def test_decode_matches_reference(tok: EnTokenizer, case: dict) -> None:
    assert tok.decode(case["ids"]) == case["decoded"]


def test_text_to_tokens_adds_start_and_stop(tok: EnTokenizer) -> None:
    tokens = tok.text_to_tokens("Hello there.")
    assert tokens.dtype == torch.long and tokens.ndim == 1
    assert tokens[0].item() == 255 and tokens[-1].item() == 0
    assert tokens[1:-1].tolist() == tok.encode("Hello there.")
    assert tok.decode(tokens) == "Hello there."


def test_report_names_unknown_and_dropped_characters(tok: EnTokenizer) -> None:
    report = tok.encode_report("Hi 😀 there\tyou 漢😀\n")
    assert report.unknown_chars == ["😀", "漢"]
    assert report.dropped_chars == ["\t", "\n"]
    assert report.ids == tok.encode("Hi 😀 there\tyou 漢😀\n")
    assert report.ids.count(tok.unk_id) == 3


def test_clean_text_reports_nothing(tok: EnTokenizer) -> None:
    report = tok.encode_report("Café, naïve — “quoted” 42!")
    assert report.unknown_chars == [] and report.dropped_chars == []


def test_bad_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        EnTokenizer(bad)
