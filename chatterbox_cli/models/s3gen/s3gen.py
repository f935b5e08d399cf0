"""S3Gen: S3 speech tokens -> 24 kHz waveform (flow + HiFT), and voice preparation (tokenizer, x-vector).

The four submodules carry the official `s3gen.safetensors` prefixes: `tokenizer`, `speaker_encoder`,
`flow`, `mel2wav`. Voice preparation needs only the first two, speaking only the last two, so each
part is built, loaded and freed on its own (`S3Gen.load(..., parts=...)`, `load_parts`, `free`).
Turbo's `s3gen_meanflow.safetensors` is the same layout plus the flow estimator's time mixer
(`MEANFLOW_KEY`); `infer_config` reads which of the two a file is from its header.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from chatterbox_cli.checkpoint import TensorFile
from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.models.conds import GenCond

from .flow import Flow, FlowConfig
from .flow import random_state_dict as flow_random_state_dict

if TYPE_CHECKING:
    from .hifigan import HiFTConfig
    from .speech_tokenizer import SpeechTokenizerConfig
    from .xvector import CAMPPlusConfig

S3GEN_SR = 24_000
S3_SR = 16_000
PARTS = ("tokenizer", "speaker_encoder", "flow", "mel2wav")
VOICE_PARTS = ("tokenizer", "speaker_encoder")
SPEECH_PARTS = ("flow", "mel2wav")
MEL_FRAMES_PER_TOKEN = 2
MEANFLOW_KEY = "flow.decoder.estimator.time_embed_mixer.weight"  # only a mean-flow (Turbo) file has it


# The shapes of a group's flow call on CUDA, so that groups of similar lengths and sizes share one shape and
# one kept graph (a new shape costs a capture, several times a replay): speech tokens padded to a multiple
# of FLOW_TOKEN_BLOCK (0.64 s; at most 15 tokens beside the voice prompt's and the chunk's own), rows to
# flow_batch_rows.
FLOW_TOKEN_BLOCK = 16


def flow_batch_rows(rows: int) -> int:
    """The rows a group's flow call runs with on CUDA (synthesize_rows' batch_rows; the memory estimate
    counts them): 1, 2, 4, 8, then a multiple of 8, blank rows added. A server's rounds change size as
    requests come and go (and as a chunk ends early)."""
    return rows if rows <= 2 else 4 if rows <= 4 else -(-rows // 8) * 8


def _hift_config(size: str) -> HiFTConfig:
    from .hifigan import HiFTConfig

    return getattr(HiFTConfig, size)()


def _tokenizer_config(size: str) -> SpeechTokenizerConfig:
    from .speech_tokenizer import SpeechTokenizerConfig

    return getattr(SpeechTokenizerConfig, size)()


def _xvector_config(size: str) -> CAMPPlusConfig:
    from .xvector import CAMPPlusConfig

    return getattr(CAMPPlusConfig, size)()


@dataclass(frozen=True)
class S3GenConfig:
    flow: FlowConfig = field(default_factory=FlowConfig.english)
    hift: HiFTConfig = field(default_factory=lambda: _hift_config("english"))
    tokenizer: SpeechTokenizerConfig = field(default_factory=lambda: _tokenizer_config("english"))
    xvector: CAMPPlusConfig = field(default_factory=lambda: _xvector_config("english"))

    @classmethod
    def english(cls, meanflow: bool = False) -> S3GenConfig:
        """The official sizes; `meanflow`: Turbo's S3Gen (`s3gen_meanflow.safetensors`)."""
        config = cls()
        return config.with_meanflow() if meanflow else config

    @classmethod
    def tiny(cls, meanflow: bool = False) -> S3GenConfig:
        # keep the official x-vector width (192) so one conds.pt layout serves both sizes
        xvector = replace(_xvector_config("tiny"), embedding_size=FlowConfig.tiny().spk_embed_dim)
        config = cls(
            flow=replace(FlowConfig.tiny(), spk_embed_dim=xvector.embedding_size),
            hift=_hift_config("tiny"),
            tokenizer=_tokenizer_config("tiny"),
            xvector=xvector,
        )
        return config.with_meanflow() if meanflow else config

    @property
    def meanflow(self) -> bool:
        return self.flow.meanflow

    def with_meanflow(self) -> S3GenConfig:
        return replace(self, flow=self.flow.with_meanflow())

    def __post_init__(self) -> None:
        if self.flow.spk_embed_dim != self.xvector.embedding_size:
            raise ValueError(
                f"flow.spk_embed_dim {self.flow.spk_embed_dim} != x-vector size {self.xvector.embedding_size}"
            )


