"""Conditioning data: what T3 and S3Gen need to speak in one voice, and the two files that hold it.

Built-in voice (`conds.pt` of the official checkpoint): a torch pickle of
`{"t3": {speaker_emb, clap_emb, cond_prompt_speech_tokens, cond_prompt_speech_emb, emotion_adv},
  "gen": {prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding}}`.
It is read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers, so a
crafted pickle cannot run code. `clap_emb` must be None (the model has no CLAP input);
`cond_prompt_speech_emb` is ignored because T3 derives it from the prompt tokens.

Voice file (ours, `*.voice`): one safetensors file, no pickle. Tensors:
  t3.speaker_emb [B, 256] f32 · t3.cond_prompt_speech_tokens [B, N] i64 · t3.emotion_adv [B, 1, 1] f32
  gen.prompt_token [B, T] i64 · gen.prompt_token_len [B] i64 · gen.prompt_feat [B, F, 80] f32
  gen.embedding [B, 192] f32 · gen.prompt_feat_len [B] i64 (optional)
Header `__metadata__` (all strings): format = "chatterbox-cli-voice", format_version = "1", plus what the
writer adds (sample_rate, source_sha256, exaggeration, created_by, ...). Readers reject other formats and
newer versions.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from chatterbox_cli.checkpoint import DEFAULT_REPO, download_command, write_safetensors_atomic
from chatterbox_cli.errors import ChatterboxError, CheckpointError

VOICE_FORMAT = "chatterbox-cli-voice"
VOICE_FORMAT_VERSION = 1
S3_CODEBOOK_SIZE = 6561  # valid S3 speech-token ids are 0..6560
S3GEN_SILENCE_TOKEN = 4299  # the speech token of silence (the reference's S3GEN_SIL), appended by Turbo


@dataclass
class T3Cond:
    """Conditioning for T3. Names follow the official `conds.pt` keys."""

    speaker_emb: Tensor  # [B, 256] VoiceEncoder embedding
    cond_prompt_speech_tokens: Tensor | None  # [B, 150] S3 speech tokens of the prompt clip (long)
    emotion_adv: Tensor  # [B, 1, 1] exaggeration

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T3Cond:
        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return T3Cond(move(self.speaker_emb), move(self.cond_prompt_speech_tokens), move(self.emotion_adv))


@dataclass
class GenCond:
    """Conditioning for S3Gen (the reference's `embed_ref` output). Names follow `conds.pt`."""

    prompt_token: Tensor  # [B, T] S3 tokens of the reference clip (long)
    prompt_token_len: Tensor  # [B] (long)
    prompt_feat: Tensor  # [B, 2T, 80] 24 kHz mel of the reference clip
    embedding: Tensor  # [B, 192] CAMPPlus x-vector
    prompt_feat_len: Tensor | None = None  # [B] (long); None in the official file (full length)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GenCond:
        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return GenCond(
            move(self.prompt_token),
            move(self.prompt_token_len),
            move(self.prompt_feat),
            move(self.embedding),
            move(self.prompt_feat_len),
        )


@dataclass
class Conditionals:
    t3: T3Cond
    gen: GenCond

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditionals:
        return Conditionals(self.t3.to(device, dtype), self.gen.to(device, dtype))


# --------------------------------------------------------------------------------------------------
# Validation shared by both file kinds


@dataclass(frozen=True)
class CondDims:
    """Sizes the model expects; checked on load so a wrong file fails here, not deep inside a layer."""

    speaker_emb: int = 256
    xvector: int = 192
    n_mels: int = 80


def _check(ok: bool, source: str, what: str, error: type[ChatterboxError]) -> None:
    if not ok:
        raise error(f"{source}: {what}")


def validate_conditionals(
    conds: Conditionals,
    source: str,
    dims: CondDims = CondDims(),
    error: type[ChatterboxError] = ChatterboxError,
) -> None:
    """Raise `error` naming `source` and the offending field unless shapes and dtypes fit the model."""
    t3, gen = conds.t3, conds.gen

    def shape(t: Tensor) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    def is_float(t: Any, ndim: int) -> bool:
        return isinstance(t, Tensor) and t.is_floating_point() and t.dim() == ndim

    def is_int(t: Any, ndim: int) -> bool:
        return isinstance(t, Tensor) and not t.is_floating_point() and not t.is_complex() and t.dim() == ndim

    def tokens_ok(t: Tensor) -> bool:
        return t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) < S3_CODEBOOK_SIZE)

    _check(
        is_float(t3.speaker_emb, 2) and t3.speaker_emb.shape[1] == dims.speaker_emb,
        source,
        f"t3.speaker_emb must be a float [B, {dims.speaker_emb}] tensor, got "
        + (shape(t3.speaker_emb) if isinstance(t3.speaker_emb, Tensor) else repr(type(t3.speaker_emb))),
        error,
    )
    batch = t3.speaker_emb.shape[0]
    _check(
        is_float(t3.emotion_adv, 3) and t3.emotion_adv.shape == (batch, 1, 1),
        source,
        f"t3.emotion_adv must be a float [{batch}, 1, 1] tensor",
        error,
    )
    tok = t3.cond_prompt_speech_tokens
    if tok is not None:
        _check(
            is_int(tok, 2) and tok.shape[0] == batch,
            source,
            f"t3.cond_prompt_speech_tokens must be an integer [{batch}, N] tensor",
            error,
        )
        _check(
            tokens_ok(tok),
            source,
            f"t3.cond_prompt_speech_tokens hold ids outside 0..{S3_CODEBOOK_SIZE - 1}",
            error,
        )
    _check(
        is_int(gen.prompt_token, 2) and gen.prompt_token.shape[0] == batch,
        source,
        f"gen.prompt_token must be an integer [{batch}, T] tensor",
        error,
    )
    _check(
        tokens_ok(gen.prompt_token),
        source,
        f"gen.prompt_token holds ids outside 0..{S3_CODEBOOK_SIZE - 1}",
        error,
    )
    _check(
        is_int(gen.prompt_token_len, 1) and gen.prompt_token_len.shape[0] == batch,
        source,
        f"gen.prompt_token_len must be an integer [{batch}] tensor",
        error,
    )
    _check(
        is_float(gen.prompt_feat, 3)
        and gen.prompt_feat.shape[0] == batch
        and gen.prompt_feat.shape[2] == dims.n_mels,
        source,
        f"gen.prompt_feat must be a float [{batch}, frames, {dims.n_mels}] tensor"
        + (f", got {shape(gen.prompt_feat)}" if isinstance(gen.prompt_feat, Tensor) else ""),
        error,
    )
    _check(
        is_float(gen.embedding, 2) and gen.embedding.shape == (batch, dims.xvector),
        source,
        f"gen.embedding must be a float [{batch}, {dims.xvector}] tensor"
        + (f", got {shape(gen.embedding)}" if isinstance(gen.embedding, Tensor) else ""),
        error,
    )
    if gen.prompt_feat_len is not None:
        _check(
            is_int(gen.prompt_feat_len, 1) and gen.prompt_feat_len.shape[0] == batch,
            source,
            f"gen.prompt_feat_len must be None or an integer [{batch}] tensor",
            error,
        )


