"""Conditionals: the official conds.pt (safe loading, layout, validation) and our voice files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatterbox_cli.errors import ChatterboxError, CheckpointError, ExitCode
from chatterbox_cli.models.conds import (
    VOICE_FORMAT,
    CondDims,
    Conditionals,
    GenCond,
    T3Cond,
    load_builtin_conds,
    load_voice,
    save_voice,
    write_builtin_conds,
)


def make_conds(seed: int = 0, prompt_tokens: int = 50) -> Conditionals:
    g = torch.Generator().manual_seed(seed)
    speaker = torch.randn(1, 256, generator=g)
    return Conditionals(
        T3Cond(
            speaker_emb=speaker / speaker.norm(),
            cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
            emotion_adv=torch.full((1, 1, 1), 0.5),
        ),
        GenCond(
            prompt_token=torch.randint(0, 6561, (1, prompt_tokens), generator=g),
            prompt_token_len=torch.tensor([prompt_tokens]),
            prompt_feat=torch.randn(1, 2 * prompt_tokens, 80, generator=g),
            embedding=torch.randn(1, 192, generator=g),
        ),
    )


def assert_same(a: Conditionals, b: Conditionals) -> None:
    for part in ("t3", "gen"):
        for name, x in vars(getattr(a, part)).items():
            y = getattr(getattr(b, part), name)
            if x is None:
                assert y is None, f"{part}.{name}"
            else:
                assert x.dtype == y.dtype and torch.equal(x, y), f"{part}.{name}"


def official_dict(conds: Conditionals) -> dict:
    return {
        "t3": {
            "speaker_emb": conds.t3.speaker_emb,
            "clap_emb": None,
            "cond_prompt_speech_tokens": conds.t3.cond_prompt_speech_tokens,
            "cond_prompt_speech_emb": None,
            "emotion_adv": conds.t3.emotion_adv,
        },
        "gen": {
            "prompt_token": conds.gen.prompt_token,
            "prompt_token_len": conds.gen.prompt_token_len,
            "prompt_feat": conds.gen.prompt_feat,
            "prompt_feat_len": None,
            "embedding": conds.gen.embedding,
        },
    }


# ---------------------------------------------------------------------------------------------- conds.pt


def test_builtin_conds_round_trip_in_the_official_layout(tmp_path: Path) -> None:
    conds = make_conds()
    path = tmp_path / "conds.pt"
    write_builtin_conds(path, conds)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"t3", "gen"}
    assert set(raw["t3"]) == {
        "speaker_emb",
        "clap_emb",
        "cond_prompt_speech_tokens",
        "cond_prompt_speech_emb",
        "emotion_adv",
    }
    assert set(raw["gen"]) == {
        "prompt_token",
        "prompt_token_len",
        "prompt_feat",
        "prompt_feat_len",
        "embedding",
    }
    assert raw["t3"]["clap_emb"] is None and raw["gen"]["prompt_feat_len"] is None
    assert_same(load_builtin_conds(path), conds)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_conds_pt_is_refused_without_running_code(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what an attacker would put in a shared conds.pt
            return (os.system, (f"touch {marker}",))

    data = official_dict(make_conds())
    data["t3"]["speaker_emb"] = Payload()
    path = tmp_path / "conds.pt"
    if writer == "torch.save":
        torch.save(data, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(data, f)
    with pytest.raises(CheckpointError) as info:
        load_builtin_conds(path)
    assert not marker.exists()
    assert info.value.exit_code == ExitCode.MODEL_NOT_FOUND
    assert str(path) in str(info.value)
    if writer == "torch.save":
        assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert "weights_only" not in str(info.value) and "safe_globals" not in str(info.value)  # no unsafe advice


def test_payload_in_the_malicious_test_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickle.loads(pickle.dumps(Payload()))
    assert marker.exists()


def test_missing_and_garbage_conds_pt_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_builtin_conds(tmp_path / "nope.pt")
    junk = tmp_path / "conds.pt"
    write_builtin_conds(junk, make_conds())
    junk.write_bytes(junk.read_bytes()[:300])  # truncated download
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_builtin_conds(junk)
    junk.write_bytes(b"certainly not a torch file")
    with pytest.raises(CheckpointError, match="conds.pt"):
        load_builtin_conds(junk)
    torch.save([1, 2, 3], junk)
    with pytest.raises(CheckpointError, match="'t3' and 'gen'"):
        load_builtin_conds(junk)


@pytest.mark.parametrize(
    ("part", "key", "value", "message"),
    [
        ("t3", "speaker_emb", torch.zeros(1, 128), r"t3.speaker_emb must be a float \[B, 256\]"),
        ("t3", "speaker_emb", torch.zeros(1, 256, dtype=torch.long), "t3.speaker_emb"),
        ("t3", "cond_prompt_speech_tokens", torch.full((1, 150), 6561), "ids outside 0..6560"),
        ("t3", "cond_prompt_speech_tokens", torch.zeros(150), r"integer \[1, N\]"),
        ("t3", "clap_emb", torch.zeros(1, 512), "no CLAP"),
        ("gen", "prompt_feat", torch.zeros(1, 100, 40), r"gen.prompt_feat must be a float \[1, frames, 80\]"),
        ("gen", "embedding", torch.zeros(2, 192), r"gen.embedding must be a float \[1, 192\]"),
        ("gen", "prompt_token", torch.zeros(1, 50), "gen.prompt_token must be an integer"),
        ("gen", "surprise", torch.zeros(1), r"unexpected gen entries \['surprise'\]"),
    ],
)
def test_conds_pt_with_wrong_contents_names_the_field(
    tmp_path: Path, part: str, key: str, value: torch.Tensor, message: str
) -> None:
    data = official_dict(make_conds())
    data[part][key] = value
    path = tmp_path / "conds.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=message):
        load_builtin_conds(path)


def test_conds_pt_missing_an_entry(tmp_path: Path) -> None:
    data = official_dict(make_conds())
    del data["gen"]["embedding"]
    torch.save(data, tmp_path / "conds.pt")
    with pytest.raises(CheckpointError, match=r"gen lacks \['embedding'\]"):
        load_builtin_conds(tmp_path / "conds.pt")


def test_conds_pt_variants_the_reference_accepts(tmp_path: Path) -> None:
    conds = make_conds()
    data = official_dict(conds)
    data["t3"]["emotion_adv"] = 0.5  # the reference dataclass default is a plain float
    data["t3"]["speaker_emb"] = conds.t3.speaker_emb[0]  # the reference views it as [-1, 256]
    data["t3"]["cond_prompt_speech_emb"] = torch.zeros(1, 150, 1024)  # cached by a reference run: ignored
    data["gen"]["prompt_feat_len"] = torch.tensor([100])
    torch.save(data, tmp_path / "conds.pt")
    loaded = load_builtin_conds(tmp_path / "conds.pt")
    assert loaded.t3.emotion_adv.shape == (1, 1, 1) and loaded.t3.emotion_adv.item() == 0.5
    assert torch.equal(loaded.t3.speaker_emb, conds.t3.speaker_emb)
    assert torch.equal(loaded.gen.prompt_feat_len, torch.tensor([100]))


def test_dims_follow_the_model(tmp_path: Path) -> None:
    write_builtin_conds(tmp_path / "conds.pt", make_conds())
    with pytest.raises(CheckpointError, match=r"\[1, 512\]"):
        load_builtin_conds(tmp_path / "conds.pt", CondDims(xvector=512))


def test_to_casts_floats_only_and_keeps_optional_fields() -> None:
    conds = make_conds()
    conds.gen.prompt_feat_len = torch.tensor([100])
    half = conds.to("cpu", torch.float16)
    assert half.t3.speaker_emb.dtype == torch.float16 and half.gen.prompt_feat.dtype == torch.float16
    assert half.t3.cond_prompt_speech_tokens.dtype == torch.int64
    assert half.gen.prompt_token_len.dtype == torch.int64 and half.gen.prompt_feat_len.dtype == torch.int64
    assert conds.t3.speaker_emb.dtype == torch.float32  # the original is untouched


# ---------------------------------------------------------------------------------------------- voice files

META = {"sample_rate": "24000", "source_sha256": "ab" * 32, "exaggeration": "0.5", "created_by": "test"}


def test_voice_file_round_trip_with_metadata(tmp_path: Path) -> None:
    conds = make_conds(seed=3)
    conds.gen.prompt_feat_len = torch.tensor([100])
    path = save_voice(tmp_path / "sub" / "me.voice", conds, META)
    loaded, meta = load_voice(path)
    assert_same(loaded, conds)
    assert meta == {**META, "format": VOICE_FORMAT, "format_version": "1"}
    assert [p.name for p in path.parent.iterdir()] == ["me.voice"]  # no temp file left behind
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8:9] == b"{" and header_len < path.stat().st_size  # safetensors, not pickle


def test_voice_file_without_optional_feat_len(tmp_path: Path) -> None:
    loaded, _ = load_voice(save_voice(tmp_path / "v.voice", make_conds(), META))
    assert loaded.gen.prompt_feat_len is None


def test_save_voice_rejects_bad_input(tmp_path: Path) -> None:
    conds = make_conds()
    with pytest.raises(ValueError, match="str to str"):
        save_voice(tmp_path / "v.voice", conds, {"exaggeration": 0.5})  # type: ignore[dict-item]
    conds.t3.cond_prompt_speech_tokens = None
    with pytest.raises(ValueError, match="cond_prompt_speech_tokens"):
        save_voice(tmp_path / "v.voice", conds, META)
    assert not list(tmp_path.iterdir())


def _tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def test_voice_file_with_wrong_format_or_version_is_rejected(tmp_path: Path) -> None:
    good = save_voice(tmp_path / "good.voice", make_conds(), META)
    tensors = _tensors_of(good)
    other = tmp_path / "other.voice"
    save_file(tensors, str(other), metadata={"format": "something-else", "format_version": "1"})
    with pytest.raises(ChatterboxError, match="not a chatterbox-cli voice file"):
        load_voice(other)
    save_file(tensors, str(other), metadata={"format": VOICE_FORMAT, "format_version": "2"})
    with pytest.raises(ChatterboxError, match="version '2'.*up to 1"):
        load_voice(other)
    save_file(tensors, str(other))
    with pytest.raises(ChatterboxError, match="not a chatterbox-cli voice file"):
        load_voice(other)


def test_voice_file_with_missing_or_bad_tensors_is_rejected(tmp_path: Path) -> None:
    tensors = _tensors_of(save_voice(tmp_path / "good.voice", make_conds(), META))
    header = {"format": VOICE_FORMAT, "format_version": "1"}
    bad = tmp_path / "bad.voice"
    save_file({k: v for k, v in tensors.items() if k != "gen.embedding"}, str(bad), metadata=header)
    with pytest.raises(ChatterboxError, match=r"lacks tensors \['gen.embedding'\]"):
        load_voice(bad)
    save_file({**tensors, "t3.speaker_emb": torch.zeros(1, 100)}, str(bad), metadata=header)
    with pytest.raises(ChatterboxError, match="t3.speaker_emb"):
        load_voice(bad)


def test_unreadable_voice_files(tmp_path: Path) -> None:
    with pytest.raises(ChatterboxError, match="does not exist"):
        load_voice(tmp_path / "missing.voice")
    junk = tmp_path / "junk.voice"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ChatterboxError, match="not a readable voice file"):
        load_voice(junk)
    write_builtin_conds(junk, make_conds())  # a pickle is not a voice file either
    with pytest.raises(ChatterboxError, match="not a readable voice file"):
        load_voice(junk)


def test_the_random_checkpoint_writers_conds_pt_loads(tmp_path: Path) -> None:
    from chatterbox_cli.testing.checkpoint_writer import random_conds

    torch.save(random_conds(seed=4), tmp_path / "conds.pt")
    conds = load_builtin_conds(tmp_path / "conds.pt")
    assert conds.t3.cond_prompt_speech_tokens.shape == (1, 150) and conds.gen.embedding.shape == (1, 192)
