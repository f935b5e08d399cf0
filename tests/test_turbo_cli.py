"""Chatterbox Turbo through `chatterbox synthesize` and `estimate` (tiny random checkpoint in the official
layout): choosing it, its generation defaults and the controls it ignores, tags kept whole, the trailing
silence, the voice rules (clips over 5 s, loudness normalised) and its hub repo."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from chatterbox_cli import pipeline, service
from chatterbox_cli.audio import normalize_loudness
from chatterbox_cli.cli import run
from chatterbox_cli.errors import ExitCode
from chatterbox_cli.models.conds import S3GEN_SILENCE_TOKEN
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from chatterbox_cli.variants import TURBO

FAST = ("--device", "cpu", "--max-tokens", "20", "--seed", "1", "--json")
Cli = Callable[..., tuple[int, dict[str, object]]]


@pytest.fixture(scope="module")
def turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("turbo"), "tiny", seed=3, variant="turbo")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `chatterbox ARGS` in-process; (exit code, the JSON it printed)."""

    def call(*args: str) -> tuple[int, dict[str, object]]:
        capsys.readouterr()
        code = run(list(args))
        return code, json.loads(capsys.readouterr().out)

    return call


def test_turbo_speaks_with_its_own_defaults_and_says_what_it_ignores(
    cli: Cli, turbo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.wav"
    text = "Well [laugh] that went well. [sigh] Let us try again."
    code, summary = cli(
        "synthesize", text, "-o", str(out), "--model", str(turbo), "--cfg-weight", "0.7", *FAST
    )
    assert code == 0, summary
    settings = summary["settings"]
    assert settings["cfg_weight"] == settings["min_p"] == settings["exaggeration"] == 0.0  # type: ignore[index]
    assert (settings["top_p"], settings["top_k"], settings["flow_steps"]) == (0.95, 1000, 2)  # type: ignore[index]
    assert summary["warnings"] == ["the turbo model has no input for --cfg-weight: ignored"]
    assert sf.info(str(out)).frames > 0


def test_tags_are_single_tokens_and_the_text_is_not_wrapped(turbo: Path) -> None:
    model = service.load(service.LoadRequest(model=str(turbo), device="cpu"))
    assert model.variant is TURBO
    tokenizer = model.tokenizer.for_language(None)
    chunks, _ = pipeline.prepare_chunks(tokenizer, "Hello there. [clear throat] I mean it [laugh].")
    assert all(tag in " ".join(chunks) for tag in ("[clear throat]", "[laugh]"))
    ids, _ = pipeline.text_tokens(tokenizer, "Oh [laugh] yes.", 0, model.t3.config)
    laugh = tokenizer.tags["[laugh]"]  # type: ignore[attr-defined]
    assert laugh in ids.tolist()
    assert ids.tolist() == tokenizer.encode(tokenizer.normalize("Oh [laugh] yes."))  # no start/stop


def test_each_voiced_chunk_ends_with_three_silence_tokens(turbo: Path) -> None:
    """The rendered chunk is the decoded tokens and Turbo's three silence tokens: its length is theirs."""
    model = service.load(service.LoadRequest(model=str(turbo), device="cpu"))
    conds = service.voice(model, None, 0.0)
    settings = pipeline.SynthesisSettings(seed=2, max_tokens=12)
    (chunk,) = pipeline.synthesize(model, ["One short sentence."], conds, settings, fixed_length=lambda _: 12)
    assert chunk.speech_tokens == 12
    assert chunk.audio.shape[0] == (12 + 3) * model.s3gen.samples_per_token
    assert S3GEN_SILENCE_TOKEN == 4299 and TURBO.generation.trailing_silence == 3


def test_estimate_counts_no_guidance_rows_for_turbo(cli: Cli, turbo: Path) -> None:
    code, report = cli("estimate", "--model", str(turbo), "--json", "--device", "cpu")
    assert code == 0, report
    fp16 = report["presets"]["fp16"]  # type: ignore[index]
    assert fp16["details"]["cfg"] is False
    code, english = cli("estimate", "--model", str(turbo), "--json", "--device", "cpu", "--cfg-weight", "0.5")
    assert english["presets"]["fp16"]["kv_cache_bytes"] == fp16["kv_cache_bytes"]  # type: ignore[index]


def test_turbo_is_chosen_by_variant_or_by_its_repo(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline and with an empty hub cache, both name Turbo's repo and files in the exit-3 message."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = str(tmp_path / "x.wav")
    for args in (("--variant", "turbo"), ("--model", "ResembleAI/chatterbox-turbo")):
        code, summary = cli("synthesize", "Hi.", "-o", out, "--offline", *args, *FAST)
        assert code == ExitCode.MODEL_NOT_FOUND, summary
        assert (
            "ResembleAI/chatterbox-turbo" in summary["error"]
            and "t3_turbo_v1.safetensors" in summary["error"]
        )  # type: ignore[operator]


def test_turbo_speaks_english_only(cli: Cli, turbo: Path, tmp_path: Path) -> None:
    code, summary = cli(
        "synthesize", "Bonjour.", "-o", str(tmp_path / "f.wav"), "--model", str(turbo), "--variant", "turbo",
        "--language", "fr", *FAST,
    )  # fmt: skip
    assert code == ExitCode.USAGE and "multilingual" in summary["error"]  # type: ignore[operator]


def _clip(path: Path, seconds: float, amplitude: float) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 24_000)) / 24_000
    wav = amplitude * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * rng.standard_normal(t.size))
    sf.write(path, wav.astype(np.float32), 24_000)
    return path


def test_a_turbo_voice_needs_more_than_five_seconds(cli: Cli, turbo: Path, tmp_path: Path) -> None:
    short = _clip(tmp_path / "short.wav", 4.0, 0.1)
    code, summary = cli(
        "synthesize",
        "Hi.",
        "-o",
        str(tmp_path / "v.wav"),
        "--model",
        str(turbo),
        "--voice",
        str(short),
        *FAST,
    )
    assert code == ExitCode.USAGE and "give at least 5 s" in summary["error"]  # type: ignore[operator]
    long = _clip(tmp_path / "long.wav", 6.0, 0.1)
    code, summary = cli(
        "synthesize", "Hi.", "-o", str(tmp_path / "v.wav"), "--model", str(turbo), "--voice", str(long), *FAST
    )
    assert code == 0, summary


def test_loudness_normalisation_reaches_the_target() -> None:
    """BS.1770 integrated loudness, as pyloudnorm measures it, lands on -27 LUFS from a quiet or a loud
    clip; silence is left alone."""
    rng = np.random.default_rng(1)
    for amplitude in (0.01, 0.8):
        wav = (amplitude * rng.standard_normal(24_000 * 6)).astype(np.float32)
        out = normalize_loudness(wav, 24_000, -27.0)
        assert out.dtype == np.float32
        assert pyloudnorm.Meter(24_000).integrated_loudness(out.astype(np.float64)) == pytest.approx(
            -27.0, abs=0.01
        )
    silent = np.zeros(24_000 * 6, dtype=np.float32)
    assert np.array_equal(normalize_loudness(silent, 24_000, -27.0), silent)
