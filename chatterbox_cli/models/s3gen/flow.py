"""S3Gen flow: speech tokens (25 Hz) -> 80-bin mel (50 Hz) by conditional flow matching.

Token embedding -> upsampling Conformer encoder -> `mu`; an Euler ODE solver integrates the
estimator's velocity from noise to mel over a cosine time schedule, with classifier-free guidance.
The mean-flow model (Chatterbox Turbo) is distilled with the guidance built in: its estimator predicts
the mean velocity over a whole step [t, r], so a few (default 2) Euler steps on a linear schedule,
without guidance rows, reach the mel.
The voice prompt's tokens and mel are prepended and its frames cut from the output.
Parameter names follow the official `s3gen.safetensors` (`flow.*`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_cli.models.cuda_graphs import GraphedCall, capturable

from .conformer import UpsampleConformerEncoder, lengths_to_mask
from .estimator import ConditionalDecoder


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 6561
    d_model: int = 512  # token embedding and Conformer width
    mel_dim: int = 80
    spk_embed_dim: int = 192  # CAMPPlus x-vector
    n_heads: int = 8
    linear_units: int = 2048
    n_blocks: int = 6
    n_up_blocks: int = 4
    pre_lookahead: int = 3
    token_mel_ratio: int = 2
    est_channels: int = 256
    est_n_blocks: int = 4
    est_n_mid: int = 12
    est_n_heads: int = 8
    est_head_dim: int = 64
    cfg_rate: float = 0.7  # unused by mean-flow models
    n_timesteps: int = 10
    meanflow: bool = False  # Turbo: time mixer in the estimator, linear schedule, no guidance rows

    @classmethod
    def english(cls) -> FlowConfig:
        return cls()

    def with_meanflow(self) -> FlowConfig:
        """This config as a mean-flow model, rendered in 2 steps by default like the reference's Turbo."""
        return replace(self, meanflow=True, n_timesteps=MEANFLOW_TIMESTEPS)

    @classmethod
    def tiny(cls) -> FlowConfig:
        return cls(
            d_model=64,
            n_heads=4,
            linear_units=128,
            n_blocks=2,
            n_up_blocks=2,
            est_channels=64,
            est_n_blocks=1,
            est_n_mid=2,
            est_n_heads=2,
            est_head_dim=32,
        )


MEANFLOW_TIMESTEPS = 2


def linear_time_grid(
    n_steps: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """n_steps+1 evenly spaced times in [0, 1] (the mean-flow schedule)."""
    return torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)