# --------------------------------------------------------------------------------------------------
# Built-in voice: the official conds.pt

_T3_KEYS = {"speaker_emb", "clap_emb", "cond_prompt_speech_tokens", "cond_prompt_speech_emb", "emotion_adv"}
_GEN_KEYS = {"prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding"}


def load_builtin_conds(path: str | Path, dims: CondDims = CondDims()) -> Conditionals:
    """Read the official `conds.pt` safely (no code execution) into CPU tensors."""
    path = Path(path)
    fix = (
        f"get a fresh copy with `{download_command(DEFAULT_REPO, files=('conds.pt',), force=True)}`, "
        "or pass --voice with a clip of your own"
    )
    if not path.is_file():
        raise CheckpointError(f"built-in voice file {path} does not exist; {fix}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is not a plain tensor file ({_unsafe_reason(e)}); it was not loaded because such a file "
            f"can run arbitrary code. {fix}"
        ) from e
    except Exception as e:  # torch raises many types (KeyError, RuntimeError, EOFError...) for a bad file
        raise CheckpointError(f"{path} is not a readable torch file ({_first_line(e)}); {fix}") from e

    src = str(path)
    if not (isinstance(raw, dict) and isinstance(raw.get("t3"), dict) and isinstance(raw.get("gen"), dict)):
        raise CheckpointError(
            f"{src}: expected a dict with 't3' and 'gen' dicts (official conds.pt layout); {fix}"
        )
    t3, gen = raw["t3"], raw["gen"]
    for part, got, known, required in (
        ("t3", t3, _T3_KEYS, {"speaker_emb", "emotion_adv"}),
        ("gen", gen, _GEN_KEYS, _GEN_KEYS - {"prompt_feat_len"}),
    ):
        if unknown := set(got) - known:
            raise CheckpointError(f"{src}: unexpected {part} entries {sorted(unknown)}; {fix}")
        if missing := required - set(got):
            raise CheckpointError(f"{src}: {part} lacks {sorted(missing)}; {fix}")
    if t3.get("clap_emb") is not None:
        raise CheckpointError(f"{src}: t3.clap_emb is set, but this model has no CLAP conditioning; {fix}")

    emotion = t3["emotion_adv"]
    if isinstance(emotion, (int, float)):
        emotion = torch.tensor(float(emotion))
    if isinstance(emotion, Tensor) and emotion.is_floating_point() and emotion.numel() == 1:
        emotion = emotion.reshape(1, 1, 1)
    speaker = t3["speaker_emb"]
    if isinstance(speaker, Tensor) and speaker.dim() == 1:
        speaker = speaker[None]
    prompt_len = gen["prompt_token_len"]
    if isinstance(prompt_len, Tensor) and prompt_len.dim() == 0:
        prompt_len = prompt_len.reshape(1)
    conds = Conditionals(
        T3Cond(speaker, t3.get("cond_prompt_speech_tokens"), emotion),
        GenCond(
            gen["prompt_token"], prompt_len, gen["prompt_feat"], gen["embedding"], gen.get("prompt_feat_len")
        ),
    )
    validate_conditionals(conds, src, dims, CheckpointError)
    return conds


