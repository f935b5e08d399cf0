"""Estimates from safetensors headers of the official layout (sparse files: header plus holes, no weights)."""

from __future__ import annotations

import gzip
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from chatterbox_cli import estimate as est
from chatterbox_cli.errors import CheckpointError, UsageError

INVENTORY = Path(__file__).parent / "fixtures" / "official_tensor_inventory.json.gz"
GiB = 1024**3


def write_header_only_checkpoint(folder: Path) -> dict[str, dict[str, list]]:
    with gzip.open(INVENTORY) as f:
        inventory = json.loads(f.read())
    for file, tensors in inventory.items():
        header, offset = {}, 0
        for name, (shape, _kind) in tensors.items():
            nbytes = 4
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the size is right, no data is written
    return inventory


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("official")
    return folder, write_header_only_checkpoint(folder)


def numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_json_schema_is_exact(official: tuple[Path, dict]) -> None:
    report = est.estimate(official[0], "all", free_bytes=3 * GiB)
    data = json.loads(report.to_json())
    assert set(data) == {"free_bytes", "presets", "chosen", "reason"}
    assert data["free_bytes"] == 3 * GiB
    assert set(data["presets"]) == {"fp16", "bnb-8bit", "awq", "bnb-4bit", "bnb-4bit-swap"}
    for entry in data["presets"].values():
        assert set(entry) == {
            "components", "kv_cache_bytes", "workspace_bytes", "cuda_context_bytes", "margin_bytes",
            "total_bytes", "fits", "missing", "details",
        }  # fmt: skip
        assert set(entry["components"]) == {"t3", "s3gen", "voice_encoder"}
        for comp in entry["components"].values():
            assert set(comp) == {
                "weights_bytes",
                "quantized_linear_bytes",
                "other_bytes",
                "quantized_layers",
                "mode",
                "resident",
            }
            assert all(isinstance(comp[k], int) for k in comp if k not in ("mode", "resident"))
        for k in ("kv_cache_bytes", "cuda_context_bytes", "margin_bytes", "total_bytes"):
            assert isinstance(entry[k], int) and entry[k] > 0
        # beyond weights + KV cache; 0 when the parked vocoder leaves T3 more room than it needs
        assert isinstance(entry["workspace_bytes"], int) and entry["workspace_bytes"] >= 0
        assert isinstance(entry["fits"], bool)


def test_fp16_weights_are_two_bytes_per_parameter(official: tuple[Path, dict]) -> None:
    folder, inventory = official
    e = est.estimate(folder, "fp16").presets["fp16"]
    # every T3 tensor but the text head, which synthesis never loads (T3.drop_text_head), and the text
    # embedding, which stays in host memory (T3.keep_text_table_on_host)
    off_gpu = ("text_head.weight", "text_emb.weight")
    t3_params = sum(numel(s) for n, (s, _) in inventory["t3_cfg.safetensors"].items() if n not in off_gpu)
    s3gen = inventory["s3gen.safetensors"]
    flow = sum(numel(s) for n, (s, _) in s3gen.items() if n.startswith("flow."))
    hift = sum(numel(s) for n, (s, _) in s3gen.items() if n.startswith("mel2wav."))
    assert e.components["t3"].weights_bytes == 2 * t3_params == 2 * (532_405_248 - 2 * 704 * 1024)
    assert e.components["s3gen"].weights_bytes == 2 * flow + 4 * hift  # HiFT stays fp32
    assert e.components["t3"].quantized_layers == 0 and e.components["t3"].mode == "16bit"


def test_quantized_bytes_follow_the_plan(official: tuple[Path, dict]) -> None:
    folder, _ = official
    report = est.estimate(folder, "all")
    fp16, int8, nf4 = (report.presets[p].components["t3"] for p in ("fp16", "bnb-8bit", "bnb-4bit"))
    # 210 backbone layers: 503,316,480 weights; int8 = 1 byte each + fp32 row scales
    rows = 30 * (4 * 1024 + 2 * 4096 + 1024)
    assert int8.quantized_layers == 210 and int8.quantized_linear_bytes == 503_316_480 + 4 * rows
    assert nf4.quantized_layers == 210
    assert 503_316_480 // 2 < nf4.quantized_linear_bytes < 503_316_480 * 0.53
    # everything else unchanged at 16 bits
    assert int8.other_bytes == nf4.other_bytes == fp16.weights_bytes - 2 * 503_316_480
    s3 = report.presets["bnb-8bit"].components["s3gen"]
    assert s3.quantized_layers == 424 and s3.mode == "flow=int8,mel2wav=16bit"
    assert report.presets["bnb-4bit"].components["voice_encoder"].quantized_layers == 0


