"""The disk cache of quantized weights (chatterbox_cli/quant/cache.py), for real on the CPU with bitsandbytes:
the T3 of a tiny random checkpoint with every backbone Linear planned, and the service's own load path
(where the tiny checkpoint's flow has two int8 Linears). Every test writes to its own CHATTERBOX_CACHE_DIR."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chatterbox_cli import service
from chatterbox_cli.checkpoint import safetensors_header
from chatterbox_cli.cli import run
from chatterbox_cli.models.loading import infer_t3_config
from chatterbox_cli.models.t3 import T3
from chatterbox_cli.presets import plan_for
from chatterbox_cli.quant import cache as quant_cache
from chatterbox_cli.quant.bnb import planned_layers
from chatterbox_cli.quant.cache import CachedQuantization, cache_key, cache_root, load_quantized_cached
from chatterbox_cli.quant.plan import ComponentPlan
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

pytest.importorskip("bitsandbytes")
DTYPE = torch.bfloat16


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CHATTERBOX_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny random checkpoint of this test's own (some tests rewrite it)."""
    return write_random_checkpoint(tmp_path / "ckpt", "tiny", seed=0)


def entries(cache_dir: Path) -> list[str]:
    folder = cache_dir / "quantized"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def t3_plan(mode: str) -> ComponentPlan:
    """Every backbone Linear of the tiny T3 (64x64 ... 128x64: below the size rule of the real presets)."""
    return replace(plan_for("bnb-8bit", {"t3": mode})["t3"], min_params=0)


def load_t3(
    path: Path, plan: ComponentPlan, notes: list[str], use_cache: bool = True
) -> tuple[T3, CachedQuantization]:
    with torch.device("meta"):
        t3 = T3(infer_t3_config(safetensors_header(path)))
    done = load_quantized_cached(t3, path, plan, "cpu", DTYPE, use_cache=use_cache, notify=notes.append)
    return t3, done


