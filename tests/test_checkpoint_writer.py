from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chatterbox_cli.checkpoint import safetensors_header
from chatterbox_cli.models.t3 import T3Config, random_state_dict, t3_tensor_shapes
from chatterbox_cli.testing.checkpoint_writer import (
    TOKENIZER_JSON,
    write_random_checkpoint,
    write_safetensors_streaming,
    write_state_dict,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=3)


def test_official_file_names(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"t3_cfg.safetensors", "tokenizer.json", "conds.pt"} <= names
    assert not any(n.endswith(".partial") for n in names)
    assert (folder / "tokenizer.json").read_bytes() == TOKENIZER_JSON.read_bytes()


def test_t3_file_has_official_names_shapes_and_fp32(folder: Path) -> None:
    header = safetensors_header(folder / "t3_cfg.safetensors")
    assert {n: i.shape for n, i in header.items()} == t3_tensor_shapes(T3Config.tiny())
    assert {i.dtype for i in header.values()} == {"F32"}
    with safe_open(str(folder / "t3_cfg.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_t3_file_equals_random_state_dict(folder: Path) -> None:
    on_disk = load_file(str(folder / "t3_cfg.safetensors"))
    expected = random_state_dict(T3Config.tiny(), seed=3)
    assert on_disk.keys() == expected.keys()
    assert all(torch.equal(on_disk[k], expected[k]) for k in expected)


def test_same_seed_same_bytes_other_seed_other_weights(folder: Path, tmp_path: Path) -> None:
    again = write_random_checkpoint(tmp_path / "a", "tiny", seed=3)
    for name in ("t3_cfg.safetensors", "ve.safetensors", "s3gen.safetensors"):
        if (folder / name).exists():
            assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    other = load_file(str(write_random_checkpoint(tmp_path / "b", "tiny", seed=4) / "t3_cfg.safetensors"))
    assert not torch.equal(
        other["text_emb.weight"], load_file(str(folder / "t3_cfg.safetensors"))["text_emb.weight"]
    )


def test_tensor_values_depend_only_on_seed_and_name() -> None:
    small = random_state_dict(T3Config.tiny(), seed=0)
    bigger = random_state_dict(replace(T3Config.tiny(), n_layers=3), seed=0)
    assert "tfmr.layers.2.mlp.up_proj.weight" in bigger
    for name, tensor in small.items():
        assert torch.equal(bigger[name], tensor), name


def test_init_scale_is_sane() -> None:
    state = random_state_dict(T3Config.tiny(), seed=0)
    for name, t in state.items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith("norm.bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
        elif name.endswith("pre_attention_query"):
            bound = (3.0 / t.shape[1]) ** 0.5  # the reference's uniform init for its queries
            assert 0.8 * bound < t.abs().max() <= bound
        elif t.numel() > 1000:
            assert abs(t.std().item() - 0.02) < 0.002, name
            assert abs(t.mean().item()) < 0.002, name


def test_conds_pt_has_the_official_layout_and_loads_safely(folder: Path) -> None:
    conds = torch.load(folder / "conds.pt", weights_only=True)
    t3, gen = conds["t3"], conds["gen"]
    assert t3["speaker_emb"].shape == (1, 256) and t3["speaker_emb"].dtype == torch.float32
    assert torch.isclose(t3["speaker_emb"].norm(), torch.tensor(1.0)) and (t3["speaker_emb"] >= 0).all()
    prompt = t3["cond_prompt_speech_tokens"]
    assert prompt.shape == (1, 150) and prompt.dtype == torch.long and int(prompt.max()) < 6561
    assert t3["emotion_adv"].shape == (1, 1, 1) and float(t3["emotion_adv"]) == 0.5
    assert t3["clap_emb"] is None and t3["cond_prompt_speech_emb"] is None
    n = gen["prompt_token"].shape[1]
    assert gen["prompt_token"].dtype == torch.long and gen["prompt_token_len"].tolist() == [n]
    assert gen["prompt_feat"].shape == (1, 2 * n, 80)
    assert gen["prompt_feat_len"] is None
    assert gen["embedding"].shape == (1, 192)


@pytest.mark.parametrize(
    ("file_name", "module_name", "config_name"),
    [
        ("ve.safetensors", "chatterbox_cli.models.voice_encoder", "VoiceEncoderConfig"),
        ("s3gen.safetensors", "chatterbox_cli.models.s3gen", "S3GenConfig"),
    ],
)
def test_other_components_are_written_from_their_modules(
    folder: Path, file_name: str, module_name: str, config_name: str
) -> None:
    module = importlib.import_module(module_name)
    if not hasattr(module, "random_state_dict") or not hasattr(module, config_name):
        pytest.skip(f"{module_name} has no random_state_dict yet")
    expected = module.random_state_dict(getattr(module, config_name).tiny(), 3)
    on_disk = load_file(str(folder / file_name))
    assert on_disk.keys() == expected.keys()
    assert all(torch.equal(on_disk[k], expected[k]) for k in expected)


def test_streaming_writer_round_trips_mixed_dtypes(tmp_path: Path) -> None:
    state = {
        "a": torch.randn(3, 5),
        "scalar": torch.tensor(7),
        "half": torch.randn(4, dtype=torch.float16),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    write_state_dict(tmp_path / "x.safetensors", state)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


def test_streaming_writer_rejects_tensors_off_layout(tmp_path: Path) -> None:
    layout = {"a": ((2, 2), torch.float32)}
    with pytest.raises(ValueError, match="does not match the layout"):
        write_safetensors_streaming(tmp_path / "x.safetensors", layout, [("a", torch.zeros(3))])
    with pytest.raises(ValueError, match="fewer tensors"):
        write_safetensors_streaming(tmp_path / "y.safetensors", layout, [])
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny"):
        write_random_checkpoint(tmp_path, "medium", seed=0)  # type: ignore[arg-type]
