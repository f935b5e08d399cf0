"""`chatterbox synthesize` with the multilingual model (tiny random checkpoint): choosing the variant and the
language, the variant's defaults, batch manifests, and what the English model says of foreign text."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile as sf

from chatterbox_cli import pipeline
from chatterbox_cli.cli import run
from chatterbox_cli.errors import ExitCode
from chatterbox_cli.models.mtl_tokenizer import MtlTokenizer
from chatterbox_cli.models.t3 import T3Config
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

FAST = ("--device", "cpu", "--max-tokens", "20", "--flow-steps", "2", "--seed", "1", "--json")
Synth = Callable[..., tuple[int, dict[str, object]]]


@pytest.fixture(scope="module")
def mtl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("mtl"), "tiny", seed=5, variant="multilingual")


@pytest.fixture
def synth(capsys: pytest.CaptureFixture[str]) -> Synth:
    """Run `chatterbox synthesize ARGS --json` in-process; (exit code, the JSON it printed)."""

    def call(*args: str) -> tuple[int, dict[str, object]]:
        capsys.readouterr()
        code = run(["synthesize", *args, *FAST])
        return code, json.loads(capsys.readouterr().out)

    return call


def test_the_language_is_detected_and_the_variant_defaults_apply(
    synth: Synth, mtl: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fr.wav"
    code, summary = synth("Bonjour à tous. Comment allez-vous ?", "-o", str(out), "--model", str(mtl))
    assert code == 0, summary
    assert any(note.startswith("language fr:") for note in summary["notes"])  # type: ignore[union-attr]
    assert summary["files"][0]["language"] == "fr"  # type: ignore[index]
    assert summary["settings"]["repetition_penalty"] == 2.0  # type: ignore[index]  (multilingual's)
    assert sf.info(str(out)).frames > 0


def test_a_given_language_is_not_detected(synth: Synth, mtl: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "es.wav")
    code, summary = synth("Bonjour à tous.", "-o", out, "--model", str(mtl), "--language", "ES")
    assert code == 0, summary
    assert not any("language" in note for note in summary["notes"])  # type: ignore[union-attr]
    assert summary["files"][0]["language"] == "es"  # type: ignore[index]


def test_batch_items_each_get_their_language(synth: Synth, mtl: Path, tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("Guten Morgen, wie geht es dir?\nBuenos días, ¿cómo estás?\nΚαλημέρα σας.\n", "utf-8")
    out = tmp_path / "out"
    code, summary = synth("--input", str(lines), "--output-dir", str(out), "--model", str(mtl))
    assert code == 0, summary
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [entry["language"] for entry in manifest] == ["de", "es", "el"]


def test_a_language_other_than_english_asks_for_the_multilingual_model(
    synth: Synth, tiny_checkpoint: str, tmp_path: Path
) -> None:
    code, summary = synth(
        "Hola.", "-o", str(tmp_path / "x.wav"), "--model", tiny_checkpoint, "--language", "es"
    )
    assert code == ExitCode.MODEL_NOT_FOUND
    assert "of the multilingual model" in summary["error"]  # type: ignore[operator]


def test_the_english_model_says_once_that_the_text_looks_foreign(
    synth: Synth, tiny_checkpoint: str, tmp_path: Path
) -> None:
    text = "Bonjour à tous, comment allez-vous ? Nous sommes très contents de vous voir."
    code, summary = synth(text, "-o", str(tmp_path / "x.wav"), "--model", tiny_checkpoint)
    assert code == 0, summary
    warnings = summary["warnings"]
    assert len(warnings) == 1 and "looks French" in warnings[0] and "--language fr" in warnings[0]  # type: ignore[index,arg-type]
    assert summary["files"][0]["language"] == "en"  # type: ignore[index]


def test_text_tokens_take_t3s_start_and_stop_not_the_vocabularys(mtl: Path) -> None:
    """The reference pads the multilingual ids with T3's start/stop text tokens (255, 0); the grapheme
    vocabulary's own [START]/[STOP] ids are other numbers."""
    tokenizer = MtlTokenizer(mtl / "grapheme_mtl_merged_expanded_v1.json")
    config = T3Config()
    assert (tokenizer.start_id, tokenizer.stop_id) != (config.start_text_token, config.stop_text_token)
    tokens, dropped = pipeline.text_tokens(tokenizer.for_language("de"), "Guten 😀Tag", 0, config)
    assert tokens[0] == config.start_text_token and tokens[-1] == config.stop_text_token
    assert tokens[1:-1].tolist() == tokenizer.encode("Guten Tag.", "de") and dropped == ["😀"]


def test_estimate_reads_the_multilingual_t3_from_its_header(
    mtl: Path, tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The multilingual T3 differs from English only in its text vocabulary (2,454 rows instead of 704, in
    text_emb and text_head), and neither is on the GPU in synthesis (the table stays in host memory, the
    head is never loaded): `estimate` reads both headers to the same GPU weights."""

    def t3_bytes(*args: str) -> int:
        capsys.readouterr()
        assert run(["estimate", "--preset", "fp16", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["presets"]["fp16"]["components"]["t3"]["weights_bytes"]

    english, multilingual = t3_bytes("--model", tiny_checkpoint), t3_bytes("--model", str(mtl))
    assert multilingual == english > 0
    assert t3_bytes("--model", str(mtl), "--variant", "multilingual") == multilingual