def t3_logits(t3: T3) -> torch.Tensor:
    x = torch.randn(1, 7, t3.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(DTYPE)
    with torch.inference_mode():
        return t3.speech_head(t3.tfmr(x))


# --------------------------------------------------------------------------------------------------
# Where and under which key


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATTERBOX_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "a"
    assert quant_cache.quantized_dir() == tmp_path / "a" / "quantized"
    monkeypatch.delenv("CHATTERBOX_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "chatterbox-cli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "chatterbox-cli"


def test_checkpoint_identity_is_the_hub_blob_or_path_size_mtime(tmp_path: Path) -> None:
    blob = tmp_path / "models--a--b" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * 10)
    link = tmp_path / "models--a--b" / "snapshots" / "rev1" / "t3_cfg.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    assert quant_cache.checkpoint_identity(link) == {"blob": "ab" * 32}
    st = blob.stat()
    assert quant_cache.checkpoint_identity(blob) == {
        "path": str(blob.resolve()),
        "size": 10,
        "mtime_ns": st.st_mtime_ns,
    }


def test_key_changes_with_the_checkpoint_file_and_the_plan(checkpoint: Path) -> None:
    path = checkpoint / "t3_cfg.safetensors"
    with torch.device("meta"):
        t3 = T3(infer_t3_config(safetensors_header(path)))
    from chatterbox_cli.quant.plan import linear_shapes_from_module

    shapes = linear_shapes_from_module(t3)
    int8, nf4 = t3_plan("int8"), t3_plan("nf4")
    layers = list(planned_layers([int8], shapes))
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    key = cache_key(path, int8, layers, "cpu", DTYPE)
    assert key == cache_key(path, int8, layers, "cpu", DTYPE)  # deterministic
    assert key.path.name == f"t3-{key.digest}.safetensors" and len(key.digest) == 64
    fields = json.loads(key.fields_json)
    assert fields["layers"] == sorted(layers) and fields["mode"] == "int8" and fields["dtype"] == "bfloat16"
    assert {"bitsandbytes", "torch", "device", "checkpoint", "format"} <= set(fields)
    others = {
        cache_key(path, nf4, layers, "cpu", DTYPE).digest,  # another mode (preset)
        cache_key(path, int8, layers[:-1], "cpu", DTYPE).digest,  # other layers
        cache_key(path, int8, layers, "cpu", torch.float16).digest,  # another 16-bit dtype
    }
    write_random_checkpoint(checkpoint, "tiny", seed=1)  # the file is rewritten
    others.add(cache_key(path, int8, layers, "cpu", DTYPE).digest)
    assert key.digest not in others and len(others) == 4


# --------------------------------------------------------------------------------------------------
# Miss, then hit


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_miss_then_hit_gives_the_same_model(checkpoint: Path, cache_dir: Path, mode: str) -> None:
    path = checkpoint / "t3_cfg.safetensors"
    plan = t3_plan(mode)
    notes: list[str] = []
    plain, plain_done = load_t3(path, plan, notes, use_cache=False)
    assert plain_done.cache == "off" and entries(cache_dir) == []
    first, miss = load_t3(path, plan, notes)
    assert miss.cache == "miss" and miss.path is not None and miss.path.is_file()
    assert entries(cache_dir) == [miss.path.name]
    second, hit = load_t3(path, plan, notes)
    assert hit.cache == "hit" and hit.path == miss.path
    assert notes == []
    assert hit.report == miss.report == plain_done.report  # verify_quantized's report, identical
    assert hit.report.quantized_layers == 14 and hit.report.by_mode == {mode: 14}
    # bit-exact: the cached layers are the very tensors bitsandbytes made
    ref = t3_logits(plain)
    assert torch.equal(t3_logits(first), ref)
    assert torch.equal(t3_logits(second), ref)
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_service_load_miss_then_hit(checkpoint: Path, cache_dir: Path) -> None:
    """The real service path on the tiny checkpoint: its flow has two int8 Linears under bnb-8bit."""
    request = service.LoadRequest(model=str(checkpoint), device="cpu", preset="bnb-8bit")
    notes: list[str] = []
    first = service.load(request, notes.append)
    assert first.quant_cache == {"flow": "miss"}  # the tiny T3 has no Linear the preset quantizes
    assert first.quant["flow"].quantized_layers == 2 and first.quant["t3"].quantized_layers == 0
    [name] = entries(cache_dir)
    assert name.startswith("flow-")
    second = service.load(request, notes.append)
    assert second.quant_cache == {"flow": "hit"}
    assert second.quant == first.quant
    assert notes == ["--device cpu: running bnb-8bit on the CPU"] * 2

    def mel(model: service.LoadedModel) -> torch.Tensor:
        assert model.builtin_voice is not None
        cond = model.builtin_voice.to("cpu", DTYPE).gen
        tokens = torch.arange(12).unsqueeze(0) * 37 % 6561
        with torch.inference_mode():
            return model.s3gen.tokens_to_mel(
                tokens, cond, n_timesteps=2, generator=torch.Generator().manual_seed(0)
            )

    assert torch.equal(mel(first), mel(second))
    off = service.load(replace(request, quant_cache=False))
    assert off.quant_cache == {"flow": "off"} and off.quant == first.quant
    assert torch.equal(mel(off), mel(first))


def test_flow_entries_are_per_plan(checkpoint: Path, cache_dir: Path) -> None:
    """bnb-8bit and bnb-4bit plan the flow alike (int8), so they share its entry; nf4 gets its own."""
    base = service.LoadRequest(model=str(checkpoint), device="cpu", preset="bnb-8bit")
    assert service.load(base).quant_cache == {"flow": "miss"}
    assert service.load(replace(base, preset="bnb-4bit")).quant_cache == {"flow": "hit"}
    assert service.load(replace(base, plan="flow=nf4")).quant_cache == {"flow": "miss"}
    assert len(entries(cache_dir)) == 2


def test_rewritten_checkpoint_is_a_miss(checkpoint: Path, cache_dir: Path) -> None:
    path = checkpoint / "t3_cfg.safetensors"
    notes: list[str] = []
    before, _ = load_t3(path, t3_plan("int8"), notes)
    write_random_checkpoint(checkpoint, "tiny", seed=1)
    after, done = load_t3(path, t3_plan("int8"), notes)
    assert done.cache == "miss" and len(entries(cache_dir)) == 2
    assert not torch.equal(t3_logits(before), t3_logits(after))
    fresh, _ = load_t3(path, t3_plan("int8"), notes, use_cache=False)
    assert torch.equal(t3_logits(after), t3_logits(fresh))


# --------------------------------------------------------------------------------------------------
# Damaged entries and failed writes


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped":  # one byte of a packed weight: only the CRC can tell
        (n,) = struct.unpack("<Q", data[:8])
        start, _ = json.loads(data[8 : 8 + n])["tfmr.layers.0.mlp.down_proj.weight"]["data_offsets"]
        data[8 + n + start] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(b"not a safetensors file at all")


@pytest.mark.parametrize(
    ("how", "reason"),
    [("truncated", "cannot read it"), ("flipped", "CRC-32"), ("garbage", "cannot read it")],
)
def test_damaged_entry_is_reported_deleted_and_rebuilt(
    checkpoint: Path, cache_dir: Path, how: str, reason: str
) -> None:
    path = checkpoint / "t3_cfg.safetensors"
    notes: list[str] = []
    good, miss = load_t3(path, t3_plan("nf4"), notes)
    assert miss.path is not None
    _corrupt(miss.path, how)
    rebuilt, done = load_t3(path, t3_plan("nf4"), notes)
    [note] = notes
    assert note.startswith(f"the quantized-weight cache entry {miss.path} is unusable (")
    assert reason in note and note.endswith("; rebuilding it")
    assert done.cache == "miss" and done.report == miss.report
    assert torch.equal(t3_logits(rebuilt), t3_logits(good))
    again, hit = load_t3(path, t3_plan("nf4"), notes)
    assert hit.cache == "hit" and len(notes) == 1
    assert torch.equal(t3_logits(again), t3_logits(good))


def test_entry_made_for_another_key_is_rejected(checkpoint: Path, cache_dir: Path) -> None:
    path = checkpoint / "t3_cfg.safetensors"
    notes: list[str] = []
    _, int8 = load_t3(path, t3_plan("int8"), notes)
    nf4_model, nf4 = load_t3(path, t3_plan("nf4"), notes)
    assert int8.path is not None and nf4.path is not None
    shutil.copyfile(int8.path, nf4.path)  # an int8 entry under the nf4 key's name
    again, done = load_t3(path, t3_plan("nf4"), notes)
    [note] = notes
    assert str(nf4.path) in note and "made for another checkpoint" in note
    assert done.cache == "miss" and torch.equal(t3_logits(again), t3_logits(nf4_model))


def test_full_disk_is_reported_and_the_model_still_loads(
    checkpoint: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)  # the world's edge: the file system
    path = checkpoint / "t3_cfg.safetensors"
    notes: list[str] = []
    model, done = load_t3(path, t3_plan("int8"), notes)
    [note] = notes
    key = cache_key(path, t3_plan("int8"), done.report.layers, "cpu", DTYPE)
    assert note == (
        f"cannot write the quantized-weight cache {key.path} (No space left on device); "
        "loading goes on without a cache"
    )
    assert done.cache == "miss" and done.report.quantized_layers == 14
    assert entries(cache_dir) == []  # the temporary file is gone too
    fresh, _ = load_t3(path, t3_plan("int8"), [], use_cache=False)
    assert torch.equal(t3_logits(model), t3_logits(fresh))


def test_unwritable_cache_dir_is_reported_and_the_model_still_loads(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache dir cannot be created below a file")
    monkeypatch.setenv("CHATTERBOX_CACHE_DIR", str(blocker / "cache"))
    notes: list[str] = []
    model = service.load(
        service.LoadRequest(model=str(checkpoint), device="cpu", preset="bnb-8bit"), notes.append
    )
    assert model.quant_cache == {"flow": "miss"} and model.quant["flow"].quantized_layers == 2
    assert len(notes) == 2 and notes[1].startswith(
        f"cannot write the quantized-weight cache {blocker}/cache/"
    )
    assert "Not a directory" in notes[1] and notes[1].endswith("loading goes on without a cache")


# --------------------------------------------------------------------------------------------------
# The command line


def test_synthesize_no_quant_cache_writes_nothing(
    checkpoint: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "synthesize",
        "Hello there.",
        "--model",
        str(checkpoint),
        "--device",
        "cpu",
        "--preset",
        "bnb-8bit",
    ]
    args += ["--max-tokens", "10", "--flow-steps", "2", "--seed", "1", "--json"]
    capsys.readouterr()
    assert run([*args, "-o", str(tmp_path / "a.wav"), "--no-quant-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["quant_cache"] == {"flow": "off"}
    assert not cache_dir.exists()
    assert run([*args, "-o", str(tmp_path / "b.wav")]) == 0
    assert json.loads(capsys.readouterr().out)["quant_cache"] == {"flow": "miss"}
    assert len(entries(cache_dir)) == 1
    assert run([*args, "-o", str(tmp_path / "c.wav")]) == 0
    assert json.loads(capsys.readouterr().out)["quant_cache"] == {"flow": "hit"}
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "c.wav").read_bytes()