def test_kv_cache_from_header_shapes(official: tuple[Path, dict]) -> None:
    folder, _ = official
    e = est.estimate(folder, "fp16", max_tokens=1000, cfg_weight=0.5, text_tokens=300).presets["fp16"]
    positions = (1 + 32 + 1) + 300 + 3 + 1000
    assert e.kv_cache_bytes == 2 * 30 * 2 * positions * 1024 * 2  # K and V, layers, CFG rows, 16-bit
    no_cfg = est.estimate(folder, "fp16", cfg_weight=0.0, text_tokens=300).presets["fp16"]
    assert no_cfg.kv_cache_bytes * 2 == e.kv_cache_bytes
    batch = est.estimate(folder, "fp16", batch=3, text_tokens=300).presets["fp16"]
    assert batch.kv_cache_bytes == 3 * e.kv_cache_bytes


def test_total_is_the_sum_of_its_parts(official: tuple[Path, dict]) -> None:
    for e in est.estimate(official[0], "all", cuda_context_bytes=123_456_789).presets.values():
        # taking turns (bnb-4bit-swap), T3 and S3Gen share one weight arena as large as the larger of them
        parts = [c.weights_bytes for k, c in e.components.items() if k != "voice_encoder"]
        weights = max(parts) if e.details["take_turns"] else sum(parts)
        assert e.cuda_context_bytes == 123_456_789 and e.details["cuda_context_measured"]
        assert e.margin_bytes == int(est.MARGIN_FRACTION * (weights + e.kv_cache_bytes + e.workspace_bytes))
        assert (
            e.total_bytes
            == weights + e.kv_cache_bytes + e.workspace_bytes + e.cuda_context_bytes + e.margin_bytes
        )
    with_voice = est.estimate(official[0], "fp16", prepare_voice=True).presets["fp16"]
    without = est.estimate(official[0], "fp16").presets["fp16"]
    assert with_voice.total_bytes > without.total_bytes + with_voice.components["voice_encoder"].weights_bytes


def test_chooser_picks_highest_fidelity_that_fits(official: tuple[Path, dict]) -> None:
    folder, _ = official
    totals = {p: e.total_bytes for p, e in est.estimate(folder, "all").presets.items()}
    assert totals["fp16"] > totals["bnb-8bit"] > totals["awq"] > totals["bnb-4bit"] > totals["bnb-4bit-swap"]
    r = est.estimate(folder, "all", free_bytes=totals["fp16"])
    assert r.chosen == "fp16" and r.reason.startswith(f"{totals['fp16'] / GiB:.1f} GiB free; fp16 needs")
    assert r.reason.endswith("→ fp16")
    assert est.estimate(folder, "all", free_bytes=totals["fp16"] - 1).chosen == "bnb-8bit"
    # AWQ fits here but has no weights for this checkpoint yet: the chooser passes over it
    no_awq = est.estimate(folder, "all", free_bytes=totals["awq"])
    assert no_awq.chosen == "bnb-4bit" and "quantize --method awq" in str(no_awq.presets["awq"].missing)
    assert est.estimate(folder, "all", free_bytes=totals["bnb-4bit"]).chosen == "bnb-4bit"
    split = est.estimate(folder, "all", free_bytes=totals["bnb-4bit"] - 1)
    assert split.chosen == "bnb-4bit-swap"
    none = est.estimate(folder, "all", free_bytes=totals["bnb-4bit-swap"] - 1)
    assert none.chosen is None and none.reason.endswith("→ CPU")
    assert "even bnb-4bit-swap needs" in none.reason
    cpu = est.estimate(folder, "all", free_bytes=None)
    assert (cpu.chosen, cpu.reason) == (None, "no GPU: CPU")
    assert all(e.fits is None for e in cpu.presets.values())


