from __future__ import annotations

import math

import pytest
import torch

from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.sampling import (
    SamplingSettings,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_p,
    choose_next_token,
    process_logits,
    sample_from_logits,
)

NEG_INF = float("-inf")


def test_defaults_are_the_reference_defaults() -> None:
    s = SamplingSettings()
    assert (s.temperature, s.min_p, s.top_p, s.repetition_penalty) == (0.8, 0.05, 1.0, 1.2)
    assert not s.greedy and SamplingSettings(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"min_p": 1.5}, {"top_p": 0.0}, {"top_p": 1.1}, {"repetition_penalty": 0.0}],
)
def test_invalid_settings_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        SamplingSettings(**kwargs)


def test_repetition_penalty_pushes_seen_tokens_down_once() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_temperature_scales_and_zero_or_one_is_identity() -> None:
    logits = torch.tensor([[1.0, 2.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[2.0, 4.0]]
    assert apply_temperature(logits, 1.0) is logits


def test_min_p_keeps_tokens_above_scaled_threshold() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_min_p(probs.log(), 0.2)  # threshold 0.1
    assert torch.isfinite(out[0, :3]).all() and out[0, 3] == NEG_INF
    assert torch.equal(apply_min_p(probs.log(), 0.0), probs.log())


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    out = apply_top_p(probs.log(), 0.7)  # 0.5 + 0.25 reaches 0.7
    assert torch.isfinite(out[0, [1, 2]]).all()
    assert (out[0, [0, 3]] == NEG_INF).all()
    tiny = apply_top_p(probs.log(), 1e-9)  # only the argmax survives
    assert torch.isfinite(tiny).sum() == 1 and torch.isfinite(tiny[0, 1])
    assert torch.equal(apply_top_p(probs.log(), 1.0), probs.log())


def test_sampling_equals_torch_multinomial_for_the_same_generator() -> None:
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i in range(50):
        logits = torch.randn(1, 8194, generator=torch.Generator().manual_seed(i)) * 3
        expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=b)[:, 0]
        assert torch.equal(sample_from_logits(logits, a), expected)


def test_sampling_follows_the_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None].expand(20000, -1)
    counts = torch.bincount(sample_from_logits(logits, gen), minlength=3).float() / 20000
    assert torch.allclose(counts, probs, atol=0.015)


def test_filtered_tokens_are_never_sampled() -> None:
    logits = torch.zeros(1, 10)
    seen = torch.zeros(1, 10, dtype=torch.bool)
    logits[0, 3] = 5.0
    settings = SamplingSettings(temperature=1.0, min_p=0.5, top_p=1.0, repetition_penalty=1.0)
    gen = torch.Generator().manual_seed(1)
    assert {int(choose_next_token(logits, seen, settings, gen)) for _ in range(50)} == {3}


def test_greedy_is_argmax_after_penalty() -> None:
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.2)
    assert int(choose_next_token(logits, seen, settings)) == 1
    assert math.isclose(process_logits(logits, seen, settings)[0, 0].item(), 2.5, rel_tol=1e-6)
