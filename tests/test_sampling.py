from __future__ import annotations

import math

import pytest
import torch

from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.conds import T3Cond
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
from chatterbox_cli.models.t3 import T3, T3Config, random_state_dict
from chatterbox_cli.testing.checkpoint_writer import random_conds

NEG_INF = float("-inf")


def test_defaults_are_the_reference_defaults() -> None:
    s = SamplingSettings()
    assert (s.temperature, s.min_p, s.top_p, s.repetition_penalty) == (0.8, 0.05, 1.0, 1.2)
    assert not s.greedy and SamplingSettings(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.inf},  # logits / inf: every token alike, NaN where one is masked to -inf
        {"temperature": math.nan},
        {"min_p": 1.5},
        {"top_p": 0.0},
        {"top_p": 1.1},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": math.inf},
    ],
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


# -- the reference's order on peaked logits ---------------------------------------------------------
# The reference (chatterbox-tts 0.1.7, T3.inference) applies transformers' RepetitionPenaltyLogitsProcessor,
# then divides by the temperature, then MinPLogitsWarper, then TopPLogitsWarper. The functions below
# restate those processors (transformers' code, min_tokens_to_keep=1) independently of ours.


def ref_repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    score = torch.gather(scores, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, input_ids, score)


def ref_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    tokens_to_remove = probs < min_p * probs.max(dim=-1, keepdim=True).values
    sorted_indices = torch.argsort(scores, descending=True, dim=-1)
    sorted_to_remove = torch.gather(tokens_to_remove, dim=-1, index=sorted_indices)
    sorted_to_remove[..., :1] = False
    return scores.masked_fill(sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove), NEG_INF)


def ref_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative <= (1 - top_p)
    sorted_to_remove[..., -1:] = False
    return scores.masked_fill(sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove), NEG_INF)


def ref_process(
    scores: torch.Tensor, input_ids: torch.Tensor, s: SamplingSettings, order: str = "reference"
) -> torch.Tensor:
    """The reference pipeline; other `order`s are plausible mistakes, to show the inputs tell them apart."""
    if order == "temperature-last":
        scores = ref_top_p(
            ref_min_p(ref_repetition_penalty(scores, input_ids, s.repetition_penalty), s.min_p), s.top_p
        )
        return scores / s.temperature
    scores = ref_repetition_penalty(scores, input_ids, s.repetition_penalty)
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if order == "top-p-first":
        return ref_min_p(ref_top_p(scores, s.top_p), s.min_p)
    return ref_top_p(ref_min_p(scores, s.min_p), s.top_p)


def test_processing_order_on_peaked_logits_by_hand() -> None:
    # penalty 1.2 on the seen tokens 0 and 5: [4.8, 3, 2, 1, 0, -1] -> [4, 3, 2, 1, 0, -1.2]
    # temperature 0.5: [8, 6, 4, 2, 0, -2.4]; p / p_max = exp(l - 8) = [1, .135, .0183, .0025, ...]
    # min_p 0.01 keeps tokens 0, 1, 2; renormalised: [.8668, .1173, .0159]
    # top_p 0.983 drops from the unlikely end while the mass so far <= 0.017: token 2 (.0159) goes.
    # Kept: {0, 1} with probabilities softmax([8, 6]) = [.880797, .119203].
    # (Temperature last would keep {0, 1, 2, 3}; top_p before min_p would keep {0, 1, 2}.)
    logits = torch.tensor([[4.8, 3.0, 2.0, 1.0, 0.0, -1.0]])
    seen = torch.tensor([[True, False, False, False, False, True]])
    settings = SamplingSettings(temperature=0.5, min_p=0.01, top_p=0.983, repetition_penalty=1.2)
    out = process_logits(logits, seen, settings)
    assert torch.isfinite(out).tolist() == [[True, True, False, False, False, False]]
    probs = torch.softmax(out, dim=-1)[0]
    expected = 1 / (1 + math.exp(-2.0))
    assert probs[:2].tolist() == pytest.approx([expected, 1 - expected], rel=1e-6)
    assert out[0, :2].tolist() == pytest.approx([8.0, 6.0], rel=1e-6)


PEAKED_SETTINGS = [
    SamplingSettings(0.8, 0.05, 1.0, 1.2),  # the defaults
    SamplingSettings(0.5, 0.1, 0.9, 1.5),
    SamplingSettings(1.3, 0.02, 0.8, 1.1),
    SamplingSettings(0.8, 0.05, 0.95, 2.0),
    SamplingSettings(0.3, 0.2, 0.7, 1.2),
    SamplingSettings(2.0, 0.01, 0.5, 1.3),
]


@pytest.mark.parametrize("settings", PEAKED_SETTINGS, ids=lambda s: f"t{s.temperature}-m{s.min_p}-p{s.top_p}")
def test_process_logits_equals_the_reference_processors_on_peaked_logits(settings: SamplingSettings) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 24, 8194
    scale = torch.tensor([2.0, 4.0, 8.0])[torch.arange(rows) % 3, None]
    logits = torch.randn(rows, vocab, generator=gen) * scale
    # the sequence so far: mostly among each row's likeliest tokens, some repeated, some random
    top = logits.topk(30, dim=-1).indices
    ids = torch.cat(
        (
            top.gather(1, torch.randint(0, 30, (rows, 40), generator=gen)),
            torch.randint(0, vocab, (rows, 20), generator=gen),
        ),
        dim=1,
    )
    seen = torch.zeros(rows, vocab, dtype=torch.bool).scatter(1, ids, True)

    ours = process_logits(logits, seen, settings)
    ref = ref_process(logits, ids, settings)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.equal(torch.softmax(ours, -1), torch.softmax(ref, -1))
    # the logits are peaked enough that filters remove tokens and the order matters
    kept = torch.isfinite(ref).sum(-1)
    assert (kept < vocab).all() and (kept > 1).any()
    for wrong in ("temperature-last", "top-p-first"):
        if wrong == "top-p-first" and settings.top_p == 1.0:
            continue  # top_p 1 filters nothing, so the two filters commute
        assert not torch.equal(torch.isfinite(ref_process(logits, ids, settings, wrong)), torch.isfinite(ref))