class MeanflowS3GenConfig:
    """`tiny()` / `english()` of Turbo's S3Gen, for code that picks a config by size name (the random
    checkpoint writer): `random_state_dict(MeanflowS3GenConfig.tiny(), seed)`."""

    @staticmethod
    def english() -> S3GenConfig:
        return S3GenConfig.english(meanflow=True)

    @staticmethod
    def tiny() -> S3GenConfig:
        return S3GenConfig.tiny(meanflow=True)


def _build_part(config: S3GenConfig, part: str) -> nn.Module:
    if part == "flow":
        return Flow(config.flow)
    if part == "mel2wav":
        from .hifigan import HiFTGenerator

        return HiFTGenerator(config.hift)
    if part == "tokenizer":
        from .speech_tokenizer import SpeechTokenizer

        return SpeechTokenizer(config.tokenizer)
    if part == "speaker_encoder":
        from .xvector import CAMPPlus

        return CAMPPlus(config.xvector)
    raise UsageError(f"unknown S3Gen part {part!r}; choose from {', '.join(PARTS)}")


def _derived_names(part: str) -> frozenset[str]:
    """Buffers a part computes itself and the official file leaves out (the tokenizer's mel filters)."""
    if part == "tokenizer":
        from .speech_tokenizer import DERIVED_BUFFERS

        return frozenset(DERIVED_BUFFERS)
    return frozenset()