def test_awq_is_chosen_once_its_weights_exist(official: tuple[Path, dict], tmp_path: Path) -> None:
    folder = tmp_path / "with-awq"
    folder.mkdir()
    for f in official[0].iterdir():
        (folder / f.name).symlink_to(f)
    totals = {p: e.total_bytes for p, e in est.estimate(folder, "all").presets.items()}
    (folder / "t3_awq.safetensors").write_bytes(b"")  # where `quantize -o` puts them; only found, not read
    report = est.estimate(folder, "all", free_bytes=totals["awq"])
    assert report.chosen == "awq" and report.presets["awq"].missing is None
    assert est.estimate(folder, "all", free_bytes=totals["awq"] - 1).chosen == "bnb-4bit"


def test_awq_bytes_are_the_kernels_layout(official: tuple[Path, dict]) -> None:
    parts = est.estimate(official[0], "awq").presets["awq"].details["parts"]
    nf4 = est.estimate(official[0], "bnb-4bit").presets["bnb-4bit"].details["parts"]
    awq_bytes, nf4_bytes = parts["t3"]["quantized_linear_bytes"], nf4["t3"]["quantized_linear_bytes"]
    # 30 layers of 4 [1024, 1024] and 3 [4096, 1024]-sized Linears: 4 bits a weight, and 4 bytes (bf16 scale
    # and offset) per group of 128 inputs and output
    weights = 30 * (4 * 1024 * 1024 + 3 * 4096 * 1024)
    assert awq_bytes == weights // 2 + 4 * weights // 128
    assert 1.0 < awq_bytes / nf4_bytes < 1.1
    assert parts["flow"]["mode"] == "16bit" and parts["t3"]["quantized_layers"] == 210


def test_usage_and_checkpoint_errors(official: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        est.estimate(official[0], "fp16", max_tokens=0)
    with pytest.raises(CheckpointError, match="t3_cfg.safetensors is missing"):
        est.estimate(tmp_path, "fp16")


def test_nvml_process_bytes_reads_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML is the world's edge: a fake pynvml module reporting two processes.
    class NVMLError(Exception):
        pass

    proc = types.SimpleNamespace
    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetHandleByUUID=lambda u: "hu",
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            proc(pid=1, usedGpuMemory=5),
            proc(pid=42, usedGpuMemory=777),
        ],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert est.nvml_process_bytes(0, 42) == 777
    assert est.nvml_process_bytes(0, 43) is None


def test_parked_vocoder_is_off_the_gpu_while_t3_decodes(official: tuple[Path, dict]) -> None:
    """bnb presets park HiFT in host memory during T3: the T3 phase counts its weights out."""
    folder, _ = official
    report = est.estimate(folder, "all")
    fp16, nf4 = report.presets["fp16"], report.presets["bnb-4bit"]
    assert fp16.details["vocoder_parked_bytes"] == 0
    hift = nf4.details["parts"]["mel2wav"]["weights_bytes"]
    assert nf4.details["vocoder_parked_bytes"] == hift > 0
    t3_ws, s3_ws = nf4.details["t3_workspace_bytes"], nf4.details["s3gen_workspace_bytes"]
    early = est.s3gen_workspace_bytes(48, 1, True)  # the early piece, beside its chunk's KV cache
    assert nf4.workspace_bytes == max(t3_ws - hift, s3_ws - nf4.kv_cache_bytes, early, 0)


def test_the_early_piece_counted_is_the_presets_own(official: tuple[Path, dict]) -> None:
    """bnb-8bit renders 24 early tokens (presets.Preset.early_tokens): with a short --max-tokens the early
    piece is the largest S3Gen workspace, so its length decides the estimate."""
    folder, _ = official
    int8 = est.estimate(folder, "bnb-8bit", max_tokens=16).presets["bnb-8bit"]
    early = est.s3gen_workspace_bytes(24, 1, True)
    assert int8.workspace_bytes == early > est.s3gen_workspace_bytes(16, 1, True)