def _reference_decode(
    model: T3, text: torch.Tensor, cond: T3Cond, n: int, w: float, s: SamplingSettings, seed: int
) -> tuple[list[int], list[int]]:
    """The reference's sampling loop (no KV cache): CFG mix, its processors, torch.multinomial.
    Returns the tokens and how many tokens the filters kept at each step."""
    gen = torch.Generator().manual_seed(seed)
    seq = model.prompt_embeds(text[None], cond, 2)
    ids = torch.tensor([[model.config.start_speech_token]])
    kept = []
    for i in range(n):
        logits = model.speech_head(model.tfmr(seq)[:, -1])
        logits = logits[:1] + w * (logits[:1] - logits[1:])
        processed = ref_process(logits, ids, s)
        kept.append(int(torch.isfinite(processed).sum()))
        probs = torch.softmax(processed, dim=-1)
        token = torch.multinomial(probs, 1, generator=gen)
        if int(token) == model.config.stop_speech_token:
            break
        ids = torch.cat((ids, token), dim=1)
        emb = model.speech_emb(token) + model.speech_pos_emb.emb.weight[i + 1]
        seq = torch.cat((seq, emb.expand(2, -1, -1)), dim=1)
    return ids[0, 1:].tolist(), kept


def test_seeded_decoding_with_a_sharpened_speech_head_follows_the_reference_loop() -> None:
    """At the test init scale the speech logits are near flat and no filter removes anything; a speech
    head 40x larger gives logits with a std of about 6, where min_p and top_p cut deep."""
    config = T3Config.tiny()
    state = random_state_dict(config, seed=0)
    state["speech_head.weight"] = state["speech_head.weight"] * 40
    model = T3(config)
    model.load_state_dict(state)
    model.eval()
    t3 = random_conds(0)["t3"]
    cond = T3Cond(t3["speaker_emb"], t3["cond_prompt_speech_tokens"], t3["emotion_adv"])
    text = torch.tensor([255, 284, 18, 84, 28, 2, 172, 9, 0])
    settings = SamplingSettings(temperature=0.5, min_p=0.1, top_p=0.8, repetition_penalty=1.5)
    for seed in (1, 2):
        with torch.inference_mode():
            expected, kept = _reference_decode(model, text, cond, 24, 0.5, settings, seed)
        assert max(kept) < 100  # of 8194: the filters do cut
        got = model.generate(
            text, cond, max_new_tokens=24, cfg_weight=0.5, sampling=settings,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        assert got.tolist() == expected, seed


TOP_K_SETTINGS = [
    SamplingSettings(0.8, 0.0, 0.95, 1.2, top_k=1000, penalty_last=True),  # Turbo's defaults
    SamplingSettings(0.8, 0.05, 1.0, 1.2, top_k=50),
    SamplingSettings(1.2, 0.02, 0.9, 1.5, top_k=200),
    SamplingSettings(0.6, 0.0, 0.8, 1.0, top_k=7, penalty_last=True),
]


@pytest.mark.parametrize(
    "settings", TOP_K_SETTINGS, ids=lambda s: f"k{s.top_k}-p{s.top_p}-last{s.penalty_last}"
)
def test_top_k_candidates_choose_what_the_whole_vocabulary_chooses(settings: SamplingSettings) -> None:
    """choose_next_token's top_k path (the candidates only) against the whole-vocabulary processors and
    sample_from_logits with the same generators: the same token in every row. Row 0 has 40 tokens tied
    with the k-th logit, which both keep. (Tokens tied exactly where top_p cuts are the one case where the
    two may drop different ones: which one goes depends on a sort's order of ties, in the reference too;
    float32 logits tie there with probability about 0.)"""
    from chatterbox_cli.models.sampling import choose_among_top_k

    gen = torch.Generator().manual_seed(1)
    rows, vocab = 64, 6563
    scale = torch.tensor([1.0, 3.0, 6.0, 12.0])[torch.arange(rows) % 4, None]
    logits = torch.randn(rows, vocab, generator=gen) * scale
    logits[0, :40] = logits[0].topk(settings.top_k).values[-1]
    seen = torch.rand(rows, vocab, generator=gen) < 0.02
    whole = process_logits(logits, seen, settings)
    assert (torch.isfinite(whole).sum(-1) < vocab).all()  # the filters cut something in every row
    # with top_p < 1, top_p cuts inside row 0's tie: that row is the documented exception
    first = 0 if settings.top_p == 1.0 else 1
    for seed in range(3):
        gens = [torch.Generator().manual_seed(100 * seed + r) for r in range(rows)]
        expected = sample_from_logits(whole, gens)
        gens = [torch.Generator().manual_seed(100 * seed + r) for r in range(rows)]
        assert torch.equal(choose_among_top_k(logits, seen, settings, gens)[first:], expected[first:])
