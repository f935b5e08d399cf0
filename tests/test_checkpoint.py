"""Checkpoint resolution (local folder, hub cache, download) and validation, on small real files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chatterbox_cli.checkpoint import (
    DEFAULT_REPO,
    REQUIRED_FILES,
    Checkpoint,
    TensorInfo,
    download_command,
    looks_like_path,
    resolve_checkpoint,
    validate,
)
from chatterbox_cli.errors import CheckpointError, ExitCode, UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"

SHAPES = {
    "t3_cfg.safetensors": {"tfmr.layers.0.self_attn.q_proj.weight": (8, 8), "speech_head.weight": (10, 8)},
    "s3gen.safetensors": {"flow.input_embedding.weight": (12, 4)},
    "ve.safetensors": {"proj.weight": (4, 6), "proj.bias": (4,)},
}


def write_checkpoint(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """A small checkpoint in the official file layout (tensors are random, shapes are tiny)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name, shapes in SHAPES.items():
        if name not in skip:
            save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(folder / name))
    if "tokenizer.json" not in skip:
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    if "conds.pt" not in skip:
        torch.save({"t3": {"speaker_emb": torch.zeros(1, 4)}}, folder / "conds.pt")
    return folder


def write_hub_cache(cache: Path, repo_id: str = DEFAULT_REPO, skip: tuple[str, ...] = ()) -> Path:
    """Lay files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/main -> commit."""
    src = write_checkpoint(cache.parent / "src", skip=skip)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def expect_checkpoint_error(match: str) -> pytest.RaisesContext:
    return pytest.raises(CheckpointError, match=match)


# --- local folders -------------------------------------------------------------------------------


