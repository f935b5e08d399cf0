"""The variant descriptions and what reads them: the resolver, the validator, the writer, T3's config, and
the weights-only reader of the multilingual model's torch.save files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatterbox_cli import estimate as est
from chatterbox_cli.checkpoint import (
    read_torch_state_dict,
    resolve_checkpoint,
    safetensors_header,
    tensor_infos,
    validate,
)
from chatterbox_cli.errors import CheckpointError, ExitCode, UsageError
from chatterbox_cli.models.loading import infer_t3_config, load_t3
from chatterbox_cli.models.s3gen import S3Gen
from chatterbox_cli.models.t3 import T3Config
from chatterbox_cli.models.voice_encoder import load_voice_encoder
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from chatterbox_cli.variants import ENGLISH, MULTILINGUAL, variant_for


@pytest.fixture(scope="module")
def mtl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("mtl"), "tiny", seed=5, variant="multilingual")


def test_a_language_other_than_english_implies_multilingual() -> None:
    assert variant_for(None, None) is None  # the checkpoint's own
    assert variant_for(None, "en") is None
    assert variant_for(None, "fr") is MULTILINGUAL
    assert variant_for("multilingual", "en") is MULTILINGUAL
    with pytest.raises(UsageError, match="--variant english does not speak 'fr'"):
        variant_for("english", "fr")
    with pytest.raises(UsageError, match="unknown language 'xx'"):
        variant_for(None, "xx")
    with pytest.raises(UsageError, match="unknown variant"):
        variant_for("turbo-x", None)


def test_the_writer_writes_the_multilingual_layout(mtl: Path) -> None:
    assert sorted(p.name for p in mtl.iterdir()) == sorted(MULTILINGUAL.all_files)
    config = infer_t3_config(safetensors_header(mtl / "t3_mtl23ls_v2.safetensors"))
    assert config == T3Config(**{**T3Config.tiny().__dict__, "text_vocab_size": 2454})
    for name in ("s3gen.pt", "ve.pt"):
        assert zipfile.is_zipfile(mtl / name)  # torch.save's archive, as the official files are


def test_the_resolver_finds_each_variant_and_names_the_other(mtl: Path, tiny_checkpoint: str) -> None:
    found = resolve_checkpoint(str(mtl), variant=MULTILINGUAL)
    assert found.variant is MULTILINGUAL and found.folder == mtl.resolve()
    assert validate(found)["t3_mtl23ls_v2.safetensors"]
    assert resolve_checkpoint(str(mtl)).variant is MULTILINGUAL  # no variant asked: the folder's own
    with pytest.raises(CheckpointError, match="the multilingual checkpoint: pass --variant multilingual"):
        resolve_checkpoint(str(mtl), variant=ENGLISH)
    with pytest.raises(CheckpointError, match="holds the english checkpoint: pass --variant english"):
        resolve_checkpoint(tiny_checkpoint, variant=MULTILINGUAL)


def test_a_damaged_pt_file_fails_validation_with_the_fix(mtl: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mtl"
    broken.mkdir()
    for p in mtl.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "s3gen.pt").write_bytes(b"not a zip")
    (broken / "Cangjie5_TC.json").write_text("[", encoding="utf-8")
    with pytest.raises(CheckpointError) as info:
        validate(resolve_checkpoint(str(broken), variant=MULTILINGUAL))
    message = str(info.value)
    assert "s3gen.pt is not a torch.save archive" in message
    assert "Cangjie5_TC.json is not valid JSON" in message
    assert "--force-download" in message and "s3gen.pt Cangjie5_TC.json" in message


def test_pt_weights_equal_the_english_safetensors_of_the_same_seed(mtl: Path, tmp_path: Path) -> None:
    """The multilingual S3Gen and voice encoder are the English modules: same names, shapes and values."""
    english = write_random_checkpoint(tmp_path / "en", "tiny", seed=5)
    for pt, st in (("s3gen.pt", "s3gen.safetensors"), ("ve.pt", "ve.safetensors")):
        pickled, safe = read_torch_state_dict(mtl / pt), load_file(str(english / st))
        assert pickled.keys() == safe.keys()
        assert all(torch.equal(pickled[k], safe[k]) for k in safe), pt
        assert tensor_infos(mtl / pt) == safetensors_header(english / st)


class NotATensor:
    pass


def test_a_pickle_with_more_than_tensors_is_refused_with_exit_3(tmp_path: Path) -> None:
    """weights_only=True refuses any class it does not know: the file is never unpickled in full."""
    path = tmp_path / "s3gen.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="holds more than tensors, so it is not read") as info:
        read_torch_state_dict(path)
    assert info.value.exit_code == ExitCode.MODEL_NOT_FOUND
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="is not a state dict"):
        read_torch_state_dict(path)


def test_the_loaders_read_pt_files_as_they_read_safetensors(mtl: Path, tmp_path: Path) -> None:
    """S3Gen and the voice encoder loaded from s3gen.pt / ve.pt equal those loaded from the English
    safetensors holding the same tensors; T3 loads from the multilingual file with its 2,454-row vocab."""
    english = write_random_checkpoint(tmp_path / "en", "tiny", seed=5)
    pairs = [
        (S3Gen.load(mtl / "s3gen.pt"), S3Gen.load(english / "s3gen.safetensors")),
        (load_voice_encoder(mtl / "ve.pt"), load_voice_encoder(english / "ve.safetensors")),
    ]
    for from_pt, from_safetensors in pairs:
        a, b = from_pt.state_dict(), from_safetensors.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    t3 = load_t3(mtl / "t3_mtl23ls_v2.safetensors")
    assert t3.text_emb.weight.shape[0] == t3.text_head.weight.shape[0] == 2454


def test_estimate_reads_the_multilingual_files(mtl: Path, tmp_path: Path) -> None:
    """Only T3's text embedding and head differ from English, and neither is on the GPU in synthesis (the
    table stays in host memory, the head is never loaded): the same GPU weights."""
    english = write_random_checkpoint(tmp_path / "en", "tiny", seed=5)
    hidden = T3Config.tiny().hidden_size
    ours = est.estimate(mtl, "fp16", variant=MULTILINGUAL).presets["fp16"]
    theirs = est.estimate(english, "fp16").presets["fp16"]
    extra = ours.components["t3"].weights_bytes - theirs.components["t3"].weights_bytes
    assert extra == 0 and hidden == 64
    assert ours.components["s3gen"] == theirs.components["s3gen"]
    assert est.read_headers(mtl)["s3gen"] == est.read_headers(english)["s3gen"]  # found by its files