# The full-size English T3 as its official header gives it (checked below), and the calibration run's
# shape: one 1,000-token utterance, a 300-token text, CFG on, batch 1.
ENGLISH_T3 = est.T3Shape(
    n_layers=30, hidden=1024, kv_dim=1024, intermediate=4096, cond_len=34, speech_vocab=8194
)


def test_t3_shape_of_the_official_header(official: tuple[Path, dict]) -> None:
    headers = est.read_headers(official[0])
    assert est.t3_shape(headers["t3"]) == ENGLISH_T3


def test_t3_workspace_terms_by_hand() -> None:
    rows, prompt = 2, 34 + 300 + 3  # CFG rows; conditioning + text + start/stop/start-speech
    layer = rows * prompt * (6 * 1024 + 3 * 4096) * 2  # live hidden and MLP activations, 16-bit
    scores = rows * 16 * prompt * (prompt + 1000) * 4  # fp32 scores over the whole cache
    logits = rows * 8194 * 4 * 4
    assert layer + scores + logits == 82_781_376  # "82.8 MB counted" in the calibration note
    # x 0.46, the calibrated ratio (38.4 MB measured on the H100)
    assert est.t3_workspace_bytes(ENGLISH_T3, 1000, 1, True, 300) == 38_079_432
    assert est.t3_workspace_bytes(ENGLISH_T3, 1000, 1, True, 300) == pytest.approx(38.4e6, rel=0.01)
    # every term grows with the rows: 8 utterances with CFG, or 4 without, are 8x and 2x that
    assert est.t3_workspace_bytes(ENGLISH_T3, 1000, 8, True, 300) == 304_635_463
    assert est.t3_workspace_bytes(ENGLISH_T3, 1000, 4, False, 300) == 76_158_865


def test_s3gen_workspace_terms_by_hand() -> None:
    # batch 1: the vocoder stage is the peak; 138.8 MB counted, 197.4 MB measured (x 1.42)
    stages = est.s3gen_stage_bytes(1000, 1)
    assert max(stages.values()) == stages["hift"] == 138_838_951
    assert est.s3gen_workspace_bytes(1000, 1, True) == 197_151_310
    assert est.s3gen_workspace_bytes(1000, 1, True) == pytest.approx(197.4e6, rel=0.01)
    # batch 8: the flow estimator's [2B, 2500 frames] U-Net activations are the peak:
    # 2 * 8 rows * 2 * (250 + 1000) frames * (13 * 256 + 6 * 80) channels * 2 bytes, x 1.42
    estimator = 2 * 8 * 2 * 1250 * (13 * 256 + 6 * 80) * 2
    assert est.s3gen_stage_bytes(1000, 8)["estimator"] == estimator == 304_640_000
    assert est.s3gen_workspace_bytes(1000, 8, True) == 432_588_800
    # batch 5: on CUDA the flow runs 8 rows, three blank (s3gen.flow_batch_rows); the vocoder the 5 real ones
    five, eight = est.s3gen_stage_bytes(1000, 5), est.s3gen_stage_bytes(1000, 8)
    assert five["encoder"] == eight["encoder"] and five["estimator"] == estimator
    assert five["hift"] < eight["hift"]


def test_workspace_of_the_fp16_estimate_is_pinned(official: tuple[Path, dict]) -> None:
    e = est.estimate(official[0], "fp16", max_tokens=1000, text_tokens=300).presets["fp16"]
    # The first chunk's early piece (S3Gen on 48 tokens, 42.7 MB, beside that chunk's KV cache) is the
    # peak over T3's prefill (38.1 MB); S3Gen's whole chunk (197 MB) fits in the freed 328.6 MB KV cache
    assert e.kv_cache_bytes == 328_581_120
    assert est.s3gen_workspace_bytes(48, 1, True) == 42_665_160
    assert e.workspace_bytes == 42_665_160
    batch = est.estimate(official[0], "fp16", max_tokens=1000, text_tokens=300, batch=8).presets["fp16"]
    assert batch.workspace_bytes == 304_635_463