def random_state_dict(config: S3GenConfig, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random fp32 weights for all of S3Gen under the official `s3gen.safetensors` names.

    Like the official file, it leaves out the tokenizer's derived buffers (mel filters, window). A
    mean-flow config gives the same tensors as the plain one with the same seed, plus the time mixer.
    """
    from .hifigan import random_state_dict as hift_random
    from .speech_tokenizer import random_state_dict as tokenizer_random
    from .xvector import random_state_dict as xvector_random

    pieces = {
        "tokenizer": tokenizer_random(config.tokenizer, seed),
        "speaker_encoder": xvector_random(config.xvector, seed + 1),
        "flow": flow_random_state_dict(config.flow, seed + 2),
        "mel2wav": hift_random(config.hift, seed + 3),
    }
    out: dict[str, Tensor] = {}
    for part, sd in pieces.items():
        skip = _derived_names(part)
        out.update({f"{part}.{k}": v for k, v in sd.items() if k not in skip})
    return out


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with TensorFile(path) as f:
        return {k: f.shape(k) for k in f.keys()}  # noqa: SIM118


def _part_shapes(config: S3GenConfig, part: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        sd = _build_part(config, part).state_dict()
    return {f"{part}.{k}": tuple(v.shape) for k, v in sd.items()}


def is_meanflow_file(path: str | Path) -> bool:
    """Whether an S3Gen file holds a mean-flow (Turbo) flow: its header has the time mixer."""
    with TensorFile(Path(path)) as f:
        return MEANFLOW_KEY in f.keys()  # noqa: SIM118


def infer_config(path: str | Path, parts: Iterable[str] = PARTS) -> S3GenConfig:
    """The known S3Gen config (English, then tiny) whose `parts` match the file's tensor shapes; a
    mean-flow one if the file has the time mixer."""
    path = Path(path)
    shapes = _file_shapes(path)
    meanflow = MEANFLOW_KEY in shapes
    for candidate in (S3GenConfig.english(meanflow), S3GenConfig.tiny(meanflow)):
        if all(
            all(
                shapes.get(k, s) == s and (k in shapes or k.split(".", 1)[1] in _derived_names(p))
                for k, s in _part_shapes(candidate, p).items()
            )
            for p in parts
        ):
            return candidate
    raise CheckpointError(
        f"{path} does not match the English S3Gen model (parts {', '.join(parts)}); "
        "only the English Chatterbox checkpoint is supported"
    )


def _local_state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint names (and shapes) of the tensors a module stores itself, not through its children."""
    own = module.state_dict(keep_vars=True)
    for child_name, child in module.named_children():
        for key in child.state_dict(keep_vars=True):
            own.pop(f"{child_name}.{key}", None)
    return {k: tuple(v.shape) for k, v in own.items()}


def _load_part(
    config: S3GenConfig, part: str, path: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Build one part and fill it from `path`, one module's tensors at a time.

    Each module's tensors go through its own `load_state_dict`, so modules that fold checkpoint
    tensors on load (HiFT's weight norm) work. Parts without self-computed buffers are built on `meta`
    and take the file's tensors as they are (no random init, no second copy); the others are built on
    the CPU and copied into. Derived tokenizer buffers absent from the file keep their computed values.
    """
    derived = _derived_names(part)
    with torch.device("meta"):
        probe = _build_part(config, part)
    persistent = set(probe.state_dict())
    on_meta = not derived and all(name in persistent for name, _ in probe.named_buffers())
    module = probe if on_meta else _build_part(config, part).to(dtype)
    target = device if on_meta else torch.device("cpu")
    prefix = f"{part}."
    with TensorFile(path) as f:
        present = {k[len(prefix) :] for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
        missing = sorted(persistent - present - derived)
        if missing:
            shown = ", ".join(prefix + m for m in missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise CheckpointError(
                f"{path} lacks {len(missing)} tensor(s) of S3Gen's {part}: {shown}. "
                "Is it the right file for this model and version?"
            )
        for mod_name, mod in module.named_modules():
            mod_prefix = f"{mod_name}." if mod_name else ""
            chunk: dict[str, Tensor] = {}
            for key, shape in _local_state_shapes(mod).items():
                full = mod_prefix + key
                if full not in present:
                    continue  # a derived buffer: keeps the value the module computed
                tensor = f.get_tensor(prefix + full)
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(
                        f"{path}: tensor {prefix + full} has shape {tuple(tensor.shape)}, S3Gen expects "
                        f"{shape}. Is it the right file for this model and version?"
                    )
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                chunk[key] = tensor.to(target)
            if chunk:
                mod.load_state_dict(chunk, strict=False, assign=on_meta)
    module.requires_grad_(False)
    return module.to(device).eval()


def trim_fade(n_samples: int = S3GEN_SR // 50, device: torch.device | None = None) -> Tensor:
    """Gain for the first 2*n samples: silent for n, then a raised-cosine fade-in over n (the reference's
    remedy for the voice prompt spilling into the start of the output)."""
    ramp = (1 - torch.cos(torch.linspace(0, torch.pi, n_samples, device=device))) / 2
    return torch.cat([torch.zeros(n_samples, device=device), ramp])


class S3Gen(nn.Module):
    def __init__(self, config: S3GenConfig | None = None, parts: Iterable[str] = PARTS) -> None:
        super().__init__()
        self.config = config or S3GenConfig.english()
        self.tokenizer: nn.Module | None = None
        self.speaker_encoder: nn.Module | None = None
        self.flow: Flow | None = None
        self.mel2wav: nn.Module | None = None
        self.vocoder_home: torch.device | None = None  # set by park_vocoder
        for part in parts:
            setattr(self, part, _build_part(self.config, part))

    # --- loading and freeing parts ------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        parts: Iterable[str] = SPEECH_PARTS,
        config: S3GenConfig | None = None,
    ) -> S3Gen:
        """Load the named parts of `s3gen.safetensors` (or Turbo's `s3gen_meanflow.safetensors`: the
        config, read from the file unless given, says which); the others stay None until `load_parts`."""
        parts = tuple(parts)
        path = Path(path)
        if config is not None and "flow" in parts and config.meanflow != is_meanflow_file(path):
            kind = "a mean-flow (Turbo)" if config.meanflow else "a plain (non-Turbo)"
            raise CheckpointError(f"{path} does not hold {kind} S3Gen flow, which the given config asks for")
        model = cls(config or infer_config(path, parts), parts=())
        model.load_parts(path, parts, device, dtype)
        return model.eval()

    def load_parts(
        self,
        path: str | Path,
        parts: Iterable[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for part in parts:
            if part not in PARTS:
                raise UsageError(f"unknown S3Gen part {part!r}; choose from {', '.join(PARTS)}")
            setattr(self, part, _load_part(self.config, part, Path(path), torch.device(device), dtype))

    def free(self, parts: Iterable[str] = VOICE_PARTS) -> None:
        """Drop the named parts and return their memory (CUDA cache included)."""
        for part in parts:
            setattr(self, part, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _need(self, *parts: str) -> None:
        absent = [p for p in parts if getattr(self, p) is None]
        if absent:
            raise UsageError(f"S3Gen part(s) {', '.join(absent)} not loaded; load them with load_parts()")

    # --- speaking -----------------------------------------------------------------------------------

    def tokens_to_mel(
        self,
        tokens: Tensor,
        cond: GenCond,
        token_lens: Tensor | None = None,
        n_timesteps: int | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        keep_graph: bool = False,
    ) -> Tensor:
        """tokens [B, T] long (< 6561) -> mel [B, 80, 2T]; row b is valid for 2 * token_lens[b] frames
        and zero after. `noise` [B, 80, 2P + 2T] (P = prompt tokens) or `generator` (one, or one per
        row) fixes the ODE start. `keep_graph`: keep the flow's CUDA graph for this shape (a shape that
        recurs; see CausalCFM.forward)."""
        self._need("flow")
        tokens = torch.atleast_2d(tokens)
        device = self.flow.encoder_proj.weight.device
        if token_lens is None:
            token_lens = torch.full((tokens.size(0),), tokens.size(1), dtype=torch.long)
        with torch.inference_mode():
            mel, _ = self.flow.inference(
                tokens.to(device),
                token_lens.to(device),
                cond.prompt_token,
                cond.prompt_feat,
                cond.embedding,
                n_timesteps=n_timesteps,
                noise=noise,
                generator=generator,
                keep_graph=keep_graph,
            )
        return mel

    def mel_to_wav(
        self,
        mel: Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        mel_lens: Tensor | None = None,
    ) -> Tensor:
        """mel [B, 80, F] -> waveform [B, F * 480] float32 at 24 kHz (zero past each row's mel_lens; a
        row's valid samples do not depend on the padding). One generator, or one per row."""
        self._need("mel2wav")
        if self.vocoder_home is not None:
            self.mel2wav.to(self.vocoder_home)
        try:
            return self.mel2wav.inference(mel, generator=generator, lengths=mel_lens)[0]
        finally:
            if self.vocoder_home is not None:
                self.mel2wav.to("cpu")

    @property
    def samples_per_token(self) -> int:
        """Output samples per speech token."""
        return MEL_FRAMES_PER_TOKEN * self.mel2wav.config.samples_per_frame

    def park_vocoder(self, home: torch.device | str) -> None:
        """Keep HiFT in host memory between calls; each mel_to_wav moves it to `home` and back."""
        self._need("mel2wav")
        self.vocoder_home = torch.device(home)
        self.mel2wav.to("cpu")

    def synthesize(
        self,
        tokens: Tensor,
        cond: GenCond,
        token_lens: Tensor | None = None,
        n_timesteps: int | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        keep_graph: bool = False,
    ) -> Tensor:
        """tokens [B, T] -> waveform [B, 2T * 480] at 24 kHz, valid for 960 * token_lens[b] samples.

        One `generator` seeds both the flow's start noise and the vocoder's source noise (in that
        order), so a seed reproduces the audio; a list of B generators does so per row, and row b then
        equals the row synthesized alone with its generator. The first 40 ms are faded in as the
        reference does. `keep_graph`: see tokens_to_mel.
        """
        tokens = torch.atleast_2d(tokens)
        if token_lens is None:
            token_lens = torch.full((tokens.size(0),), tokens.size(1), dtype=torch.long)
        mel = self.tokens_to_mel(tokens, cond, token_lens, n_timesteps, noise, generator, keep_graph)
        return self._vocode(mel, generator, token_lens)

    def _vocode(
        self, mel: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None, token_lens: Tensor
    ) -> Tensor:
        """mel -> waveform, its first 40 ms faded in as the reference does."""
        wav = self.mel_to_wav(mel, generator, token_lens.to(mel.device) * MEL_FRAMES_PER_TOKEN)
        fade = trim_fade(device=wav.device)
        n = min(fade.numel(), wav.size(1))
        return torch.cat([wav[:, :n] * fade[:n], wav[:, n:]], dim=1)

    def synthesize_rows(
        self,
        tokens_list: Sequence[Tensor],
        cond: GenCond,
        generators: Sequence[torch.Generator],
        n_timesteps: int | None = None,
        keep_graph: bool = False,
        pad_to: int = 1,
        batch_rows: int = 0,
    ) -> list[Tensor]:
        """Several utterances in one padded, batched flow call and one HiFT call (each row on its own
        frames, see hifigan.py): one waveform [960 * len(row)] per row of `tokens_list` (1-D speech
        tokens, < 6561), faded in per row.

        Row k's noise comes from `generators[k]` only, so it equals `synthesize(tokens_list[k][None],
        cond, generator=<same seed>)` up to float rounding, whatever its batchmates. `keep_graph`: see
        tokens_to_mel; `pad_to` pads the batch to a multiple of that many tokens and `batch_rows` (if more)
        to that many rows, blank ones that HiFT skips, so that groups of similar sizes and lengths share
        one shape (and one kept graph).
        """
        if len(generators) != len(tokens_list):
            raise ValueError(f"{len(tokens_list)} token rows but {len(generators)} generators")
        if not tokens_list:
            return []
        lengths = [int(t.numel()) for t in tokens_list]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one speech token")
        rows = max(len(lengths), batch_rows)
        tokens = torch.zeros(rows, -(-max(lengths) // pad_to) * pad_to, dtype=torch.long)
        for row, (row_tokens, n) in enumerate(zip(tokens_list, lengths, strict=True)):
            tokens[row, :n] = row_tokens.reshape(-1).cpu()
        token_lens = torch.tensor(lengths, dtype=torch.long)
        # blank rows: one token each, noise from a generator of their own (the rows' are left as they are)
        blank = torch.Generator(generators[0].device).manual_seed(0)
        gens = [*generators, *[blank] * (rows - len(lengths))]
        all_lens = torch.cat((token_lens, torch.ones(rows - len(lengths), dtype=torch.long)))
        mel = self.tokens_to_mel(tokens, cond, all_lens, n_timesteps, generator=gens, keep_graph=keep_graph)
        wav = self._vocode(mel[: len(lengths)], list(generators), token_lens)
        return [wav[row, : n * self.samples_per_token] for row, n in enumerate(lengths)]

    def forward(self, tokens: Tensor, cond: GenCond, **kwargs: object) -> Tensor:
        return self.synthesize(tokens, cond, **kwargs)  # type: ignore[arg-type]

    # --- voice preparation --------------------------------------------------------------------------

    def embed_ref(self, wav: Tensor | np.ndarray, sr: int) -> GenCond:
        """Reference clip (mono [T] or [1, T], float, any rate) -> S3Gen conditionals.

        Mel of the 24 kHz clip, CAMPPlus x-vector and S3 tokens of the 16 kHz clip (resampled with
        soxr, HQ). The prompt is cut to whole tokens: 2 mel frames per token.
        """
        self._need("tokenizer", "speaker_encoder")
        from .mel import mel_spectrogram

        clip = torch.as_tensor(wav, dtype=torch.float32).detach().cpu()
        if clip.dim() == 2 and clip.size(0) == 1:
            clip = clip[0]
        if clip.dim() != 1:
            raise UsageError(
                f"the voice clip must be mono audio [T] or [1, T], got shape {tuple(clip.shape)}"
            )
        device = next(self.speaker_encoder.parameters()).device
        wav24 = _resample(clip, sr, S3GEN_SR)
        wav16 = _resample(clip, sr, S3_SR)

        with torch.inference_mode():
            mel = mel_spectrogram(wav24[None].to(device)).transpose(1, 2)  # [1, F, 80]
            embedding = self.speaker_encoder.inference(wav16[None].to(device))
            tokens, _ = self.tokenizer(wav16[None].to(next(self.tokenizer.parameters()).device))
        n_tokens = min(tokens.size(1), mel.size(1) // MEL_FRAMES_PER_TOKEN)
        if n_tokens < 1:
            raise UsageError(
                f"the voice clip ({clip.numel() / sr:.2f} s) is too short; give a few seconds of speech"
            )
        tokens = tokens[:, :n_tokens].to(device)
        mel = mel[:, : MEL_FRAMES_PER_TOKEN * n_tokens]
        return GenCond(
            prompt_token=tokens,
            prompt_token_len=torch.tensor([n_tokens], dtype=torch.long, device=device),
            prompt_feat=mel.float(),
            embedding=embedding.float(),
        )


def _resample(wav: Tensor, sr: int, target: int) -> Tensor:
    if sr == target:
        return wav
    import soxr

    return torch.from_numpy(
        np.ascontiguousarray(soxr.resample(wav.numpy(), sr, target, quality="HQ"), np.float32)
    )
