"""pipeline.synthesize on a tiny random checkpoint: chunk order, formats, seeding, resume, edge cases."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from chatterbox_cli import pipeline, service
from chatterbox_cli.errors import UsageError
from chatterbox_cli.models.s3gen import flow_batch_rows
from chatterbox_cli.models.sampling import SamplingSettings
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.variants import ENGLISH, MULTILINGUAL, TURBO

FAST = {"max_tokens": 20, "flow_steps": 2}
SENTENCES = [f"Sentence number {i} is here, and it goes on for a little while with words." for i in range(3)]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: str) -> service.LoadedModel:
    torch.set_num_threads(1)
    return service.load(service.LoadRequest(model=tiny_checkpoint, device="cpu", max_tokens=20))


@pytest.fixture(scope="module")
def conds(loaded: service.LoadedModel):  # noqa: ANN201
    return service.voice(loaded, None, 0.5)


def test_settings_defaults_are_the_variants_own() -> None:
    """Left open, sampling, guidance, exaggeration and flow steps are the variant's (the reference's);
    settings the variant has no input for are at their neutral value, and said so when given."""
    s = SynthesisSettings()
    assert (s.exaggeration, s.cfg_weight, s.top_p, s.min_p, s.top_k, s.flow_steps) == (None,) * 6
    assert s.repetition_penalty is None and s.language is None and s.temperature == 0.8
    english = s.for_variant(ENGLISH)
    assert (english.exaggeration, english.cfg_weight, english.top_p, english.min_p, english.top_k) == (
        0.5,
        0.5,
        1.0,
        0.05,
        0,
    )
    assert (english.repetition_penalty, english.flow_steps) == (1.2, 10)
    assert s.sampling(ENGLISH) == SamplingSettings(0.8, 0.05, 1.0, 1.2, top_k=0, penalty_last=False)
    assert s.for_variant(MULTILINGUAL).repetition_penalty == 2.0
    assert SynthesisSettings(repetition_penalty=1.5).for_variant(MULTILINGUAL).repetition_penalty == 1.5
    turbo = SynthesisSettings(cfg_weight=0.7, top_p=0.8).for_variant(TURBO)
    assert (turbo.cfg_weight, turbo.exaggeration, turbo.min_p) == (0.0, 0.0, 0.0)  # no input for them
    assert (turbo.top_p, turbo.top_k, turbo.repetition_penalty, turbo.flow_steps) == (0.8, 1000, 1.2, 2)
    assert s.sampling(TURBO) == SamplingSettings(0.8, 0.0, 0.95, 1.2, top_k=1000, penalty_last=True)
    assert SynthesisSettings(cfg_weight=0.7, min_p=0.1).ignored_by(TURBO) == ["--cfg-weight", "--min-p"]
    assert SynthesisSettings(cfg_weight=0.7).ignored_by(ENGLISH) == []
    assert SynthesisSettings(language="FR").language == "fr"
    assert (s.seed, s.max_tokens, s.pause_seconds) == (None, 1000, 0.1)
    assert s.to_dict()["seed"] is None and set(s.to_dict()) >= {"temperature", "flow_steps", "pause_seconds"}


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"min_p": 2},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"cfg_weight": -0.1},
        {"flow_steps": 0},
        {"max_tokens": 0},
        {"pause_seconds": -1},
        {"seed": -5},
        {"language": "xx"},
    ],
)
def test_bad_settings_are_usage_errors(bad: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        SynthesisSettings(**bad)


def test_seeds_depend_only_on_seed_and_index() -> None:
    assert pipeline.derive_seed(1, "chunk", 3) == pipeline.derive_seed(1, "chunk", 3)
    assert pipeline.derive_seed(1, "chunk", 3) != pipeline.derive_seed(1, "chunk", 4)
    assert pipeline.derive_seed(1, "chunk", 3) != pipeline.derive_seed(2, "chunk", 3)
    # the scheme is fixed (no Python hash(), which is salted per process): manifests stay reproducible
    expected = int.from_bytes(hashlib.sha256(b"7/chunk/0").digest()[:8], "little") & (2**63 - 1)
    assert pipeline.derive_seed(7, "chunk", 0) == expected == 788816362720226925
    s = SynthesisSettings(seed=9)
    assert s.with_seed() is s and s.for_item(2).seed == pipeline.derive_seed(9, "item", 2)
    assert SynthesisSettings().with_seed().seed is not None


def test_chunks_come_in_order_as_float32_24k(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    settings = SynthesisSettings(seed=3, **FAST)
    out = list(pipeline.synthesize(loaded, SENTENCES, conds, settings))
    assert [c.index for c in out] == [0, 1, 2]
    assert [c.text for c in out] == SENTENCES
    for c in out:
        assert c.audio.dtype == np.float32 and c.audio.ndim == 1 and c.sample_rate == 24_000
        assert 0 < c.speech_tokens <= 20
        assert c.audio.shape[0] == c.speech_tokens * 960  # 2 mel frames per token, 480 samples per frame
        assert np.all(np.isfinite(c.audio)) and np.abs(c.audio).max() <= 1.0
        assert c.audio[0] == 0.0 and c.audio[-1] == 0.0  # faded edges: joins cannot click
        assert c.t3_s > 0 and c.s3gen_s > 0
    assert len({c.seed for c in out}) == 3


def test_same_seed_same_audio_and_resume_reproduces(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    settings = SynthesisSettings(seed=11, **FAST)
    full = list(pipeline.synthesize(loaded, SENTENCES, conds, settings))
    again = list(pipeline.synthesize(loaded, SENTENCES, conds, settings))
    resumed = list(pipeline.synthesize(loaded, SENTENCES[1:], conds, settings, first_index=1))
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)
    assert [c.index for c in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)
    other = next(pipeline.synthesize(loaded, SENTENCES[:1], conds, SynthesisSettings(seed=12, **FAST)))
    assert not np.array_equal(other.audio, full[0].audio)


def test_it_is_a_generator(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    gen = pipeline.synthesize(loaded, SENTENCES * 50, conds, SynthesisSettings(seed=1, **FAST))
    first = next(gen)  # 150 chunks queued, one computed
    assert first.index == 0
    gen.close()


def test_unknown_characters_are_dropped_and_reported(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    chunks, dropped = pipeline.prepare_chunks(loaded.tokenizer, "Hello 😀 world. Привет, friend.")
    assert "😀" in dropped and "П" in dropped
    assert all("😀" not in c and "П" not in c for c in chunks)
    # a chunk given straight to synthesize still speaks, reporting what the tokenizer lacks
    out = next(pipeline.synthesize(loaded, ["Snow ☃ falls."], conds, SynthesisSettings(seed=1, **FAST)))
    assert out.dropped_chars == ["☃"] and out.speech_tokens > 0
    with pytest.raises(UsageError, match="no tokens for any"):
        pipeline.prepare_chunks(loaded.tokenizer, "😀😀 Привет")
    assert "U+1F600" in pipeline.describe_chars(["😀"])


def test_a_chunk_without_speech_tokens_is_silence(tiny_checkpoint: str) -> None:
    # Make T3 only ever choose the stop token or an id outside the S3 codebook (which S3Gen cannot
    # render): rows 6562 (stop) and 6563 get opposite large weights, so one of them wins every step.
    model = service.load(service.LoadRequest(model=tiny_checkpoint, device="cpu"))
    with torch.no_grad():
        head = model.t3.speech_head.weight
        direction = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
        head.zero_()
        head[6562] = 1e3 * direction
        head[6563] = -1e3 * direction
    conds = service.voice(model, None, 0.5)
    settings = SynthesisSettings(seed=0, pause_seconds=0.25, **FAST)
    out = list(pipeline.synthesize(model, SENTENCES[:2], conds, settings))
    assert [c.speech_tokens for c in out] == [0, 0]
    for c in out:
        assert c.audio.shape == (6000,) and not c.audio.any()


def test_max_tokens_beyond_the_model_is_a_usage_error(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    gen = pipeline.synthesize(loaded, SENTENCES, conds, SynthesisSettings(max_tokens=100_000))
    with pytest.raises(UsageError, match="max-tokens"):
        next(gen)


def test_batch_groups_put_the_first_chunk_alone() -> None:
    assert [list(g) for g in pipeline.batch_groups(6, 2)] == [[0], [1, 2], [3, 4], [5]]
    assert [list(g) for g in pipeline.batch_groups(1, 8)] == [[0]]
    assert pipeline.batch_groups(0, 4) == []
    with pytest.raises(ValueError):
        pipeline.batch_groups(3, 0)


def test_batched_decoding_gives_the_audio_of_one_by_one(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    """Chunks share T3 steps in a batch, yet each samples from its own generator: same audio, any batch."""
    texts = [*SENTENCES, "Short one.", "And a final sentence of medium length."]
    settings = SynthesisSettings(seed=3, **FAST)
    one = list(pipeline.synthesize(loaded, texts, conds, settings))
    batched = list(pipeline.synthesize(loaded, texts, conds, settings, batch_size=3))
    assert [c.index for c in batched] == list(range(len(texts)))
    for a, b in zip(one, batched, strict=True):
        assert (a.seed, a.speech_tokens) == (b.seed, b.speech_tokens)
        np.testing.assert_allclose(b.audio, a.audio, atol=1e-5)


def test_fixed_length_decodes_exactly_that_many_tokens(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    settings = SynthesisSettings(seed=1, **FAST)
    lengths = {SENTENCES[0]: 7, SENTENCES[1]: 12}
    chunks = list(
        pipeline.synthesize(loaded, SENTENCES[:2], conds, settings, batch_size=2, fixed_length=lengths.get)
    )
    # T3 decodes exactly 7 and 12 tokens; ids past the S3 codebook (random weights sample some) are dropped
    counts = [c.speech_tokens for c in chunks]
    assert 5 <= counts[0] <= 7 and 10 <= counts[1] <= 12, counts
    assert [c.audio.shape[0] for c in chunks] == [n * 960 for n in counts]


def test_out_of_memory_in_a_batch_halves_it_and_keeps_the_audio(
    tiny_checkpoint: str, loaded: service.LoadedModel, conds, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """The GPU running out of memory (faked at torch's attention: more than one chunk's two CFG rows)
    makes speak() halve the batch and go on from the failed chunk, with the audio of batch 1."""
    texts = [*SENTENCES, "One more sentence to make four chunks."]
    settings = SynthesisSettings(seed=5, **FAST)
    request = service.LoadRequest(model=tiny_checkpoint, device="cpu", max_tokens=20, batch=1)
    expected = list(service.ModelHolder(request).speak(texts, conds, settings))

    attention = torch.nn.functional.scaled_dot_product_attention

    def small_gpu(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        if q.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", small_gpu)
    notes: list[str] = []
    request = service.LoadRequest(model=tiny_checkpoint, device="cpu", max_tokens=20, batch=3)
    holder = service.ModelHolder(request, notes.append)
    got = list(holder.speak(texts, conds, settings))
    assert any("decoding 3 chunks at once at chunk 2; trying 1" in n for n in notes), notes
    assert holder.model.preset == "fp32" and holder.batch_cap == 1  # the batch shrank; the preset stayed
    assert [c.index for c in got] == [0, 1, 2, 3]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.audio, b.audio)


def test_early_piece_then_the_rest_of_the_first_chunk(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    settings = SynthesisSettings(seed=5, **FAST)
    length = {SENTENCES[0]: 40, SENTENCES[1]: 30}.get
    plain = list(pipeline.synthesize(loaded, SENTENCES[:2], conds, settings, fixed_length=length))
    streamed = list(
        pipeline.synthesize(loaded, SENTENCES[:2], conds, settings, fixed_length=length, early_tokens=16)
    )
    assert [(c.index, c.final) for c in streamed] == [(0, False), (0, True), (1, True)]
    early, rest = streamed[0].audio, streamed[1].audio
    hold = round(pipeline.SAMPLE_RATE * pipeline.CROSSFADE_MS / 1000)
    end = early.shape[0] + hold  # the early tokens' audio, less the lookahead
    assert end == (16 - pipeline.EARLY_LOOKAHEAD) * loaded.s3gen.samples_per_token == 8 * 960
    assert early.shape[0] + rest.shape[0] == plain[0].audio.shape[0]
    assert streamed[0].speech_tokens == 0 and streamed[1].speech_tokens == plain[0].speech_tokens
    # after the crossfade, the rest is the whole-chunk rendering; later chunks are untouched
    np.testing.assert_array_equal(rest[hold:], plain[0].audio[end:])
    assert not np.array_equal(rest[:hold], plain[0].audio[end - hold : end])
    np.testing.assert_array_equal(streamed[2].audio, plain[1].audio)
    # a chunk that ends before the early tokens comes whole
    twelve = {SENTENCES[0]: 12}.get
    short = pipeline.synthesize(loaded, SENTENCES[:1], conds, settings, fixed_length=twelve, early_tokens=16)
    assert [c.final for c in short] == [True]


def test_rows_of_different_runs_share_a_group(loaded: service.LoadedModel, conds) -> None:  # noqa: ANN001
    """speak_group decodes chunks of several runs together (the server's batching): each row is seeded by
    its own run's seed and index, so it gets the audio its run makes alone, early pieces included (two
    runs' first chunks render their early pieces in one call)."""
    settings = SynthesisSettings(**FAST)
    length = {SENTENCES[0]: 40, SENTENCES[1]: 30, SENTENCES[2]: 36}.get
    early = {"fixed_length": length, "early_tokens": 16}
    alone = list(pipeline.synthesize(loaded, SENTENCES[:1], conds, replace(settings, seed=11), **early))
    other = list(
        pipeline.synthesize(loaded, SENTENCES[1:], conds, replace(settings, seed=12), fixed_length=length)
    )
    third = list(pipeline.synthesize(loaded, SENTENCES[2:], conds, replace(settings, seed=13), **early))
    rows = [
        pipeline.ChunkRow(SENTENCES[0], 0, 11),
        pipeline.ChunkRow(SENTENCES[2], 1, 12),  # run 12's second chunk
        pipeline.ChunkRow(SENTENCES[2], 0, 13),
    ]
    got = list(pipeline.speak_group(loaded, rows, conds, settings, fixed_length=length, early_tokens=16))
    assert [(j, c.index, c.final) for j, c in got] == [
        (0, 0, False),
        (2, 0, False),
        (0, 0, True),
        (1, 1, True),
        (2, 0, True),
    ]
    expected = [alone[0], third[0], alone[1], other[1], third[1]]
    for (_, chunk), want in zip(got, expected, strict=True):
        assert (chunk.seed, chunk.speech_tokens, chunk.final) == (want.seed, want.speech_tokens, want.final)
        np.testing.assert_allclose(chunk.audio, want.audio, atol=1e-5)


def test_flow_batch_rows_buckets_group_sizes() -> None:
    """Groups of nearby sizes share a flow shape: 1, 2, 4, 8, then multiples of 8, never fewer rows than
    asked and at most 7 blank ones."""
    sizes = range(1, 70)
    buckets = [flow_batch_rows(n) for n in sizes]
    assert sorted(set(buckets)) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72]
    assert all(n <= b < n + 8 for n, b in zip(sizes, buckets, strict=True))
    assert [flow_batch_rows(n) for n in (3, 5, 9, 21, 32)] == [4, 8, 16, 24, 32]
