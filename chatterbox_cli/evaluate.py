"""`chatterbox eval`: how far a preset's outputs are from a reference precision's, on one fixed text set.

The reference side is loaded first (through the service, as `synthesize` loads it), decodes each text with
seeded generators, and keeps what the other side is measured against; then it is freed and the preset
under test is loaded the same way (one after the other: both at once may not fit a small GPU) and given
the same inputs:

  T3      the reference's speech tokens, teacher-forced (T3.forward) with the built-in voice: KL(ref || test)
          of the next-token distributions, mean over positions, and top-1 agreement (same argmax). The
          compared logits are the *guided* ones decoding samples from, combine_cfg(cond, uncond) with the
          variant's guidance weight (forward(cfg=True) runs the unconditional row beside the conditional
          one), softmax at temperature 1, before any sampling filter. Turbo has no guidance: its
          conditional row.
  S3Gen   the same tokens (the ids S3Gen takes, < 6561) rendered from the same start noise (drawn in fp32
          from one seed, cast to the flow's dtype) and the same vocoder noise: mel L1 (mean absolute
          difference of the log-mels) and waveform SNR, 10 log10(sum ref^2 / sum (ref - test)^2) dB.
  voice   cosine of the VoiceEncoder speaker embeddings of the two waveforms (fp32, resampled to 16 kHz).

Teacher forcing feeds the start-of-speech token once (T3.forward), where decoding's prompt has it
`prompt_start_tokens` times (T3.prompt_embeds): the logits differ a little from decoding's, identically on
both sides. The reference by default is fp16 on a GPU and fp32 on the CPU (`default_against`); `fp32`
loads the checkpoint's own precision on either device. These figures depend on the weights (CAVEAT).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from chatterbox_cli import oom, presets, service
from chatterbox_cli.errors import OutOfMemoryError, UsageError
from chatterbox_cli.models.conds import S3_CODEBOOK_SIZE, Conditionals
from chatterbox_cli.models.t3 import combine_cfg
from chatterbox_cli.pipeline import SAMPLE_RATE, SynthesisSettings, derive_seed, text_tokens

if TYPE_CHECKING:
    from chatterbox_cli.models.voice_encoder import VoiceEncoder
    from chatterbox_cli.service import LoadedModel, LoadRequest

Notify = Callable[[str], None]

SCHEMA_VERSION = 1
FP32 = service.CPU_PRESET  # "fp32": the checkpoint's own precision, on the CPU or a GPU
DEFAULT_MAX_TOKENS = 150  # speech tokens per text (6 s); random weights never say stop
CAVEAT = (
    "these figures depend on the weights: with random weights (no outlier structure) they rank methods "
    "only roughly; with the official weights they are the real figures"
)
LOGITS = "guided (cond + w * (cond - uncond)), softmax at temperature 1"

# Short and long, plain and punctuated; every one fits a tiny test model's 256 text positions.
TEXTS = (
    "Hello.",
    "The quick brown fox jumps over the lazy dog.",
    "Did you remember to turn off the oven before we left the house this morning?",
    "What a wonderful surprise! I never expected to see all of you here tonight.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The meeting has been moved to half past three on Thursday, in the small room on the second floor.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness.",
    "When the storm finally passed, the villagers walked down to the shore to see what the waves had left "
    "behind: broken boats, tangled nets, and, half buried in the sand, an old wooden chest that nobody had "
    "ever seen before.",
)


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# Report


def _number(x: float | None) -> float | None:
    """A JSON number: None for a missing figure or a non-finite one (an infinite SNR: identical audio)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass
class TextRow:
    """One text's figures; the S3Gen and voice ones are None when T3 gave no speech tokens to render."""

    index: int
    speech_tokens: int  # tokens S3Gen rendered (< 6561)
    positions: int  # teacher-forced positions compared
    kl: float  # mean over positions, nats
    top1: float  # fraction of positions with the same argmax
    mel_l1: float | None
    snr_db: float | None  # inf: identical waveforms
    cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: _number(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class Summary:
    """Every text together: KL and top-1 over all positions, mel L1 over all mel values, SNR over all
    samples (not a mean of dBs), cosine mean and minimum over texts."""

    positions: int
    kl: float
    top1: float
    mel_l1: float | None
    snr_db: float | None
    cosine: float | None
    cosine_min: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: _number(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class Side:
    """How one side ran: its preset, T3's and the flow's dtypes, and its seconds (loading apart)."""

    preset: str
    dtype: str
    flow_dtype: str
    load_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "load_seconds": round(self.load_seconds, 3),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class PresetResult:
    side: Side
    rows: list[TextRow]
    summary: Summary

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.side.to_dict(),
            "summary": self.summary.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass
class EvalReport:
    model: str
    checkpoint: str
    variant: str
    device: str
    seed: int
    max_tokens: int
    cfg_weight: float
    flow_steps: int
    texts: list[str]
    reference: Side
    results: list[PresetResult]  # one per preset under test (several with --preset all)
    skipped: dict[str, str] = field(default_factory=dict)  # preset -> why it could not run here
    seconds: float = 0.0

    @property
    def rows(self) -> list[TextRow]:
        return self._only().rows

    @property
    def summary(self) -> Summary:
        return self._only().summary

    def _only(self) -> PresetResult:
        if len(self.results) != 1:
            raise ValueError(f"{len(self.results)} presets were evaluated; read .results")
        return self.results[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "variant": self.variant,
            "device": self.device,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "cfg_weight": self.cfg_weight,
            "flow_steps": self.flow_steps,
            "logits": LOGITS if self.cfg_weight > 0 else "conditional, softmax at temperature 1",
            "texts": self.texts,
            "reference": self.reference.to_dict(),
            "results": [r.to_dict() for r in self.results],
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "caveat": CAVEAT,
        }


# --------------------------------------------------------------------------------------------------
# Choosing the sides


def default_against(device: torch.device) -> str:
    """The reference when none is named: fp16 on a GPU (what `synthesize` runs there at best; bf16 where
    the GPU supports it), fp32 on the CPU (the checkpoint's own precision, what the CPU runs)."""
    return "fp16" if device.type == "cuda" else FP32


def check_runs(name: str, device: torch.device) -> None:
    """UsageError unless side `name` (fp32 or a preset) can run on `device`: unknown and unavailable
    presets, and bitsandbytes presets where bitsandbytes cannot quantize on that device."""
    if name == FP32:
        return
    preset = presets.get_preset(name)
    if any(mode in ("int8", "nf4") for mode in preset.modes.values()):
        from chatterbox_cli.quant.bnb import QuantizationError, require_bitsandbytes

        try:
            require_bitsandbytes(device)
        except QuantizationError as e:
            raise UsageError(f"--preset {name} cannot run on {device}: {e}") from e


def presets_under_test(preset: str, against: str, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The presets to evaluate and those skipped with why: `preset` alone (a UsageError if it cannot run
    here), or with `all` every available preset but the reference that runs on `device`."""
    if preset != "all":
        check_runs(preset, device)
        return [preset], {}
    chosen, skipped = [], {}
    for name in presets.preset_names():
        if name == against:
            continue
        try:
            check_runs(name, device)
        except UsageError as e:
            skipped[name] = str(e)
            continue
        chosen.append(name)
    if not chosen:
        raise UsageError(f"no preset other than {against} can run on {device}: {'; '.join(skipped.values())}")
    return chosen, skipped


def _load(base: LoadRequest, name: str, notify: Notify) -> LoadedModel:
    """Side `name` through the service, without fallback: a preset as `synthesize --preset` loads it,
    fp32 with the checkpoint's own precision on the request's device."""
    request = replace(base, preset=name)
    decision = None
    if name == FP32:
        device = service.resolve_device(base.device)
        reason = f"{FP32}: the checkpoint's own precision on {device}"
        decision = service.Decision(device, FP32, torch.float32, reason, None, None)
    return service.ModelHolder(request, notify, decision).model


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class _Text:
    """What the reference keeps of one text (CPU): its tokens, log-probabilities, mel, audio, voice."""

    text: torch.Tensor  # text tokens [T]
    speech: torch.Tensor  # decoded speech tokens [n], start and stop excluded
    logp: torch.Tensor  # [n + 1, V] fp32 log-probabilities of the guided logits
    mel: torch.Tensor | None  # [80, 2m] fp32 (m voiced tokens); None without any
    wav: np.ndarray | None  # [960 m] fp32 at 24 kHz
    embedding: torch.Tensor | None  # [256] speaker embedding


def _log_probs(
    model: LoadedModel, text: torch.Tensor, speech: torch.Tensor, cond: Conditionals, w: float
) -> torch.Tensor:
    """Teacher-forced next-token log-probabilities [n + 1, V] (fp32, CPU) of `speech` after the start token:
    the guided logits with guidance weight `w` > 0, else the conditional row."""
    t3, device = model.t3, model.device
    start = torch.tensor([t3.config.start_speech_token])
    sequence = torch.cat((start, speech))[None].to(device)
    model.use("t3")
    with torch.inference_mode():
        logits = t3(text[None].to(device), sequence, cond.t3, cfg=w > 0).speech_logits
        if w > 0:
            logits = combine_cfg(logits, w)  # in T3's dtype, as decoding combines them
        return torch.log_softmax(logits[0].float(), dim=-1).cpu()


def _render(
    model: LoadedModel, tokens: torch.Tensor, cond: Conditionals, steps: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Mel [80, 2n] and faded waveform [960 n] (fp32, CPU) of voiced tokens [n], as S3Gen.synthesize makes
    them, with its start noise drawn in fp32 (the same numbers whatever the flow's dtype) from `seed`, and
    the vocoder's noise from the same generator after it."""
    from chatterbox_cli.models.s3gen.s3gen import MEL_FRAMES_PER_TOKEN, trim_fade

    s3gen, device = model.s3gen, model.device
    gen = cond.gen.to(device, model.flow_dtype)
    n = tokens.numel()
    generator = torch.Generator(device).manual_seed(seed)
    frames = MEL_FRAMES_PER_TOKEN * (gen.prompt_token.shape[1] + n)
    noise = torch.randn((1, s3gen.flow.config.mel_dim, frames), generator=generator, device=device)
    lengths = torch.tensor([n])
    model.use("s3gen")
    with torch.inference_mode():
        mel = s3gen.tokens_to_mel(tokens[None].to(device), gen, lengths, steps, noise=noise)
        wav = s3gen.mel_to_wav(mel, generator, lengths.to(device) * MEL_FRAMES_PER_TOKEN)[0]
        fade = trim_fade(device=wav.device)
        k = min(fade.numel(), wav.numel())
        wav = torch.cat((wav[:k] * fade[:k], wav[k:]))
    return mel[0].float().cpu(), wav.float().cpu().numpy()


def _embedding(ve: VoiceEncoder, wav: np.ndarray) -> torch.Tensor:
    return ve.embeds_from_wavs([wav], SAMPLE_RATE)[0].float().cpu()


def _timed_side(model: LoadedModel, name: str, seconds: float) -> Side:
    return Side(
        name,
        str(model.dtype).removeprefix("torch."),
        str(model.flow_dtype).removeprefix("torch."),
        model.load_seconds,
        seconds,
    )


def _reference(
    model: LoadedModel,
    ve: VoiceEncoder,
    texts: Sequence[str],
    cond: Conditionals,
    settings: SynthesisSettings,
    seed: int,
    notify: Notify,
) -> list[_Text]:
    """Decode every text with the reference (its own generator per text) and keep what is compared."""
    t3, device = model.t3, model.device
    tokenizer = model.tokenizer.for_language(settings.language)
    sampling = settings.sampling(model.variant)
    w = float(settings.cfg_weight or 0.0)
    kept = []
    for i, chunk in enumerate(texts):
        text, _ = text_tokens(tokenizer, chunk, i, t3.config)
        model.use("t3")
        generator = torch.Generator(device).manual_seed(derive_seed(seed, "eval", "t3", i))
        speech = t3.generate(
            text,
            cond.t3.to(device),
            max_new_tokens=settings.max_tokens,
            cfg_weight=w,
            sampling=sampling,
            generator=generator,
        ).cpu()
        logp = _log_probs(model, text, speech, cond, w)
        voiced = speech[speech < S3_CODEBOOK_SIZE]
        mel = wav = embedding = None
        if voiced.numel():
            mel, wav = _render(
                model, voiced, cond, int(settings.flow_steps or 0), derive_seed(seed, "eval", "s3gen", i)
            )
            embedding = _embedding(ve, wav)
        kept.append(_Text(text, speech, logp, mel, wav, embedding))
        notify(f"reference: text {i + 1}/{len(texts)}, {voiced.numel()} speech tokens")
    return kept


def _snr_db(signal: float, error: float) -> float:
    if error == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / error) if signal > 0 else -math.inf


def _compare(
    model: LoadedModel,
    ve: VoiceEncoder,
    reference: Sequence[_Text],
    cond: Conditionals,
    settings: SynthesisSettings,
    seed: int,
    notify: Notify,
) -> tuple[list[TextRow], Summary]:
    """The preset under test on the reference's tokens and noise, text by text, and the figures."""
    w = float(settings.cfg_weight or 0.0)
    rows = []
    positions = agree = 0
    kl_sum = abs_sum = signal = error = 0.0
    mel_values = 0
    cosines = []
    for i, ref in enumerate(reference):
        logp = _log_probs(model, ref.text, ref.speech, cond, w)
        kl = F.kl_div(logp, ref.logp, reduction="none", log_target=True).sum(dim=-1).double()
        same = (logp.argmax(dim=-1) == ref.logp.argmax(dim=-1)).sum().item()
        n = ref.logp.shape[0]
        positions, agree, kl_sum = positions + n, agree + int(same), kl_sum + kl.sum().item()
        mel_l1 = snr = cosine = None
        voiced = ref.speech[ref.speech < S3_CODEBOOK_SIZE]
        if ref.mel is not None and ref.wav is not None and ref.embedding is not None:
            mel, wav = _render(
                model, voiced, cond, int(settings.flow_steps or 0), derive_seed(seed, "eval", "s3gen", i)
            )
            diff = (mel.double() - ref.mel.double()).abs()
            mel_l1 = diff.mean().item()
            abs_sum, mel_values = abs_sum + diff.sum().item(), mel_values + diff.numel()
            s = float(np.sum(ref.wav.astype(np.float64) ** 2))
            e = float(np.sum((ref.wav.astype(np.float64) - wav.astype(np.float64)) ** 2))
            signal, error, snr = signal + s, error + e, _snr_db(s, e)
            cosine = F.cosine_similarity(_embedding(ve, wav), ref.embedding, dim=0).item()
            cosines.append(cosine)
        rows.append(TextRow(i, int(voiced.numel()), n, kl.mean().item(), same / n, mel_l1, snr, cosine))
        notify(f"test: text {i + 1}/{len(reference)}, KL {kl.mean().item():.3g}, top-1 {same / n:.3f}")
    summary = Summary(
        positions,
        kl_sum / positions,
        agree / positions,
        abs_sum / mel_values if mel_values else None,
        _snr_db(signal, error) if mel_values else None,
        sum(cosines) / len(cosines) if cosines else None,
        min(cosines) if cosines else None,
    )
    return rows, summary


def _measure(
    base: LoadRequest,
    name: str,
    ve: VoiceEncoder,
    reference: Sequence[_Text],
    cond: Conditionals,
    settings: SynthesisSettings,
    seed: int,
    notify: Notify,
) -> PresetResult:
    """Load side `name`, compare it with the reference, and let it go (its memory is freed by the caller)."""
    model = _load(base, name, notify)
    started = time.perf_counter()
    rows, summary = _compare(model, ve, reference, cond, settings, seed, notify)
    return PresetResult(_timed_side(model, name, time.perf_counter() - started), rows, summary)


# --------------------------------------------------------------------------------------------------
# The job


def read_texts(path: str) -> list[str]:
    """Texts from a UTF-8 file, one per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read --texts {path}: {e.strerror or e}") from e
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise UsageError(f"--texts {path} has no text; write one text per line")
    return texts


def evaluate(
    model: str,
    preset: str,
    against: str | None = None,
    device: str = "auto",
    texts: Sequence[str] | None = None,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    notify: Notify = _quiet,
    *,
    variant: str | None = None,
    revision: str | None = None,
    allow_download: bool = True,
) -> EvalReport:
    """Measure `preset` (or `all`) against the reference precision `against` (None: `default_against`)
    on `texts` (None: TEXTS), each decoded to at most `max_tokens` speech tokens with seeds derived from
    `seed`. See the module's docstring for what is compared."""
    from chatterbox_cli.models.voice_encoder import load_voice_encoder
    from chatterbox_cli.service import LoadRequest

    started = time.perf_counter()
    where = service.resolve_device(device)
    against = against or default_against(where)
    if against == "all":
        raise UsageError("--against takes one precision (fp32 or a preset), not all")
    check_runs(against, where)
    tested, skipped = presets_under_test(preset, against, where)
    texts = list(TEXTS if texts is None else texts)
    if not texts:
        raise UsageError("no texts to evaluate")
    settings = SynthesisSettings(
        language="en", seed=seed, max_tokens=max_tokens
    )  # checks seed and max_tokens
    base = LoadRequest(
        model=model,
        revision=revision,
        device=str(where),
        variant=variant,
        max_tokens=max_tokens,
        batch=1,
        allow_download=allow_download,
        fallback=False,
    )

    notify(f"reference: loading {against} on {where}")
    ref_model = _load(base, against, notify)
    checkpoint, variant_ = ref_model.checkpoint, ref_model.variant
    settings = settings.for_variant(variant_)
    limit = ref_model.t3.config.speech_positions - 2
    if max_tokens > limit:
        raise UsageError(f"--max-tokens {max_tokens} is more than this model allows ({limit})")
    cond = service.voice(ref_model, None, float(settings.exaggeration or 0.0))
    ve = load_voice_encoder(checkpoint.file("ve"), where, torch.float32)
    t = time.perf_counter()
    reference = _reference(ref_model, ve, texts, cond, settings, seed, notify)
    ref_side = _timed_side(ref_model, against, time.perf_counter() - t)
    del ref_model
    oom.release_cuda()

    results = []
    for name in tested:
        notify(f"test: loading {name} on {where}")
        try:
            results.append(_measure(base, name, ve, reference, cond, settings, seed, notify))
        except Exception as e:
            # with --preset all, a preset that runs out of GPU memory is skipped; the others still count
            if preset != "all" or not (isinstance(e, OutOfMemoryError) or oom.is_out_of_memory(e)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            skipped[name] = f"out of GPU memory: {first}"
            notify(f"skipped {name}: {skipped[name]}")
            oom.forget_frames(e)
        oom.release_cuda()
    return EvalReport(
        model=model,
        checkpoint=str(checkpoint.folder),
        variant=variant_.name,
        device=str(where),
        seed=seed,
        max_tokens=max_tokens,
        cfg_weight=float(settings.cfg_weight or 0.0),
        flow_steps=int(settings.flow_steps or 0),
        texts=texts,
        reference=ref_side,
        results=results,
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# Printing (the CLI's table)

HEADER = ("text", "tokens", "KL (nats)", "top-1", "mel L1", "SNR (dB)", "speaker cos")


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def table_rows(result: PresetResult) -> list[tuple[str, ...]]:
    """One row per text, then the summary row ("all")."""
    rows = [
        (
            str(r.index + 1),
            str(r.speech_tokens),
            _fmt(r.kl, ".3g"),
            _fmt(r.top1, ".3f"),
            _fmt(r.mel_l1, ".4f"),
            _fmt(r.snr_db, ".1f"),
            _fmt(r.cosine, ".4f"),
        )
        for r in result.rows
    ]
    s = result.summary
    tokens = str(sum(r.speech_tokens for r in result.rows))
    summary = (_fmt(s.kl, ".3g"), _fmt(s.top1, ".3f"), _fmt(s.mel_l1, ".4f"), _fmt(s.snr_db, ".1f"))
    rows.append(("all", tokens, *summary, _fmt(s.cosine, ".4f")))
    return rows


def title(report: EvalReport, result: PresetResult) -> str:
    test, ref, n = result.side, report.reference, len(report.texts)
    return (
        f"{test.preset} (T3 {test.dtype}, flow {test.flow_dtype}) against {ref.preset} (T3 {ref.dtype}, "
        f"flow {ref.flow_dtype}) on {report.device}: {n} text{'s' if n != 1 else ''}, seed {report.seed}, "
        f"at most {report.max_tokens} speech tokens each"
    )


def format_plain(report: EvalReport) -> str:
    lines = []
    for result in report.results:
        rows = table_rows(result)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
        lines.append(title(report, result))
        for row in (HEADER, *rows):
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells))
        lines.append("")
    lines += [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    lines.append(f"note: {CAVEAT}")
    return "\n".join(lines)


def print_rich(report: EvalReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for result in report.results:
        table = Table(title=escape(title(report, result)))
        for col in HEADER:
            table.add_column(col, justify="left" if col == "text" else "right", no_wrap=True)
        rows = table_rows(result)
        for row in rows[:-1]:
            table.add_row(*row)
        table.add_row(*(f"[bold]{c}[/bold]" for c in rows[-1]))
        console.print(table)
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped {escape(name)}: {escape(why)}[/yellow]", highlight=False)
    console.print(f"[yellow]note: {escape(CAVEAT)}[/yellow]", highlight=False, soft_wrap=True)
