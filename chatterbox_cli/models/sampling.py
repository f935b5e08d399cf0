"""Turning T3 speech logits into the next token: penalties, filters and seeded sampling.

Every processor is a pure function of fixed-shape tensors (no data-dependent shapes, no host syncs), so a
decode step that uses them can be captured in a CUDA graph. Logits are [rows, vocab] and float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from chatterbox_cli.errors import UsageError


@dataclass(frozen=True)
class SamplingSettings:
    """How the next speech token is chosen. Defaults are the reference's English defaults.

    temperature 0 means greedy decoding (argmax after the repetition penalty). `top_k` 0 keeps every token.
    `penalty_last`: the repetition penalty comes after temperature and the filters (Turbo's order) instead
    of before them (English and multilingual).
    """

    temperature: float = 0.8
    min_p: float = 0.05
    top_p: float = 1.0
    repetition_penalty: float = 1.2
    top_k: int = 0
    penalty_last: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < math.inf:
            raise UsageError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise UsageError(
                f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Make every token already in the sequence less likely, once per token however often it occurred.

    `seen` is a bool mask [rows, vocab]. Positive logits are divided by the penalty, negative ones multiplied,
    so the token always moves toward lower probability.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    if temperature == 1.0 or temperature == 0.0:
        return logits
    return logits / temperature


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below `min_p` times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    # The most likely token always survives: its probability equals the max and min_p <= 1.
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the `top_k` most likely tokens (and any tied with the k-th); 0 or k >= vocab keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the most likely tokens whose probabilities sum to at least `top_p`.

    Tokens are removed from the unlikely end while the mass accumulated from that end stays <= 1 - top_p;
    the single most likely token is always kept. top_p = 1 is a no-op (it would only remove tokens whose
    probability is already exactly zero).
    """
    if top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    drop = torch.zeros_like(ascending, dtype=torch.bool).scatter(-1, order, _top_p_drop(ascending, top_p))
    return logits.masked_fill(drop, float("-inf"))


def _top_p_drop(ascending: Tensor, top_p: float) -> Tensor:
    """apply_top_p's rule on logits sorted ascending: which to drop."""
    tail_mass = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = tail_mass <= (1.0 - top_p)
    drop[..., -1] = False
    return drop


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def sample_from_logits(logits: Tensor, generator: Generators = None) -> Tensor:
    """Draw one token per row from softmax(logits). Returns [rows] long.

    Uses the exponential race (argmax of p / E with E ~ Exp(1)), which is exactly what `torch.multinomial`
    does for a single sample, so a seeded generator gives the same tokens as multinomial would — and
    it needs no host sync. `generator` may be one per row: then each row's draw depends on its own
    generator only.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.argmax(probs / _race(probs.shape, probs, generator), dim=-1)


def process_logits(logits: Tensor, seen: Tensor, settings: SamplingSettings) -> Tensor:
    """Repetition penalty, temperature, min_p, top_k, top_p: the reference's order; with `penalty_last`
    (Turbo) the penalty comes last, on the filtered logits (-inf stays -inf)."""
    penalty = settings.repetition_penalty
    if not settings.penalty_last or settings.greedy:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if settings.greedy:
        return logits
    logits = apply_temperature(logits, settings.temperature)
    logits = apply_min_p(logits, settings.min_p)
    logits = apply_top_k(logits, settings.top_k)
    logits = apply_top_p(logits, settings.top_p)
    return apply_repetition_penalty(logits, seen, penalty) if settings.penalty_last else logits


# Candidates beyond top_k that choose_among_top_k keeps: tokens tied with the k-th logit stay, as
# apply_top_k keeps them, unless more than this many tie (impossible for float logits in practice: that
# many of 6,563 16-bit values equal to the bit).
TIE_MARGIN = 64


def _race(shape: torch.Size, like: Tensor, generator: Generators) -> Tensor:
    """Exp(1) draws, one per row and vocabulary entry, from each row's generator (sample_from_logits)."""
    race = torch.empty(shape, dtype=torch.float32, device=like.device)
    if isinstance(generator, Sequence):
        if len(generator) != race.shape[0]:
            raise ValueError(f"{len(generator)} generators for {race.shape[0]} rows")
        for row, gen in zip(race, generator, strict=True):
            row.exponential_(1.0, generator=gen)
    else:
        race.exponential_(1.0, generator=generator)
    return race


def choose_among_top_k(
    logits: Tensor, seen: Tensor, settings: SamplingSettings, generator: Generators = None
) -> Tensor:
    """choose_next_token with a top_k filter, working on the top_k (+ ties) candidates only: one topk
    instead of topk, a sort of the whole vocabulary and a scatter back (Turbo: top_k 1000 of 6,563).

    The same tokens as the whole-vocabulary path for the same generators: the penalty (unless it comes
    last) changes the ranking, so it is applied first; min_p compares p / p_max, which is the same over the
    candidates; top_p accumulates the candidates' mass from the unlikely end, where the whole path's
    tokens outside top_k have probability 0; and the race draws one Exp(1) per vocabulary entry, as
    sample_from_logits does, of which the candidates' are read.
    """
    vocab = logits.shape[-1]
    if not settings.penalty_last:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    logits = apply_temperature(logits, settings.temperature)
    values, index = torch.topk(logits, min(settings.top_k + TIE_MARGIN, vocab), dim=-1)  # descending
    kth = values[:, settings.top_k - 1 : settings.top_k]
    values = values.masked_fill(values < kth, float("-inf"))
    values = apply_min_p(values, settings.min_p)
    if settings.top_p < 1.0:  # the candidates are sorted already
        values = values.masked_fill(_top_p_drop(values.flip(-1), settings.top_p).flip(-1), float("-inf"))
    if settings.penalty_last:
        values = apply_repetition_penalty(values, seen.gather(1, index), settings.repetition_penalty)
    race = _race(logits.shape, logits, generator).gather(1, index)
    return index.gather(1, torch.argmax(torch.softmax(values, dim=-1) / race, dim=-1, keepdim=True))[:, 0]


def choose_next_token(
    logits: Tensor, seen: Tensor, settings: SamplingSettings, generator: Generators = None
) -> Tensor:
    """Pick the next token per row ([rows] long) from raw float logits [rows, vocab]."""
    logits = logits.float()
    if not settings.greedy and 0 < settings.top_k < logits.shape[-1]:
        return choose_among_top_k(logits, seen, settings, generator)
    logits = process_logits(logits, seen, settings)
    if settings.greedy:
        return torch.argmax(logits, dim=-1)
    return sample_from_logits(logits, generator)
