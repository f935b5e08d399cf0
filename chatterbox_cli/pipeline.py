"""Text chunks in, audio chunks out: tokenize, decode speech tokens with T3, render them with S3Gen.

`synthesize` is a generator, so a caller can write each chunk while the next one is computed. Every
chunk is seeded from the run's seed and the chunk's index alone, so a run that resumes at chunk k (after
an interruption or an out-of-memory step-down) produces the same audio for k, k+1, ... as an unbroken run.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from chatterbox_cli.audio import crossfade, fade_edges, join_pause
from chatterbox_cli.errors import UsageError
from chatterbox_cli.languages import LANGUAGES, find_language
from chatterbox_cli.models.conds import S3_CODEBOOK_SIZE, S3GEN_SILENCE_TOKEN, Conditionals
from chatterbox_cli.models.s3gen import FLOW_TOKEN_BLOCK, S3Gen, flow_batch_rows
from chatterbox_cli.models.sampling import SamplingSettings
from chatterbox_cli.models.t3 import T3, T3Config
from chatterbox_cli.models.tokenizer import CheckpointTokenizer, TextTokenizer
from chatterbox_cli.text import DEFAULT_MAX_TOKENS, strip_unspeakable
from chatterbox_cli.variants import Variant

SAMPLE_RATE = 24_000
MAX_SEED = 2**63 - 1
# Early audio: the first chunk's first `early_tokens` speech tokens (presets.Preset.early_tokens) are
# rendered while T3 goes on; the last EARLY_LOOKAHEAD of them wait for the whole chunk (the flow looks at
# context on both sides), and the early piece hands over to the whole-chunk rendering with a CROSSFADE_MS
# crossfade.
EARLY_LOOKAHEAD = 8
CROSSFADE_MS = 20.0


# The settings whose default is the variant's (variants.Generation)
VARIANT_DEFAULTS = (
    "exaggeration",
    "cfg_weight",
    "top_p",
    "min_p",
    "top_k",
    "repetition_penalty",
    "flow_steps",
)


class SpeechModel(Protocol):
    """What the pipeline needs of a loaded model (service.LoadedModel provides it)."""

    t3: T3
    s3gen: S3Gen
    tokenizer: CheckpointTokenizer

    @property
    def variant(self) -> Variant: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def flow_dtype(self) -> torch.dtype: ...

    def use(self, part: str) -> None: ...


@dataclass(frozen=True)
class SynthesisSettings:
    """Everything that changes the audio of a text. None: the model variant's own default (the
    reference's; variants.Generation), filled in by `for_variant`."""

    exaggeration: float | None = None
    cfg_weight: float | None = None
    temperature: float = 0.8
    top_p: float | None = None
    min_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    language: str | None = None  # a code of languages.LANGUAGES; None: English, or detected (jobs)
    seed: int | None = None  # None: a random seed per run (see `with_seed`)
    flow_steps: int | None = None
    max_tokens: int = 1000  # speech tokens per chunk (25 per second of audio)
    pause_seconds: float = 0.1  # silence between chunks
    chunk_tokens: int = DEFAULT_MAX_TOKENS  # text tokens per chunk at most

    def __post_init__(self) -> None:
        def given(value: float | None, neutral: float) -> float:
            return neutral if value is None else value

        SamplingSettings(  # validates the sampling settings given
            temperature=self.temperature,
            min_p=given(self.min_p, 0.0),
            top_p=given(self.top_p, 1.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            top_k=int(given(self.top_k, 0)),
        )
        if self.language is not None:
            object.__setattr__(self, "language", find_language(self.language).code)  # "FR" -> "fr"
        if not 0.0 <= given(self.exaggeration, 0.5) <= 10.0:
            raise UsageError(
                f"exaggeration must be between 0 and 10 (0.5 is neutral), got {self.exaggeration}"
            )
        if not 0.0 <= given(self.cfg_weight, 0.0) < math.inf:
            raise UsageError(
                f"cfg_weight must be a finite number >= 0 (0 turns guidance off), got {self.cfg_weight}"
            )
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= given(self.flow_steps, 1) <= 100:
            raise UsageError(
                f"--flow-steps must be between 1 and 100 (the model's default: 10, Turbo 2), got "
                f"{self.flow_steps}"
            )
        if self.max_tokens < 1:
            raise UsageError(
                f"--max-tokens must be >= 1 (1000 is about 40 s of speech), got {self.max_tokens}"
            )
        if not 0.0 <= self.pause_seconds <= 10.0:
            raise UsageError(f"--pause must be between 0 and 10 seconds, got {self.pause_seconds}")
        if self.chunk_tokens < 8:
            raise UsageError(f"chunk_tokens must be >= 8, got {self.chunk_tokens}")

    def ignored_by(self, variant: Variant) -> list[str]:
        """The settings given (not left to the variant) that `variant` has no input for (Turbo: guidance,
        min-p, exaggeration), as option names."""
        ignored = variant.generation.ignored
        return ["--" + name.replace("_", "-") for name in ignored if getattr(self, name) is not None]

    def for_variant(self, variant: Variant) -> SynthesisSettings:
        """These settings with the variant's defaults filled in where they were left to it, and the
        settings it has no input for at their neutral value (0)."""
        g = variant.generation
        filled = {name: getattr(g, name) for name in VARIANT_DEFAULTS if getattr(self, name) is None}
        neutral = dict.fromkeys(g.ignored, 0.0)
        return replace(self, **{**filled, **neutral})

    def sampling(self, variant: Variant) -> SamplingSettings:
        """T3's sampling under `variant` (its defaults where these settings leave them open)."""
        s = self.for_variant(variant)
        return SamplingSettings(
            temperature=s.temperature,
            min_p=float(s.min_p),  # type: ignore[arg-type]  # filled by for_variant
            top_p=float(s.top_p),  # type: ignore[arg-type]
            repetition_penalty=float(s.repetition_penalty),  # type: ignore[arg-type]
            top_k=int(s.top_k),  # type: ignore[arg-type]
            penalty_last=variant.generation.penalty_last,
        )

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON output and the batch settings hash (seed None means "any seed")."""
        return asdict(self)

    def with_seed(self) -> SynthesisSettings:
        """These settings with a concrete seed: the given one, or a fresh random one."""
        return self if self.seed is not None else replace(self, seed=secrets.randbelow(MAX_SEED))

    def for_item(self, index: int) -> SynthesisSettings:
        """Settings for batch item `index`: its own seed, derived from this run's seed and the index."""
        base = self.with_seed()
        return replace(base, seed=derive_seed(base.seed, "item", index))


def derive_seed(seed: int | None, *keys: object) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (stable across runs, platforms and versions)."""
    material = "/".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & MAX_SEED


@dataclass
class AudioChunk:
    index: int
    text: str  # the chunk as the user wrote it
    audio: np.ndarray = field(repr=False)  # float32 [n], mono
    sample_rate: int
    speech_tokens: int  # valid speech tokens T3 produced
    dropped_chars: list[str]  # characters of this chunk the tokenizer has no token for
    seed: int
    t3_s: float
    s3gen_s: float
    # False for an early piece of a chunk (see synthesize's early_tokens): more of the same chunk follows
    final: bool = True
    text_tokens: int = 0  # text tokens T3 read for the chunk (its start/stop tokens too); 0 in early pieces

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / self.sample_rate


# --------------------------------------------------------------------------------------------------
# Text preparation


def prepare_chunks(
    tokenizer: TextTokenizer, text: str, chunk_tokens: int = DEFAULT_MAX_TOKENS
) -> tuple[list[str], list[str]]:
    """Chunks of `text` for `synthesize` (cut on `tokenizer.language`'s sentence punctuation), and the
    characters removed because the vocabulary lacks them.

    Raises UsageError when nothing speakable is left.
    """
    kept, dropped = strip_unspeakable(text, tokenizer.speaks)
    try:
        chunks = tokenizer.chunk(kept, chunk_tokens)
    except UsageError as e:
        if dropped:
            raise UsageError(
                f"no text to speak: the tokenizer has no tokens for any of its letters in "
                f"{LANGUAGES[tokenizer.language].name} (dropped: {describe_chars(dropped)}); "
                + ("give English text" if tokenizer.language == "en" else "check --language")
            ) from e
        raise
    return chunks, dropped


def describe_chars(chars: Sequence[str], limit: int = 12) -> str:
    """'😀 (U+1F600), я (U+044F)' for a list of characters, shortened after `limit`."""
    shown = ", ".join(f"{c} (U+{ord(c):04X})" for c in chars[:limit])
    more = len(chars) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def text_tokens(
    tokenizer: TextTokenizer, chunk: str, index: int, config: T3Config
) -> tuple[torch.Tensor, list[str]]:
    """Token ids of the normalized chunk, between T3's start and stop text tokens where the model wraps its
    text (the model's, whatever the tokenizer's vocabulary calls them, as the reference pads them; Turbo's
    is not wrapped), without characters that would become [UNK], and the characters dropped. UsageError
    if T3 has fewer text positions."""
    normalized = tokenizer.normalize(chunk)
    report = tokenizer.encode_report(normalized)
    dropped = [*report.unknown_chars, *[c for c in report.dropped_chars if not c.isspace()]]
    ids = report.ids
    if report.unknown_chars:
        unknown = set(report.unknown_chars)
        ids = tokenizer.encode(" ".join("".join(c for c in normalized if c not in unknown).split()))
    if config.wrap_text:
        ids = [config.start_text_token, *ids, config.stop_text_token]
    tokens = torch.tensor(ids, dtype=torch.long)
    if tokens.numel() > config.text_positions:
        raise UsageError(
            f"chunk {index + 1} has {tokens.numel()} text tokens, more than the model's "
            f"{config.text_positions}; cut the text into shorter sentences"
        )
    return tokens, dropped


# --------------------------------------------------------------------------------------------------
# Synthesis


def to_host(waves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """1-D waveforms on the host in float32, with one copy and one wait for all of them: a group's rows then
    go out together, not one GPU round trip apart."""
    flat = torch.cat([w.detach().reshape(-1) for w in waves]).to("cpu", torch.float32)
    return list(flat.split([w.numel() for w in waves]))


def batch_groups(n: int, batch_size: int) -> list[range]:
    """Consecutive chunk groups decoded together: the first chunk alone (its audio comes out soonest),
    then groups of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = [range(0, min(1, n))] if n else []
    groups += [range(i, min(i + batch_size, n)) for i in range(1, n, batch_size)]
    return groups


@dataclass(frozen=True)
class ChunkRow:
    """One chunk in a decoding group: its text, its index in its own run, and that run's seed (its tokens
    and noise are seeded from these two alone, so rows of different runs can share a group)."""

    text: str
    index: int
    seed: int


def synthesize(
    model: SpeechModel,
    chunks: Sequence[str],
    conds: Conditionals,
    settings: SynthesisSettings,
    *,
    first_index: int = 0,
    batch_size: int = 1,
    fixed_length: Callable[[str], int] | None = None,
    early_tokens: int = 0,
) -> Iterator[AudioChunk]:
    """Yield one AudioChunk per chunk, in order, each as soon as its group is made.

    Chunks are decoded by T3 in groups of `batch_size` (see batch_groups and speak_group). Each chunk
    samples from its own generator, seeded from the run's seed and the chunk's index alone, so a chunk's
    audio does not depend on the batch size, and a run that resumes at chunk k (`first_index=k`, after an
    interruption or an out-of-memory step-down) makes the same audio for k, k+1, ... as an unbroken run.
    `settings.seed` None draws one random seed for this call; pass `settings.with_seed()` to reproduce
    or to resume. `early_tokens` > 0 renders an early piece of chunk 0 (see speak_group).
    """
    settings = settings.with_seed()
    assert settings.seed is not None
    for group in batch_groups(len(chunks), batch_size):
        rows = [ChunkRow(chunks[i], first_index + i, settings.seed) for i in group]
        for _, chunk in speak_group(
            model, rows, conds, settings, fixed_length=fixed_length, early_tokens=early_tokens
        ):
            yield chunk


def speak_group(
    model: SpeechModel,
    rows: Sequence[ChunkRow],
    conds: Conditionals,
    settings: SynthesisSettings,
    *,
    fixed_length: Callable[[str], int] | None = None,
    early_tokens: int = 0,
) -> Iterator[tuple[int, AudioChunk]]:
    """Decode `rows` together in one T3 batch, all in one voice and with one set of settings (their seeds
    aside: each row has its own), and yield (row position, AudioChunk) as audio is made.

    On CUDA, S3Gen renders the group in one batched call. A chunk for which T3 produces no speech tokens
    becomes `pause_seconds` of silence. `fixed_length` (benchmarks: random weights never say stop) makes
    T3 decode exactly fixed_length(chunk) tokens per chunk, ignoring the stop token.

    `early_tokens` > 0: once T3 has `early_tokens` speech tokens of every row that is a run's chunk 0,
    those rows' first tokens are rendered and yielded as early pieces (`final` False) while T3 goes on;
    the piece with the rest of the chunk follows. S3Gen draws its noise from a generator of its own per
    chunk, so the rest is the same audio as without the early piece.
    """
    settings = settings.for_variant(model.variant)
    t3, s3gen, device = model.t3, model.s3gen, model.device
    limit = t3.config.speech_positions - 1
    if settings.max_tokens > limit:
        raise UsageError(f"--max-tokens {settings.max_tokens} is more than this model allows ({limit})")
    sampling = settings.sampling(model.variant)
    # speech tokens stay on the host: S3Gen pads a group's rows there and moves them in one copy
    silence = torch.full((model.variant.generation.trailing_silence,), S3GEN_SILENCE_TOKEN)
    tokenizer = model.tokenizer.for_language(settings.language)
    t3_cond = conds.t3.to(device)
    t3_cond.emotion_adv = torch.full_like(t3_cond.emotion_adv, float(settings.exaggeration))
    gen_cond = conds.gen.to(device, model.flow_dtype)

    def s3gen_generator(row: ChunkRow) -> torch.Generator:  # S3Gen's noise, apart from T3's sampling
        return torch.Generator(device=device).manual_seed(derive_seed(row.seed, "s3gen", row.index))

    texts = [row.text for row in rows]
    prepared = [text_tokens(tokenizer, row.text, row.index, t3.config) for row in rows]
    model.use("t3")  # its turn on the GPU, when T3 and S3Gen take turns (service.LoadedModel.use)
    seeds = [derive_seed(row.seed, "chunk", row.index) for row in rows]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    started = time.perf_counter()
    decoding = t3.start_batch(
        [tokens for tokens, _ in prepared],
        t3_cond,
        max_new_tokens=[fixed_length(c) for c in texts] if fixed_length else settings.max_tokens,
        cfg_weight=settings.cfg_weight,
        sampling=sampling,
        generators=generators,
        ignore_stop=fixed_length is not None,
    )
    # each early row's held-back tail, and where its early piece ends
    early: dict[int, tuple[np.ndarray, int]] = {}
    firsts = [j for j, row in enumerate(rows) if row.index == 0] if early_tokens > 0 else []
    prefixes: dict[int, torch.Tensor] = {}
    pending = list(firsts)
    # exactly early_tokens speech tokens per row (ids past the codebook are dropped, so a few more steps
    # may be needed; the steps for the row that lacks most, since every row decodes them anyway): the
    # early rendering then always has the same shapes (see service.warm_up)
    while pending and not decoding.finished:
        missing = max(early_tokens - len(prefixes.get(j, ())) for j in pending)
        decoding.run(until=decoding.steps + missing)
        for j, tokens in zip(pending, decoding.tokens_of(pending), strict=True):  # on the host
            prefixes[j] = tokens[tokens < S3_CODEBOOK_SIZE][:early_tokens]
        pending = [j for j in pending if j not in decoding.done and len(prefixes[j]) < early_tokens]
    # a row that finished first is rendered whole, soon
    ready = [j for j in firsts if j not in decoding.done and len(prefixes.get(j, ())) == early_tokens]
    if early_tokens <= EARLY_LOOKAHEAD:
        ready = []
    if ready:
        t3_early_s = time.perf_counter() - started
        # Taking turns, S3Gen has a turn of its own for the early pieces while the KV cache waits on the
        # GPU; T3's captured steps replay when T3 is back (its weights never move).
        model.use("s3gen")
        # Early pieces have one shape per number of rows (every run's, see service.warm_up; a server's
        # rounds of N requests): the flow keeps its graph for it.
        wavs = to_host(
            s3gen.synthesize_rows(
                [prefixes[j] for j in ready],
                gen_cond,
                [s3gen_generator(rows[j]) for j in ready],
                n_timesteps=settings.flow_steps,
                keep_graph=True,
                batch_rows=flow_batch_rows(len(ready)) if device.type == "cuda" else 0,
            )
        )
        s3gen_early_s = (time.perf_counter() - started - t3_early_s) / len(ready)
        for j, wav in zip(ready, wavs, strict=True):
            end = (prefixes[j].numel() - EARLY_LOOKAHEAD) * s3gen.samples_per_token
            audio = wav[:end].numpy()
            hold = min(round(SAMPLE_RATE * CROSSFADE_MS / 1000), end // 2)
            piece = fade_edges(audio[: end - hold], SAMPLE_RATE, end=False)
            early[j] = (audio[end - hold :], end)
            yield (
                j,
                AudioChunk(
                    rows[j].index,
                    texts[j],
                    piece,
                    SAMPLE_RATE,
                    0,
                    [],
                    seeds[j],
                    t3_early_s,
                    s3gen_early_s,
                    False,
                ),
            )
        started = time.perf_counter()
        model.use("t3")
    decoding.run()
    speech = [s[s < S3_CODEBOOK_SIZE] for s in decoding.tokens_of(range(len(rows)))]  # a host sync
    del decoding  # its KV cache is not needed by S3Gen (estimate.py counts them apart)
    counts = [int(s.numel()) for s in speech]
    # the variant's trailing silence (Turbo: three of S3Gen's silence tokens) ends each voiced chunk
    speech = [torch.cat((s, silence)) if n else s for s, n in zip(speech, counts, strict=True)]
    t3_s = (time.perf_counter() - started) / len(rows)

    started = time.perf_counter()
    model.use("s3gen")
    voiced = [j for j, n in enumerate(counts) if n > 0]
    if device.type == "cuda" and len(voiced) > 1:
        # One padded flow call for the group (on the CPU row by row is faster: no padding work), padded
        # to a whole block and a bucket of rows so that groups of similar sizes and lengths (a server's
        # rounds) replay one kept graph.
        waves = s3gen.synthesize_rows(
            [speech[j] for j in voiced],
            gen_cond,
            [s3gen_generator(rows[j]) for j in voiced],
            n_timesteps=settings.flow_steps,
            keep_graph=True,
            pad_to=FLOW_TOKEN_BLOCK,
            batch_rows=flow_batch_rows(len(voiced)),
        )
        rendered = dict(zip(voiced, to_host(waves), strict=True))
    else:
        rendered = {}
    group_s3gen_s = time.perf_counter() - started

    for j, row in enumerate(rows):
        started = time.perf_counter()
        if counts[j] == 0:
            audio = join_pause(SAMPLE_RATE, settings.pause_seconds)
        else:
            if j in rendered:
                wav = rendered[j]
            else:
                wav = s3gen.synthesize(
                    speech[j][None],
                    gen_cond,
                    n_timesteps=settings.flow_steps,
                    generator=s3gen_generator(row),
                )[0]
            audio = wav.detach().to("cpu", torch.float32).numpy()
            if j in early:  # the rest of the chunk after its early piece, crossfaded in
                held, end = early[j]
                audio = np.concatenate([crossfade(held, audio[end - len(held) : end]), audio[end:]])
                audio = fade_edges(audio, SAMPLE_RATE, start=False)
            else:
                audio = fade_edges(audio, SAMPLE_RATE)
        s3gen_s = time.perf_counter() - started + group_s3gen_s / len(rows)
        yield (
            j,
            AudioChunk(
                row.index,
                texts[j],
                audio,
                SAMPLE_RATE,
                counts[j],
                prepared[j][1],
                seeds[j],
                t3_s,
                s3gen_s,
                text_tokens=prepared[j][0].numel(),
            ),
        )