def test_local_folder(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    ckpt = resolve_checkpoint(str(folder))
    assert ckpt == Checkpoint(folder=folder.resolve(), source="local")
    assert ckpt.path("conds.pt") == folder.resolve() / "conds.pt"
    headers = validate(ckpt)
    assert set(headers) == {"t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors"}
    assert headers["ve.safetensors"]["proj.weight"] == TensorInfo("F32", (4, 6))


def test_relative_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "ckpts/chatterbox" could be a hub id; an existing folder of that name wins.
    write_checkpoint(tmp_path / "ckpts" / "chatterbox")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("ckpts/chatterbox").source == "local"


@pytest.mark.parametrize(
    "model", ["./missing", "/no/such/folder", "~/no-such-chatterbox", "a/b/c", "bad id!"]
)
def test_unknown_model_path(model: str, tmp_path: Path) -> None:
    assert looks_like_path(model)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(model)
    msg = str(info.value)
    assert f"--model {model}" in msg and "does not exist" in msg
    assert info.value.exit_code == ExitCode.MODEL_NOT_FOUND == 3


@pytest.mark.parametrize("model", ["a..b", "x--y", "org/name."])
def test_invalid_repo_id(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with expect_checkpoint_error(f"--model {model}: no such folder, and not a valid model hub repo id"):
        resolve_checkpoint(model)


def test_model_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "t3_cfg.safetensors"
    f.write_bytes(b"x")
    with expect_checkpoint_error("is a file, not a folder"):
        resolve_checkpoint(str(f))


def test_folder_with_half_the_files(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "half", skip=("s3gen.safetensors", "ve.safetensors", "conds.pt"))
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(str(folder))
    msg = str(info.value)
    assert f"{folder} lacks s3gen.safetensors, ve.safetensors, conds.pt" in msg
    cmd = download_command(
        DEFAULT_REPO, None, ("s3gen.safetensors", "ve.safetensors", "conds.pt"), local_dir=folder
    )
    assert f"`{cmd}`" in msg
    assert cmd.endswith(
        f"download ResembleAI/chatterbox s3gen.safetensors ve.safetensors conds.pt --local-dir {folder}"
    )


def test_revision_with_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(UsageError):
        resolve_checkpoint(str(folder), revision="main")


# --- validation ----------------------------------------------------------------------------------


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    t3 = folder / "t3_cfg.safetensors"
    t3.write_bytes(t3.read_bytes()[:-10])
    ckpt = resolve_checkpoint(str(folder))  # presence is enough to resolve; content is validate's job
    with pytest.raises(CheckpointError) as info:
        validate(ckpt)
    msg = str(info.value)
    assert "t3_cfg.safetensors is not a valid .safetensors file" in msg and "truncated" in msg
    assert "--force-download" in msg
    assert isinstance(info.value.__cause__, CheckpointError)
    assert isinstance(info.value.__cause__.__cause__, ValueError)


def test_safetensors_cut_inside_the_header(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "ve.safetensors").write_bytes((folder / "ve.safetensors").read_bytes()[:20])
    with expect_checkpoint_error("ve.safetensors is not a valid .safetensors file"):
        validate(resolve_checkpoint(str(folder)))


def test_non_json_tokenizer(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text("<html>rate limited</html>")
    with pytest.raises(CheckpointError) as info:
        validate(resolve_checkpoint(str(folder)))
    assert "tokenizer.json is not valid JSON" in str(info.value)
    assert isinstance(info.value.__cause__.__cause__, json.JSONDecodeError)


def test_tokenizer_json_without_model(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    with expect_checkpoint_error('not a tokenizers file \\(no "model" key\\)'):
        validate(resolve_checkpoint(str(folder)))


def test_conds_not_a_torch_archive(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "conds.pt").write_bytes(b"\x80\x04not a zip")
    with expect_checkpoint_error("conds.pt is not a torch.save archive"):
        validate(resolve_checkpoint(str(folder)))


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text("{")
    (folder / "s3gen.safetensors").write_bytes(b"")
    (folder / "conds.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        validate(Checkpoint(folder=folder, source="local"))
    msg = str(info.value)
    assert "s3gen.safetensors is not a valid" in msg and "tokenizer.json is not valid JSON" in msg
    assert "conds.pt is missing" in msg
    assert "t3_cfg" not in msg.split("Get them")[0]


# --- hub cache -----------------------------------------------------------------------------------


def test_hub_cache_via_hf_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = write_hub_cache(tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    ckpt = resolve_checkpoint()
    assert ckpt == Checkpoint(folder=snapshot, source="hub-cache", repo_id=DEFAULT_REPO, revision=COMMIT)
    assert validate(ckpt)["t3_cfg.safetensors"]["speech_head.weight"].shape == (10, 8)
    assert resolve_checkpoint(revision=COMMIT) == ckpt


def test_hub_cache_via_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = write_hub_cache(tmp_path / "home" / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_checkpoint(DEFAULT_REPO).folder == snapshot


def test_partial_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_hub_cache(tmp_path / "cache", skip=("conds.pt",))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(DEFAULT_REPO)
    msg = str(info.value)
    assert "missing: conds.pt" in msg and "HF_HUB_OFFLINE is set" in msg
    assert f"`{download_command(DEFAULT_REPO, None, ('conds.pt',))}`" in msg
    assert "--model /path/to/folder" in msg


def test_unknown_revision_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_hub_cache(tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(DEFAULT_REPO, revision="v2")
    assert "(revision v2) is not in the hub cache" in str(info.value)
    assert "--revision v2" in str(info.value)


def test_download_not_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with expect_checkpoint_error("downloading was not allowed"):
        resolve_checkpoint("someone/other-model", allow_download=False)


def test_corrupt_file_in_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = write_hub_cache(tmp_path / "cache")
    (snapshot / "tokenizer.json").resolve().write_text("not json")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        validate(resolve_checkpoint())
    assert f"`{download_command(DEFAULT_REPO, COMMIT, ('tokenizer.json',), force=True)}`" in str(info.value)


_RESOLVE_SCRIPT = """
import sys
from chatterbox_cli.checkpoint import resolve_checkpoint
from chatterbox_cli.errors import CheckpointError
try:
    resolve_checkpoint(progress=False)
except CheckpointError as e:
    print(type(e.__cause__).__name__ if e.__cause__ else "-")
    print(e)
    sys.exit(int(e.exit_code))
sys.exit("resolved although nothing is cached")
"""


def _run_resolve(
    tmp_path: Path, make_env: Callable[..., dict[str, str]], **env: str
) -> subprocess.CompletedProcess[str]:
    settings = {k: "" for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_"))}
    local = "127.0.0.1,localhost"
    settings.update(HF_HOME=str(tmp_path / "hf"), NO_PROXY=local, no_proxy=local, **env)
    base = make_env(**settings)
    return subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_offline_hub_call_fails_cleanly(
    tmp_path: Path, make_child_env: Callable[..., dict[str, str]]
) -> None:
    proc = _run_resolve(tmp_path, make_child_env, HF_HUB_OFFLINE="1")
    assert proc.returncode == 3, proc.stderr
    cause, msg = proc.stdout.split("\n", 1)
    assert "HF_HUB_OFFLINE is set" in msg and str(tmp_path / "hf" / "hub") in msg
    assert download_command(DEFAULT_REPO) in msg
    assert "Traceback" not in proc.stderr


def test_unreachable_hub_fails_cleanly(tmp_path: Path, make_child_env: Callable[..., dict[str, str]]) -> None:
    # Port 9 (discard) on localhost refuses connections: the download is attempted and fails at once.
    proc = _run_resolve(tmp_path, make_child_env, HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 3, proc.stderr
    cause, msg = proc.stdout.split("\n", 1)
    assert cause == "LocalEntryNotFoundError"
    assert "downloading it failed" in msg and download_command(DEFAULT_REPO) in msg
    for name in REQUIRED_FILES:
        assert name in msg
    assert not (tmp_path / "hf" / "hub" / "models--ResembleAI--chatterbox" / "snapshots").exists()