def cosine_time_grid(
    n_steps: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """n_steps+1 times in [0, 1], denser near t=0: 1 - cos(pi/2 * linspace(0, 1))."""
    t = torch.linspace(0, 1, n_steps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi)


# The estimator graphs kept for shapes that recur (see CausalCFM.forward's keep_graph): a run's early piece,
# and a server round's early pieces and whole chunks (a few length blocks each) at the group sizes its
# clients make. With 6, a 32-client server's early-piece graph was pushed out by its whole chunks' (H100).
KEPT_GRAPHS = 8


class CausalCFM(nn.Module):
    """Euler solver over the estimator with classifier-free guidance (conditional row + a row whose
    mu, speaker and prompt-mel conditions are zero); for a mean-flow model, plain Euler steps of the
    estimator's mean velocity over [t, r] on a linear schedule, one row per item."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.cfg_rate = config.cfg_rate
        self.meanflow = config.meanflow
        self.cuda_graph = True  # replay the estimator as a CUDA graph on CUDA (see forward)
        self.kept: dict[tuple[object, ...], GraphedCall] = {}  # shape -> graph, oldest use first
        self.pool: torch.cuda.MemPool | None = None  # one memory pool for all the estimator's graphs
        self.estimator = ConditionalDecoder(
            in_channels=4 * config.mel_dim,
            out_channels=config.mel_dim,
            channels=config.est_channels,
            n_blocks=config.est_n_blocks,
            n_mid=config.est_n_mid,
            n_heads=config.est_n_heads,
            head_dim=config.est_head_dim,
            meanflow=config.meanflow,
        )

    def forward(
        self,
        noise: Tensor,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        n_timesteps: int,
        keep_graph: bool = False,
    ) -> Tensor:
        """noise, mu, cond [B, 80, T]; mask [B, 1, T]; spks [B, 80] -> mel [B, 80, T].

        `keep_graph`: keep this call's CUDA graph (for the KEPT_GRAPHS shapes used last) for later calls
        of the same shape, whose steps then all replay it: for a shape that recurs, like the early piece
        of every run or of a server round of N requests.
        """
        dtype = self.estimator.final_proj.weight.dtype
        x = noise.to(dtype)
        mu, mask, spks, cond = mu.to(dtype), mask.to(dtype), spks.to(dtype), cond.to(dtype)
        b = x.size(0)
        if self.meanflow:
            times = linear_time_grid(n_timesteps, x.device, dtype)
        else:
            # batch of 2B: the conditional rows first, then the unconditional ones
            mu2 = torch.cat([mu, torch.zeros_like(mu)])
            spks2 = torch.cat([spks, torch.zeros_like(spks)])
            cond2 = torch.cat([cond, torch.zeros_like(cond)])
            mask2 = torch.cat([mask, mask])
            times = cosine_time_grid(n_timesteps, x.device, dtype)
        shape = (b, x.size(2), dtype, x.device)
        kept = self.kept.pop(shape, None)
        if kept is not None:
            self.kept[shape] = kept  # the most recently used last
        # On CUDA the steps after the first (which warms up) replay one captured graph: the estimator is
        # some 1,400 small kernels, so eager steps cost more launch time than GPU time. Capturing costs
        # about a step, so with fewer than 3 steps a graph pays only when it is kept (or already was).
        use_graph = (
            self.cuda_graph and (n_timesteps >= 3 or keep_graph or kept) and capturable(self.estimator, x)
        )
        graphed = kept if use_graph else None
        for step, (t0, t1) in enumerate(zip(times[:-1], times[1:], strict=False)):
            if self.meanflow:
                args = (x, mask, mu, t0.expand(b), spks, cond, t1.expand(b))
            else:
                args = (torch.cat([x, x]), mask2, mu2, t0.expand(2 * b), spks2, cond2)
            if use_graph and graphed is None and step == 1:
                # All graphs share one pool: they replay one at a time on one stream, and each graph's
                # output is used (the Euler update below) before another graph replays, so a graph may
                # reuse the memory of another's intermediates; live outputs are never handed out again.
                if self.pool is None:
                    self.pool = torch.cuda.MemPool()
                graphed = GraphedCall(self.estimator, *args, pool=self.pool.id)
                if keep_graph:
                    self.kept[shape] = graphed
                    while len(self.kept) > KEPT_GRAPHS:
                        del self.kept[next(iter(self.kept))]
            v = self.estimator(*args) if graphed is None else graphed(*args)
            if self.meanflow:
                x = x + (t1 - t0) * v
            else:
                v_cond, v_uncond = v[:b], v[b:]
                x = x + (t1 - t0) * ((1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond)
        return x


class Flow(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.mel_dim)
        self.encoder = UpsampleConformerEncoder(
            d_model=config.d_model,
            n_heads=config.n_heads,
            hidden=config.linear_units,
            n_blocks=config.n_blocks,
            n_up_blocks=config.n_up_blocks,
            lookahead=config.pre_lookahead,
            up_stride=config.token_mel_ratio,
        )
        self.encoder_proj = nn.Linear(config.d_model, config.mel_dim)
        self.decoder = CausalCFM(config)

    def encode(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] (any value past each length), lengths [B] -> (mu [B, 2T, 80], mel lengths [B])."""
        mask = lengths_to_mask(lengths, tokens.size(1))
        valid = tokens[mask]
        if valid.numel() and (valid.min() < 0 or valid.max() >= self.config.vocab_size):
            raise ValueError(
                f"speech tokens must lie in [0, {self.config.vocab_size}); "
                "drop start/stop tokens before S3Gen"
            )
        tokens = tokens.masked_fill(~mask, 0)
        x = self.input_embedding(tokens) * mask[..., None].to(self.input_embedding.weight.dtype)
        h, mel_lengths = self.encoder(x, lengths)
        return self.encoder_proj(h), mel_lengths

    def inference(
        self,
        tokens: Tensor,
        token_lens: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        n_timesteps: int | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        keep_graph: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Mel for `tokens` [B, T] (valid lengths `token_lens` [B]) in the voice of the prompt.

        prompt_token [1 or B, P]; prompt_feat [1 or B, 2P, 80]; embedding [1 or B, spk_dim]; all rows
        share the prompt length P. `noise` [B, 80, 2P + 2T] is the ODE start; without it, standard
        normal noise is drawn (from `generator` if given, else the global RNG, like the reference).
        A list of B generators draws each row's noise [1, 80, 2P + 2 token_lens[b]] from its own, so a
        row starts from the noise it would get alone. A mean-flow model draws as the reference's Turbo
        does, see `_start_noise`.
        `keep_graph`: see CausalCFM.forward.
        Returns (mel [B, 80, 2T] zero past each length, mel lengths [B] = 2 * token_lens).
        """
        n_timesteps = self.config.n_timesteps if n_timesteps is None else n_timesteps
        b = tokens.size(0)
        dtype = self.encoder_proj.weight.dtype
        device = tokens.device
        prompt_token = prompt_token.to(device).expand(b, -1)
        prompt_feat = prompt_feat.to(device=device, dtype=dtype).expand(b, -1, -1)
        embedding = embedding.to(device=device, dtype=dtype)
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1)).expand(b, -1)

        token_lens = token_lens.to(device)
        all_tokens = torch.cat([prompt_token, tokens], dim=1)
        mu, mel_lengths = self.encode(all_tokens, token_lens + prompt_token.size(1))
        n_prompt_frames = prompt_feat.size(1)
        total = mu.size(1)

        cond = torch.zeros(b, total, self.config.mel_dim, device=device, dtype=dtype)
        cond[:, :n_prompt_frames] = prompt_feat
        mask = lengths_to_mask(mel_lengths, total)[:, None].to(dtype)
        if noise is None and isinstance(generator, Sequence):
            if len(generator) != b:
                raise ValueError(f"{b} rows but {len(generator)} generators")
            noise = torch.zeros(b, self.config.mel_dim, total, device=device, dtype=dtype)
            for row, (gen, n) in enumerate(zip(generator, mel_lengths.tolist(), strict=True)):
                row_noise = self._start_noise(1, n, n_prompt_frames, gen, gen.device, dtype)
                noise[row, :, :n] = row_noise[0].to(device)
        elif noise is None:
            gen_device = generator.device if generator is not None else device
            noise = self._start_noise(b, total, n_prompt_frames, generator, gen_device, dtype)
        elif noise.shape != (b, self.config.mel_dim, total):
            raise ValueError(
                f"noise must have shape {(b, self.config.mel_dim, total)}, got {tuple(noise.shape)}"
            )
        mel = self.decoder(
            noise.to(device=device, dtype=dtype),
            mu.transpose(1, 2),
            mask,
            spks,
            cond.transpose(1, 2),
            n_timesteps,
            keep_graph,
        )
        mel = mel * mask  # padded frames keep their noise otherwise
        return mel[:, :, n_prompt_frames:], mel_lengths - n_prompt_frames

    def _start_noise(
        self,
        b: int,
        n_frames: int,
        n_prompt_frames: int,
        generator: torch.Generator | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """Standard normal ODE start [b, 80, n_frames] drawn from `generator` (or the global RNG).

        Mean-flow: the reference's Turbo draws the generated frames' noise first, then noise for all
        frames of which only the prompt's are used; drawing in that order keeps a seed's output equal.
        """
        shape = (b, self.config.mel_dim, n_frames)
        if not self.config.meanflow:
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
        draw = {"generator": generator, "device": device, "dtype": dtype}
        tail = torch.randn((b, self.config.mel_dim, n_frames - n_prompt_frames), **draw)
        head = torch.randn(shape, **draw)[:, :, :n_prompt_frames]
        return torch.cat([head, tail], dim=2)


def _init_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> Tensor:
    """Sane random values for a parameter, chosen by its name and shape (fan-in scaled weights,
    small biases, norm gains near 1)."""
    if name.endswith("pos_bias_u") or name.endswith("pos_bias_v"):
        return torch.randn(shape, generator=generator) * 0.1
    if len(shape) == 1:
        is_norm_gain = name.endswith(".weight")  # 1-D weights belong to LayerNorms here
        base = torch.randn(shape, generator=generator) * (0.1 if is_norm_gain else 0.02)
        return base + 1.0 if is_norm_gain else base
    if name.endswith("input_embedding.weight"):
        return torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state_dict(config: FlowConfig, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random fp32 weights for `Flow(config)` under its own (unprefixed) names."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Flow(config).state_dict().items()}
    return {name: _init_tensor(name, shape, generator) for name, shape in shapes.items()}
