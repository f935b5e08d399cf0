"""Voice preparation from a clip on a tiny random checkpoint, and the prepared-voice cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from rounding import U

from chatterbox_cli.errors import ChatterboxError, UsageError
from chatterbox_cli.models.conds import load_voice
from chatterbox_cli.models.s3gen import VOICE_PARTS, S3Gen
from chatterbox_cli.models.voice_encoder import VoiceEncoder, load_voice_encoder
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from chatterbox_cli.voice import (
    conditionals_from_audio,
    file_sha256,
    prepare_voice,
    voice_cache_path,
    voice_from_clip,
)

pytestmark = pytest.mark.parity  # .ci/run reruns these under other instruction sets

# reductions a VoiceEncoder embedding depends on (as in tests/test_voice_encoder.py): 160 steps of 3 LSTM
# layers, the projection and the mel
VE_REDUCTIONS = 160 * (296 + 512 + 512) + 256 + 400 + 201


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[VoiceEncoder, S3Gen]:
    torch.set_num_threads(1)
    folder = write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)
    return load_voice_encoder(folder / "ve.safetensors"), S3Gen.load(
        folder / "s3gen.safetensors", parts=VOICE_PARTS
    )


def speechlike(seconds: float, sr: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(0.25 / k * np.sin(k * phase) for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    wav = (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    return np.stack([wav, 0.8 * wav], axis=1) if channels == 2 else wav


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf"


def test_prepared_voice_has_the_reference_layout(models: tuple[VoiceEncoder, S3Gen], tmp_path: Path) -> None:
    ve, s3gen = models
    clip = tmp_path / "stereo44k.wav"
    sf.write(clip, speechlike(4.0, 44100, channels=2), 44100, subtype="PCM_16")
    conds = prepare_voice(clip, ve, s3gen, exaggeration=0.7)
    t3, gen = conds.t3, conds.gen
    # normalising rounds the norm by at most (256 + 4)u
    assert t3.speaker_emb.shape == (1, 256) and abs(t3.speaker_emb.norm().item() - 1) <= 260 * U
    assert t3.cond_prompt_speech_tokens.shape == (1, 100)  # 4 s at 25 tokens/s, under the 6 s cap
    assert t3.cond_prompt_speech_tokens.dtype == torch.long
    assert t3.emotion_adv.shape == (1, 1, 1) and t3.emotion_adv.item() == pytest.approx(0.7)
    assert gen.prompt_token.shape == (1, 100) and gen.prompt_token_len.tolist() == [100]
    assert gen.prompt_feat.shape == (1, 200, 80) and gen.embedding.shape == (1, 192)
    for t in (t3.speaker_emb, gen.prompt_feat, gen.embedding):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all()
    for tok in (t3.cond_prompt_speech_tokens, gen.prompt_token):
        assert int(tok.min()) >= 0 and int(tok.max()) < 6561


def test_prompt_windows_follow_the_reference(models: tuple[VoiceEncoder, S3Gen]) -> None:
    """T3 prompt: first 6 s (150 tokens); S3Gen prompt: first 10 s; speaker embedding: the whole clip."""
    ve, s3gen = models
    sr = 24000
    wav = speechlike(12.0, sr, seed=1)
    late_change = wav.copy()
    late_change[11 * sr :] = speechlike(1.0, sr, seed=9) * 2.0  # differs only after 11 s
    a = conditionals_from_audio(wav, sr, ve, s3gen)
    b = conditionals_from_audio(late_change, sr, ve, s3gen)
    assert a.t3.cond_prompt_speech_tokens.shape == (1, 150)
    assert a.gen.prompt_token.shape == (1, 250) and a.gen.prompt_feat.shape == (1, 500, 80)
    assert torch.equal(a.t3.cond_prompt_speech_tokens, b.t3.cond_prompt_speech_tokens)
    assert torch.equal(a.gen.prompt_token, b.gen.prompt_token)
    assert torch.equal(a.gen.prompt_feat, b.gen.prompt_feat)
    assert not torch.allclose(a.t3.speaker_emb, b.t3.speaker_emb, atol=1e-6)
    # The speaker embedding is the VoiceEncoder's over the 16 kHz clip.
    from chatterbox_cli.audio import resample

    direct = ve.embeds_from_wavs([resample(wav, sr, 16000)], 16000)
    # the same computation; MKL may still round by memory alignment (tests/test_voice_encoder.py's bound)
    tol = 6 * U * math.sqrt(VE_REDUCTIONS) * direct.abs().max().item()
    torch.testing.assert_close(a.t3.speaker_emb, direct, rtol=0, atol=tol)


def test_voice_is_cached_by_clip_content_and_model(
    models: tuple[VoiceEncoder, S3Gen], tmp_path: Path, hub_cache: Path
) -> None:
    ve, s3gen = models
    clip = tmp_path / "me.flac"
    sf.write(clip, speechlike(3.5, 22050, seed=2), 22050)
    first = voice_from_clip(clip, ve, s3gen, exaggeration=0.5, model_key="tiny-test")
    assert not first.from_cache
    assert first.cache_path == voice_cache_path(file_sha256(clip), "tiny-test")
    assert first.cache_path.is_file() and first.cache_path.is_relative_to(
        hub_cache / "chatterbox-cli" / "voices"
    )
    _, meta = load_voice(first.cache_path)
    assert meta["source_sha256"] == file_sha256(clip) and meta["exaggeration"] == "0.5"
    assert meta["source_name"] == "me.flac" and meta["created_by"].startswith("chatterbox-cli ")

    renamed = tmp_path / "same-audio-other-name.flac"
    renamed.write_bytes(clip.read_bytes())
    second = voice_from_clip(renamed, ve, s3gen, exaggeration=1.25, model_key="tiny-test")
    assert second.from_cache and second.cache_path == first.cache_path
    assert torch.equal(second.conds.t3.speaker_emb, first.conds.t3.speaker_emb)
    assert torch.equal(second.conds.gen.prompt_feat, first.conds.gen.prompt_feat)
    assert second.conds.t3.emotion_adv.item() == pytest.approx(1.25)  # the request wins over the cache

    other_model = voice_from_clip(clip, ve, s3gen, model_key="another-checkpoint")
    assert not other_model.from_cache and other_model.cache_path != first.cache_path
    uncached = voice_from_clip(clip, ve, s3gen, model_key="tiny-test", use_cache=False)
    assert not uncached.from_cache and uncached.cache_path is None


def test_damaged_cache_file_is_prepared_again(
    models: tuple[VoiceEncoder, S3Gen], tmp_path: Path, hub_cache: Path
) -> None:
    ve, s3gen = models
    clip = tmp_path / "me.wav"
    sf.write(clip, speechlike(3.5, 16000, seed=3), 16000)
    path = voice_from_clip(clip, ve, s3gen).cache_path
    path.write_bytes(path.read_bytes()[:100])
    again = voice_from_clip(clip, ve, s3gen)
    assert not again.from_cache and any("damaged" in n for n in again.notes)
    load_voice(path)  # rewritten and readable


def test_cache_path_rejects_non_hashes(hub_cache: Path) -> None:
    with pytest.raises(ValueError):
        voice_cache_path("../../etc/passwd")
    assert voice_cache_path("ab" * 32).parent == hub_cache / "chatterbox-cli" / "voices"


@pytest.mark.parametrize(
    ("audio", "sr", "message"),
    [
        (np.zeros(16000 * 4, np.float32), 16000, "silent"),
        (speechlike(1.0, 16000), 16000, "at least 3 s"),
        (None, 16000, "cannot be read"),
    ],
)
def test_bad_clips_name_the_file_and_the_fix(
    models: tuple[VoiceEncoder, S3Gen], tmp_path: Path, audio: np.ndarray | None, sr: int, message: str
) -> None:
    ve, s3gen = models
    clip = tmp_path / "bad.wav"
    if audio is None:
        clip.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    else:
        sf.write(clip, audio, sr)
    with pytest.raises(UsageError, match=message) as info:
        prepare_voice(clip, ve, s3gen)
    assert str(clip) in str(info.value)


def test_missing_clip(models: tuple[VoiceEncoder, S3Gen], tmp_path: Path) -> None:
    ve, s3gen = models
    with pytest.raises(ChatterboxError, match="does not exist"):
        voice_from_clip(tmp_path / "nope.wav", ve, s3gen)
