"""Conditioning data: what T3 and S3Gen need to speak in one voice."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GenCond:
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return GenCond(
            move(self.prompt_token), move(self.prompt_token_len), move(self.prompt_feat), move(self.embedding)
        )


@dataclass
class Conditionals:
    t3: T3Cond
    gen: GenCond

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditionals:
        return Conditionals(self.t3.to(device, dtype), self.gen.to(device, dtype))
