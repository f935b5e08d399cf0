"""`chatterbox eval` on the tiny random checkpoint (CPU): identical sides agree exactly, a lower precision
does not, and the CLI's JSON, table and usage errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from chatterbox_cli.cli import run
from chatterbox_cli.errors import UsageError
from chatterbox_cli.evaluate import CAVEAT, TEXTS, EvalReport, evaluate

FAST = ("--device", "cpu", "--max-tokens", "20")
TWO = list(TEXTS[:2])


@pytest.fixture(scope="module")
def same(tiny_checkpoint: str) -> EvalReport:
    return evaluate(tiny_checkpoint, "fp32", "fp32", "cpu", TWO, seed=0, max_tokens=20)


@pytest.fixture(scope="module")
def lower(tiny_checkpoint: str) -> EvalReport:
    """fp16 on the CPU: T3 in bf16, the flow in fp16 (service.decide, service.flow_dtype)."""
    return evaluate(tiny_checkpoint, "fp16", "fp32", "cpu", TWO, seed=0, max_tokens=20)


def test_identical_sides_agree_exactly(same: EvalReport) -> None:
    assert [r.index for r in same.rows] == [0, 1]
    for figures in (*same.rows, same.summary):
        assert 0 <= figures.kl <= 1e-6
        assert figures.top1 == 1.0
        assert figures.mel_l1 == 0.0
        assert figures.snr_db is not None and (math.isinf(figures.snr_db) or figures.snr_db > 100)
        assert figures.cosine == pytest.approx(1.0, abs=1e-5)
    assert all(r.speech_tokens > 0 and r.positions > r.speech_tokens for r in same.rows)
    assert same.reference.preset == "fp32" and same.reference.dtype == "float32"
    assert same.cfg_weight == 0.5 and same.variant == "english"


def test_a_lower_precision_differs(lower: EvalReport, same: EvalReport) -> None:
    assert lower.results[0].side.dtype == "bfloat16" and lower.results[0].side.flow_dtype == "float16"
    s = lower.summary
    assert s.kl > 0 and s.top1 < 1.0
    assert s.mel_l1 is not None and s.mel_l1 > 0
    assert s.snr_db is not None and math.isfinite(s.snr_db)
    assert s.positions == same.summary.positions  # the same reference tokens on both sides


def test_the_reference_default_is_fp32_on_the_cpu(tiny_checkpoint: str) -> None:
    report = evaluate(tiny_checkpoint, "fp32", None, "cpu", TEXTS[:1], seed=1, max_tokens=8)
    assert report.reference.preset == "fp32" and report.summary.top1 == 1.0


def test_the_same_seed_gives_the_same_figures(tiny_checkpoint: str, lower: EvalReport) -> None:
    again = evaluate(tiny_checkpoint, "fp16", "fp32", "cpu", TWO, seed=0, max_tokens=20)
    assert again.summary == lower.summary


def test_to_dict_is_json_with_infinity_as_null(same: EvalReport) -> None:
    doc = json.loads(json.dumps(same.to_dict(), allow_nan=False))
    assert doc["schema_version"] == 1 and doc["caveat"] == CAVEAT
    (result,) = doc["results"]
    assert result["summary"]["snr_db"] is None  # identical waveforms: infinite SNR


@pytest.mark.parametrize(
    ("preset", "against", "match"),
    [
        ("fp8", "fp32", "unknown preset 'fp8'"),
        ("fp16", "all", "one precision"),
    ],
)
def test_bad_presets_are_usage_errors(tiny_checkpoint: str, preset: str, against: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        evaluate(tiny_checkpoint, preset, against, "cpu", TWO, max_tokens=4)


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli(tiny_checkpoint: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(["eval", "--model", tiny_checkpoint, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def two_texts(tmp_path: Path) -> str:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TWO) + "\n\n", encoding="utf-8")
    return str(path)


def test_cli_json(cli: Callable[..., tuple[int, str, str]], two_texts: str) -> None:
    code, out, err = cli("--preset", "fp16", "--against", "fp32", "--texts", two_texts, "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) >= {
        "schema_version",
        "model",
        "device",
        "seed",
        "texts",
        "reference",
        "results",
        "caveat",
    }
    assert doc["device"] == "cpu" and doc["texts"] == TWO and doc["max_tokens"] == 20
    assert doc["reference"]["preset"] == "fp32"
    (result,) = doc["results"]
    assert result["preset"] == "fp16" and len(result["rows"]) == 2
    assert set(result["summary"]) == {"positions", "kl", "top1", "mel_l1", "snr_db", "cosine", "cosine_min"}
    assert set(result["rows"][0]) == {
        "index",
        "speech_tokens",
        "positions",
        "kl",
        "top1",
        "mel_l1",
        "snr_db",
        "cosine",
    }
    assert "reference: loading fp32" in err  # progress goes to stderr


def test_cli_table(cli: Callable[..., tuple[int, str, str]], two_texts: str) -> None:
    code, out, _ = cli("--preset", "fp32", "--against", "fp32", "--texts", two_texts, "-q", *FAST)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(
        "fp32 (T3 float32, flow float32) against fp32 (T3 float32, flow float32) on cpu"
    )
    assert lines[1].split()[:3] == ["text", "tokens", "KL"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "all"]
    assert lines[4].split()[2:] == ["0", "1.000", "0.0000", "inf", "1.0000"]
    assert lines[-1] == f"note: {CAVEAT}"


@pytest.mark.parametrize(
    "args",
    [
        ("--preset", "nope"),
        ("--preset", "fp16", "--against", "all"),
        ("--preset", "fp16", "--max-tokens", "0"),
        ("--preset", "fp16", "--texts", "/does/not/exist.txt"),
        ("--preset", "fp16", "--device", "tpu"),
    ],
)
def test_cli_usage_errors_exit_2(cli: Callable[..., tuple[int, str, str]], args: tuple[str, ...]) -> None:
    code, out, _ = cli("--json", "--device", "cpu", *args)
    assert code == 2
    assert json.loads(out)["exit_code"] == 2


def test_cli_needs_a_preset(cli: Callable[..., tuple[int, str, str]]) -> None:
    code, _, err = cli("--device", "cpu")
    assert code == 2 and "--preset" in err


def test_a_preset_the_device_cannot_run_is_a_usage_error_or_skipped(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatterbox_cli.evaluate import check_runs, presets_under_test
    from chatterbox_cli.quant import bnb

    cpu = torch.device("cpu")
    check_runs("bnb-4bit", cpu)  # bitsandbytes quantizes on the CPU here

    def cannot(device: object) -> None:
        raise bnb.QuantizationError("bitsandbytes 0.0 cannot quantize on cpu (no kernels)")

    monkeypatch.setattr(bnb, "require_bitsandbytes", cannot)
    with pytest.raises(UsageError, match=r"--preset bnb-8bit cannot run on cpu: .*no kernels"):
        check_runs("bnb-8bit", cpu)
    tested, skipped = presets_under_test("all", "fp32", cpu)
    assert {"fp16", "awq"} <= set(tested) and {"bnb-8bit", "bnb-4bit", "bnb-4bit-swap"} <= set(skipped)
