"""Voices: turn a reference clip into the conditionals T3 and S3Gen need, and cache the result.

Preparation follows the reference: the clip is brought to 24 kHz; S3Gen's prompt (mel, x-vector, speech
tokens) comes from its first 10 s; the 16 kHz version (resampled from the 24 kHz one) gives T3's prompt
tokens from its first 6 s (at most 150 tokens) and the VoiceEncoder embedding from all of it.

Prepared voices are cached as voice files (models/conds.py) under `<hub cache parent>/chatterbox-cli/voices`,
named by the clip's content hash and the checkpoint that prepared them, so a second run skips the work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from chatterbox_cli import __version__
from chatterbox_cli.audio import normalize_loudness, not_a_file, read_voice_clip, resample
from chatterbox_cli.checkpoint import hub_cache_dir
from chatterbox_cli.errors import ChatterboxError, UsageError
from chatterbox_cli.models.conds import CondDims, Conditionals, T3Cond, load_voice, save_voice
from chatterbox_cli.variants import VoiceRules

if TYPE_CHECKING:
    from chatterbox_cli.models.s3gen import S3Gen
    from chatterbox_cli.models.voice_encoder import VoiceEncoder

S3GEN_SR = 24_000
S3_SR = 16_000
S3GEN_PROMPT_SECONDS = 10  # the reference's DEC_COND_LEN
T3_PROMPT_TOKENS = 150  # T3's speech_cond_prompt_len (English and multilingual)
DEFAULT_RULES = VoiceRules()  # English and multilingual (variants.VoiceRules)
VOICE_SUFFIX = ".voice"


@dataclass
class PreparedVoice:
    conds: Conditionals  # CPU, fp32
    metadata: dict[str, str]
    notes: list[str]  # things to tell the user (e.g. the clip was shortened)
    cache_path: Path | None  # where it is cached, if it is
    from_cache: bool


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def voices_dir() -> Path:
    return hub_cache_dir().parent / "chatterbox-cli" / "voices"


def voice_cache_path(clip_hash: str, model_key: str = "") -> Path:
    """Cache file for the clip with content hash `clip_hash`, prepared by the model `model_key`.

    `model_key` names the checkpoint (repo id and revision, or a folder and its files' sizes and dates):
    the same clip gives different conditionals with different VoiceEncoder/S3Gen weights.
    """
    if not clip_hash or not all(c in "0123456789abcdef" for c in clip_hash):
        raise ValueError(f"clip_hash must be a lowercase hex digest, got {clip_hash!r}")
    name = clip_hash[:32]
    if model_key:
        name += "-" + hashlib.sha256(model_key.encode()).hexdigest()[:12]
    return voices_dir() / f"{name}{VOICE_SUFFIX}"


def _with_exaggeration(conds: Conditionals, exaggeration: float) -> Conditionals:
    emotion = torch.full_like(conds.t3.emotion_adv, float(exaggeration))
    return Conditionals(T3Cond(conds.t3.speaker_emb, conds.t3.cond_prompt_speech_tokens, emotion), conds.gen)


def conditionals_from_audio(
    wav: np.ndarray,
    sample_rate: int,
    ve: VoiceEncoder,
    s3gen_prep: S3Gen,
    exaggeration: float = 0.5,
    rules: VoiceRules = DEFAULT_RULES,
    prompt_tokens: int = T3_PROMPT_TOKENS,
) -> Conditionals:
    """Conditionals (CPU, fp32) from mono float32 audio at any sample rate, under the variant's `rules`;
    T3's speech prompt has at most `prompt_tokens` tokens."""
    wav24 = resample(np.asarray(wav, dtype=np.float32), sample_rate, S3GEN_SR)
    seconds = wav24.shape[0] / S3GEN_SR
    if seconds < rules.min_seconds:
        raise UsageError(
            f"the voice clip is {seconds:.2f} s long; give at least {rules.min_seconds:g} s of speech"
        )
    if rules.loudness_lufs is not None:
        wav24 = normalize_loudness(wav24, S3GEN_SR, rules.loudness_lufs)
    wav16 = resample(wav24, S3GEN_SR, S3_SR)

    if s3gen_prep.tokenizer is None:
        raise UsageError(
            "S3Gen's speech tokenizer is not loaded; load the voice parts before preparing a voice"
        )
    gen = s3gen_prep.embed_ref(torch.from_numpy(wav24[: S3GEN_PROMPT_SECONDS * S3GEN_SR]), S3GEN_SR)
    t3_prompt = torch.from_numpy(np.ascontiguousarray(wav16[: int(rules.t3_prompt_seconds * S3_SR)]))
    tok_device = next(s3gen_prep.tokenizer.parameters()).device
    prompt, _ = s3gen_prep.tokenizer([t3_prompt.to(tok_device)], max_len=prompt_tokens)
    speaker = ve.embeds_from_wavs([wav16], S3_SR)  # [1, 256]

    conds = Conditionals(
        T3Cond(
            speaker_emb=speaker,
            cond_prompt_speech_tokens=torch.atleast_2d(prompt).long(),
            emotion_adv=torch.full((1, 1, 1), float(exaggeration)),
        ),
        gen,
    )
    return conds.to("cpu", torch.float32)


def prepare_voice(
    clip_path: str | os.PathLike[str], ve: VoiceEncoder, s3gen_prep: S3Gen, exaggeration: float = 0.5
) -> Conditionals:
    """Read a reference clip (any format soundfile reads) and prepare its conditionals (CPU, fp32).

    Unreadable, silent or too-short clips raise UsageError naming the file and the fix.
    """
    clip = read_voice_clip(clip_path)
    return conditionals_from_audio(clip.audio, clip.sample_rate, ve, s3gen_prep, exaggeration)


def voice_from_clip(
    clip_path: str | os.PathLike[str],
    ve: VoiceEncoder,
    s3gen_prep: S3Gen,
    *,
    exaggeration: float = 0.5,
    model_key: str = "",
    use_cache: bool = True,
    dims: CondDims | None = None,
    rules: VoiceRules = DEFAULT_RULES,
    prompt_tokens: int = T3_PROMPT_TOKENS,
) -> PreparedVoice:
    """The prepared voice for a clip, from the cache when it holds one for this clip and model.

    A cached file that cannot be read is prepared again and overwritten (and a note says so).
    """
    clip_path = Path(clip_path)
    if (problem := not_a_file(clip_path)) is not None:
        raise UsageError(f"{clip_path} {problem}; give an audio file to --voice")
    clip_hash = file_sha256(clip_path)
    cache = voice_cache_path(clip_hash, model_key) if use_cache else None
    notes: list[str] = []
    if cache is not None and cache.is_file():
        try:
            conds, metadata = load_voice(cache, dims or CondDims())
        except ChatterboxError as e:
            notes.append(f"ignored the damaged cached voice {cache} ({e}); preparing it again")
        else:
            return PreparedVoice(_with_exaggeration(conds, exaggeration), metadata, notes, cache, True)

    clip = read_voice_clip(clip_path)
    notes.extend(clip.notes)
    conds = conditionals_from_audio(
        clip.audio, clip.sample_rate, ve, s3gen_prep, exaggeration, rules, prompt_tokens
    )
    metadata = {
        "sample_rate": str(S3GEN_SR),
        "source_sha256": clip_hash,
        "source_name": clip_path.name,
        "exaggeration": f"{float(exaggeration):g}",
        "model": model_key,
        "created_by": f"chatterbox-cli {__version__}",
    }
    if cache is not None:
        try:
            save_voice(cache, conds, metadata)
        except OSError as e:
            notes.append(
                f"could not cache the prepared voice at {cache} ({e.strerror or e}); it works for this run"
            )
            cache = None
    return PreparedVoice(conds, metadata, notes, cache, False)
