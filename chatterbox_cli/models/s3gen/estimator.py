"""The vector-field estimator of the flow-matching decoder: a one-level causal 1-D U-Net whose levels
each hold a ResNet block followed by transformer blocks, conditioned on the flow time.

Parameter names follow the official `s3gen.safetensors` (`flow.decoder.estimator.*`); the
`nn.Sequential`/`nn.ModuleList` nesting below exists to reproduce those names. The mean-flow variant
(Turbo's `s3gen_meanflow.safetensors`) adds one tensor, `time_embed_mixer.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so frame t sees frames <= t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.left_pad = kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class _ChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class CausalBlock(nn.Module):
    """Causal conv(3) -> LayerNorm over channels -> Mish, on masked input and output."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        # indices 0 (conv) and 2 (norm) carry the checkpoint's `block.0.*` / `block.2.*` names
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), _ChannelsLast(), nn.LayerNorm(dim_out), _ChannelsLast(), nn.Mish()
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock(dim, dim_out)
        self.block2 = CausalBlock(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, time: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(time)[:, :, None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class SelfAttention(nn.Module):
    """Bias-free q/k/v projections, `to_out.0` output projection (diffusers naming)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, T, C]; bias [B, 1, 1, T] additive (large negative on padded keys)."""
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.n_heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GeluProjection(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # `net.0` = Linear+GELU, `net.1` = (dropout, no weights), `net.2` = output Linear
        self.net = nn.ModuleList([GeluProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU feed-forward, both residual (no cross-attention, no norm2)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, n_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


def timestep_sinusoids(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """[B] flow times -> [B, dim]: sin half then cos half, frequencies 10000^(-i/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angles = scale * t[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionalDecoder(nn.Module):
    """Estimates the flow velocity from (x_t, mu, speaker, prompt-mel cond) and the time t.

    One U-Net level: down (resnet, transformers, causal conv), `n_mid` middle levels, up (resnet over
    [x, skip], transformers, causal conv), then a final causal block and a 1x1 projection.

    `meanflow`: the estimator also takes the step's end time r and predicts the mean velocity over
    [t, r]; t and r are embedded by the same MLP and a bias-free linear map mixes the two embeddings
    into the one conditioning vector.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: int,
        n_blocks: int,
        n_mid: int,
        n_heads: int,
        head_dim: int,
        meanflow: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        time_dim = 4 * channels
        self.time_mlp = TimestepMLP(in_channels, time_dim)

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(channels, n_heads, head_dim) for _ in range(n_blocks))

        self.down_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CausalResnetBlock(in_channels, channels, time_dim),
                        transformers(),
                        CausalConv1d(channels, channels, 3),
                    ]
                )
            ]
        )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock(channels, channels, time_dim), transformers()])
            for _ in range(n_mid)
        )
        self.up_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        CausalResnetBlock(2 * channels, channels, time_dim),
                        transformers(),
                        CausalConv1d(channels, channels, 3),
                    ]
                )
            ]
        )
        self.final_block = CausalBlock(channels, channels)
        self.final_proj = nn.Conv1d(channels, out_channels, 1)
        # registered last, as the reference does: the other tensors keep their order (and their draws in
        # flow.random_state_dict)
        self.time_embed_mixer = nn.Linear(2 * time_dim, time_dim, bias=False) if meanflow else None

    @staticmethod
    def _run_transformers(blocks: nn.ModuleList, x: Tensor, bias: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def _embed_time(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.time_mlp(timestep_sinusoids(t, self.in_channels).to(dtype))

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor,
        cond: Tensor,
        r: Tensor | None = None,
    ) -> Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T]; t [B]; spks [B, 80]; r [B] (mean-flow only: the
        step's end time) -> velocity [B, 80, T]."""
        if (r is None) != (self.time_embed_mixer is None):
            raise ValueError("a mean-flow estimator needs the end time r, and only it takes one")
        time = self._embed_time(t, x.dtype)
        if self.time_embed_mixer is not None:
            time = self.time_embed_mixer(torch.cat([time, self._embed_time(r, x.dtype)], dim=1))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.size(2)), cond], dim=1)
        bias = (1.0 - mask[:, None].to(h.dtype)) * -1.0e10  # [B, 1, 1, T]

        resnet, blocks, conv = self.down_blocks[0]
        h = self._run_transformers(blocks, resnet(h, mask, time), bias)
        skip = h
        h = conv(h * mask)
        for resnet, blocks in self.mid_blocks:
            h = self._run_transformers(blocks, resnet(h, mask, time), bias)
        resnet, blocks, conv = self.up_blocks[0]
        h = resnet(torch.cat([h, skip], dim=1), mask, time)
        del skip  # neither the skip nor the concatenation is needed in the transformers
        h = self._run_transformers(blocks, h, bias)
        h = conv(h * mask)
        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask
