"""`--preset awq` through the service and the CLI, on tiny random checkpoints (CPU): `chatterbox quantize
--method awq`, the cache, model folders, the step-down, and the GPT-2 (Turbo) backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from chatterbox_cli import service
from chatterbox_cli.checkpoint import Checkpoint
from chatterbox_cli.cli import run
from chatterbox_cli.errors import CheckpointError
from chatterbox_cli.quant import awq, awq_store
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from tests.conftest import FAST


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_checkpoint: str) -> Path:
    """A private copy of the tiny checkpoint (its cache key is its own path)."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def speak(capsys: pytest.CaptureFixture[str], model: Path, out: Path, *extra: str) -> dict:
    args = ("synthesize", "A lighthouse keeper.", "--model", str(model), "-o", str(out), "--json")
    code, stdout, err = cli(capsys, *args, *FAST, *extra)
    assert code == 0, err
    return json.loads(stdout)


def test_preset_awq_calibrates_once_into_the_cache(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    t3_file = checkpoint / "t3_cfg.safetensors"
    entry = awq_store.cache_path(t3_file)
    assert not entry.exists() and awq_store.find(checkpoint, t3_file) is None
    first = speak(capsys, checkpoint, tmp_path / "a.wav", "--preset", "awq", "--seed", "3")
    assert first["preset"] == "awq" and first["quant_cache"] == {"t3": "miss"}
    assert entry.is_file() and awq_store.find(checkpoint, t3_file) == entry
    second = speak(capsys, checkpoint, tmp_path / "b.wav", "--preset", "awq", "--seed", "3")
    assert second["quant_cache"] == {"t3": "hit"}
    # the same stored weights and seed: the same audio
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    # the entry is the standard AWQ GEMM layout for every backbone Linear of the tiny Llama (group 64: it is
    # 64 wide), with the config in its metadata (no quantization_config.json in the shared cache folder)
    stored = awq.load_awq(entry)
    assert stored.config.quantization_config() == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
    }  # fmt: skip
    linears = {n: t for n, t in stored.packed.items() if "qweight" in t}
    assert len(linears) == 7 * 2  # q, k, v, o, gate, up, down in each of the tiny model's 2 layers
    q = linears["tfmr.layers.0.self_attn.q_proj"]
    assert q["qweight"].dtype == torch.int32 and tuple(q["qweight"].shape) == (64, 64 // 8)
    assert q["scales"].dtype == torch.float16 and not (entry.parent / awq.CONFIG_FILE).exists()


def test_no_quant_cache_calibrates_without_writing(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    result = speak(capsys, checkpoint, tmp_path / "a.wav", "--preset", "awq", "--no-quant-cache")
    assert result["quant_cache"] == {"t3": "off"}
    assert awq_store.find(checkpoint, checkpoint / "t3_cfg.safetensors") is None


def test_quantize_writes_a_model_folder_that_model_reads(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "tiny-awq"
    args = ("quantize", "--method", "awq", "--model", str(checkpoint), "-o", str(out_dir), "--json")
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["path"] == str(out_dir / "t3_awq.safetensors") and result["layers"] == 14
    assert json.loads((out_dir / awq.CONFIG_FILE).read_text())["quant_method"] == "awq"
    with safe_open(str(out_dir / "t3_awq.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["quantization_config"])["version"] == "gemm"
    for name in ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors", "tokenizer.json", "conds.pt"):
        assert (out_dir / name).is_file()
    # the folder's own AWQ weights are used: nothing is calibrated, the cache is not consulted
    spoken = speak(capsys, out_dir, tmp_path / "a.wav", "--preset", "awq")
    assert spoken["preset"] == "awq" and spoken["quant_cache"] == {"t3": "hit"}
    data, rate = sf.read(tmp_path / "a.wav")
    assert rate == 24_000 and len(data) > 0 and abs(data).max() > 0
    assert not awq_store.cache_path(checkpoint / "t3_cfg.safetensors").exists()
    # a second quantize finds them and calibrates nothing
    code, stdout, _ = cli(capsys, "quantize", "--model", str(out_dir), "--json")
    assert code == 0 and json.loads(stdout)["path"] == str(out_dir / "t3_awq.safetensors")


def test_awq_weights_that_do_not_match_are_a_checkpoint_error(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    (checkpoint / "t3_awq.safetensors").write_bytes(b"not safetensors")
    args = ("synthesize", "Hi.", "--model", str(checkpoint), "-o", str(tmp_path / "a.wav"), "--preset", "awq")
    code, _, err = cli(capsys, *args, *FAST)
    assert code == CheckpointError.exit_code
    assert "quantize --method awq" in err and "Traceback" not in err


def test_step_down_takes_awq_only_where_its_weights_exist(checkpoint: Path) -> None:
    ck = service.resolve(service.LoadRequest(model=str(checkpoint)))
    assert service.next_preset("bnb-8bit", ck) == "bnb-4bit"
    (checkpoint / "t3_awq.safetensors").write_bytes(b"")
    assert service.next_preset("bnb-8bit", ck) == "awq"
    assert service.next_preset("awq", ck) == "bnb-4bit"


def test_gpt2_backbone_quantizes_and_stays_close(tmp_path: Path) -> None:
    from chatterbox_cli.models.conds import load_builtin_conds
    from chatterbox_cli.models.loading import load_t3

    folder = write_random_checkpoint(tmp_path / "turbo", "tiny", seed=0, variant="turbo")
    ck = service.resolve(service.LoadRequest(model=str(folder), variant="turbo"))
    path = awq_store.calibrate(ck, tmp_path / "t3_awq.safetensors", torch.device("cpu"), lambda _: None)
    stored = awq.load_awq(path)
    layers = {n for n, t in stored.packed.items() if "qweight" in t}
    n_layers = len({n.split(".")[2] for n in layers})
    parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert n_layers >= 1 and layers == {f"tfmr.h.{i}.{p}" for i in range(n_layers) for p in parts}
    assert set(stored.packed["tfmr.h.0.ln_1"]) == {"weight", "bias"}  # LayerNorms carry the folded scales

    t3 = _meta_t3(ck)
    report = awq_store.load_t3_awq(t3, ck.file("t3"), path, torch.device("cpu"), torch.float32)
    assert report.quantized_layers == len(layers) and report.by_mode["int4pack-cpu"] == len(layers)
    reference = load_t3(ck.file("t3"), "cpu", torch.float32)
    cond = load_builtin_conds(ck.file("conds")).t3
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 100, (1, 12), generator=gen)
    speech = torch.randint(0, 6561, (1, 30), generator=gen)
    with torch.no_grad():
        want = reference(text, speech, cond, cfg=False).speech_logits
        got = t3(text, speech, cond, cfg=False).speech_logits
    # 4-bit weights with bf16 activations: a few tenths of a percent of relative MSE on the tiny model; 1 %
    # leaves room for any CPU's rounding and fails for a wrong layout, a lost fold or unquantized layers
    assert (got - want).pow(2).mean() / want.pow(2).mean() < 0.01


def _meta_t3(checkpoint: Checkpoint) -> torch.nn.Module:
    from chatterbox_cli.checkpoint import safetensors_header
    from chatterbox_cli.models.loading import infer_t3_config
    from chatterbox_cli.models.t3 import T3

    with torch.device("meta"):
        t3 = T3(infer_t3_config(safetensors_header(checkpoint.file("t3"))))
    t3.drop_text_head()
    return t3


@pytest.mark.gpu
def test_preset_awq_on_cuda_decodes_in_cuda_graphs(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path
) -> None:
    """On a GPU the AWQ layers run on torch's int4 kernel (sm80+) or the Triton GEMV (sm75), inside the
    decode step's captured CUDA graph, and the audio comes out."""
    model = service.load(service.LoadRequest(model=str(checkpoint), device="cuda", preset="awq"))
    kernel = "int4pack-cuda" if torch.cuda.get_device_capability()[0] >= 8 else "triton-gemv"
    assert model.quant["t3"].by_mode == {"awq": 14, kernel: 14}
    report = model.quant["t3"]
    # the estimate counts int4pack's 4 bytes per group and output; the Triton GEMV's layout holds 3
    assert (
        report.quantized_bytes == report.expected_bytes
        if kernel == "int4pack-cuda"
        else 0 < report.quantized_bytes < report.expected_bytes
    )
    del model
    args = ("synthesize", "A lighthouse keeper.", "--model", str(checkpoint), "-o", str(tmp_path / "a.wav"))
    options = ("--preset", "awq", "--device", "cuda", "--max-tokens", "40", "--json")
    code, stdout, err = cli(capsys, *args, *options)
    assert code == 0, err
    data, rate = sf.read(tmp_path / "a.wav")
    assert rate == 24_000 and len(data) > 0 and json.loads(stdout)["preset"] == "awq"