def write_builtin_conds(path: str | Path, conds: Conditionals) -> None:
    """Write `conds` as the official `conds.pt` layout (torch pickle of plain dicts of CPU tensors)."""
    c = conds.to("cpu")
    payload = {
        "t3": {
            "speaker_emb": c.t3.speaker_emb,
            "clap_emb": None,
            "cond_prompt_speech_tokens": c.t3.cond_prompt_speech_tokens,
            "cond_prompt_speech_emb": None,
            "emotion_adv": c.t3.emotion_adv,
        },
        "gen": {
            "prompt_token": c.gen.prompt_token,
            "prompt_token_len": c.gen.prompt_token_len,
            "prompt_feat": c.gen.prompt_feat,
            "prompt_feat_len": c.gen.prompt_feat_len,
            "embedding": c.gen.embedding,
        },
    }
    torch.save(payload, Path(path))


def _unsafe_reason(e: BaseException) -> str:
    # torch's message suggests weakening the loader; show only what the file asked for.
    found = re.search(r"GLOBAL (\S+)", str(e))
    return (
        f"it refers to the Python object `{found.group(1)}`"
        if found
        else "it holds unsupported pickle content"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# Voice files (safetensors)

_VOICE_REQUIRED = (
    "t3.speaker_emb",
    "t3.cond_prompt_speech_tokens",
    "t3.emotion_adv",
    "gen.prompt_token",
    "gen.prompt_token_len",
    "gen.prompt_feat",
    "gen.embedding",
)
_VOICE_OPTIONAL = ("gen.prompt_feat_len",)


def save_voice(path: str | Path, conds: Conditionals, metadata: dict[str, str]) -> Path:
    """Write a voice file (see module docstring). Atomic: a reader never sees a half-written file."""
    path = Path(path)
    if conds.t3.cond_prompt_speech_tokens is None:
        raise ValueError("a voice file needs t3.cond_prompt_speech_tokens")
    if bad := [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]:
        raise ValueError(f"voice metadata must map str to str; bad entries: {bad}")
    validate_conditionals(conds, str(path), error=ChatterboxError, dims=_dims_of(conds))
    c = conds.to("cpu")
    tensors = {
        "t3.speaker_emb": c.t3.speaker_emb,
        "t3.cond_prompt_speech_tokens": c.t3.cond_prompt_speech_tokens,
        "t3.emotion_adv": c.t3.emotion_adv,
        "gen.prompt_token": c.gen.prompt_token,
        "gen.prompt_token_len": c.gen.prompt_token_len,
        "gen.prompt_feat": c.gen.prompt_feat,
        "gen.embedding": c.gen.embedding,
    }
    if c.gen.prompt_feat_len is not None:
        tensors["gen.prompt_feat_len"] = c.gen.prompt_feat_len
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    header = {**metadata, "format": VOICE_FORMAT, "format_version": str(VOICE_FORMAT_VERSION)}
    return write_safetensors_atomic(tensors, path, header)


def _dims_of(conds: Conditionals) -> CondDims:
    # Saving accepts whatever sizes the producing model had; loading checks them against the target model.
    return CondDims(
        speaker_emb=conds.t3.speaker_emb.shape[-1],
        xvector=conds.gen.embedding.shape[-1],
        n_mels=conds.gen.prompt_feat.shape[-1],
    )


def load_voice(path: str | Path, dims: CondDims = CondDims()) -> tuple[Conditionals, dict[str, str]]:
    """Read a voice file written by `save_voice`; returns CPU conditionals and the header metadata."""
    path = Path(path)
    if not path.is_file():
        raise ChatterboxError(
            f"voice file {path} does not exist; check the path or prepare it again from a clip."
        )
    redo = "prepare the voice again from its clip (--voice clip.wav)"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            names = set(f.keys())
            if metadata.get("format") != VOICE_FORMAT:
                raise ChatterboxError(
                    f"{path} is not a chatterbox-cli voice file (format {metadata.get('format')!r}, expected "
                    f"{VOICE_FORMAT!r}); {redo}."
                )
            version = metadata.get("format_version", "")
            if not version.isdigit() or int(version) > VOICE_FORMAT_VERSION:
                raise ChatterboxError(
                    f"{path} is voice format version {version!r}; this chatterbox-cli reads versions up to "
                    f"{VOICE_FORMAT_VERSION}. Upgrade chatterbox-cli or {redo}."
                )
            if missing := [k for k in _VOICE_REQUIRED if k not in names]:
                raise ChatterboxError(f"{path} lacks tensors {missing}; the file is damaged, {redo}.")
            if unknown := sorted(names - set(_VOICE_REQUIRED) - set(_VOICE_OPTIONAL)):
                raise ChatterboxError(f"{path} holds unexpected tensors {unknown}; {redo}.")
            t = {k: f.get_tensor(k) for k in names}
    except SafetensorError as e:
        raise ChatterboxError(f"{path} is not a readable voice file ({_first_line(e)}); {redo}.") from e
    conds = Conditionals(
        T3Cond(t["t3.speaker_emb"], t["t3.cond_prompt_speech_tokens"], t["t3.emotion_adv"]),
        GenCond(
            t["gen.prompt_token"],
            t["gen.prompt_token_len"],
            t["gen.prompt_feat"],
            t["gen.embedding"],
            t.get("gen.prompt_feat_len"),
        ),
    )
    validate_conditionals(conds, str(path), dims, ChatterboxError)
    return conds, metadata
