"""Upsampling Conformer encoder of the S3Gen flow: 25 Hz token embeddings -> 50 Hz hidden states.

Parameter names follow the official `s3gen.safetensors` (`flow.encoder.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """[B] lengths -> [B, max_len] bool, True where a position holds data."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def relative_sinusoids(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sinusoids for relative distances length-1, ..., 0, ..., -(length-1): [1, 2*length-1, dim]."""
    distance = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim)
    )
    angles = distance * inv_freq
    table = torch.empty(2 * length - 1, dim, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.to(dtype)[None]


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, then scaled by sqrt(d) (the relative positions are returned separately)."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, d_model), nn.LayerNorm(d_model, eps=1e-5))
        self.scale = math.sqrt(d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.out(x) * self.scale
        pos = relative_sinusoids(x.size(1), x.size(2), x.device, x.dtype)
        return x, pos


# Bytes of one query block's raw position scores [B, H, n, T+n-1]. The attention holds at most a few
# tensors of this size at once (those scores, the [B, H, n, T] bias built from them, what the SDPA kernel
# allocates), so its workspace no longer grows with T^2.
ATTN_BLOCK_BYTES = 16 * 1024**2


def query_block_size(batch: int, heads: int, length: int, element_bytes: int, budget: int) -> int:
    """Query rows n per block such that the block's raw position scores [batch, heads, n, length+n-1]
    fit in `budget` bytes (at least one row)."""
    per_row = budget // (batch * heads * element_bytes)  # n * (length + n - 1) must not exceed this
    n = (math.isqrt((length - 1) ** 2 + 4 * per_row) - (length - 1)) // 2
    return max(1, min(length, n))


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL style relative positions (learned u/v biases).

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . p_(i-j)) / sqrt(d), keys past each length masked.
    Queries are processed in blocks (`block_bytes`); each block's position term is passed to SDPA as
    an additive bias, so the content scores and softmax stay inside the fused kernel where one exists.
    """

    block_bytes: int = ATTN_BLOCK_BYTES

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def forward(self, x: Tensor, key_mask: Tensor, pos: Tensor) -> Tensor:
        """x [B, T, D]; key_mask [B, T] bool (every row needs a valid key); pos [1, 2T-1, D]."""
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = self.linear_q(x).view(b, t, h, d)
        k = self.linear_k(x).view(b, t, h, d).transpose(1, 2)
        v = self.linear_v(x).view(b, t, h, d).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, h, d).transpose(1, 2)  # [1, H, 2T-1, d], distance T-1 first
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        key_bias = torch.zeros(b, 1, 1, t, device=x.device, dtype=q.dtype)
        key_bias = key_bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))

        block = query_block_size(b, h, t, q.element_size(), self.block_bytes)
        out = q.new_empty(b, t, h, d)
        for i0 in range(0, t, block):
            i1 = min(i0 + block, t)
            n = i1 - i0
            # queries i0..i1-1 against keys 0..T-1 span distances i0-(T-1) .. i1-1, which are the
            # columns T-i1 .. 2T-2-i0 of p: a window of T+n-1 columns.
            raw = torch.matmul(q_v[:, :, i0:i1], p[:, :, t - i1 : 2 * t - 1 - i0].transpose(-2, -1))
            raw = raw.contiguous()
            # local query r vs key j needs window column n-1-r+j: flat offset (n-1) + r*(T+n-2) + j
            position = raw.as_strided(
                (b, h, n, t), (raw.stride(0), raw.stride(1), t + n - 2, 1), raw.storage_offset() + n - 1
            )
            bias = torch.add(key_bias, position, alpha=1.0 / math.sqrt(d))
            del raw, position
            block_out = F.scaled_dot_product_attention(q_u[:, :, i0:i1], k, v, attn_mask=bias)
            del bias  # before the next block's scores exist
            out[:, i0:i1] = block_out.transpose(1, 2)
        return self.linear_out(out.view(b, t, h * d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm attention + feed-forward block (the checkpoint's Conformer has no conv module)."""

    def __init__(self, d_model: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(d_model, n_heads)
        self.feed_forward = FeedForward(d_model, hidden)
        self.norm_ff = nn.LayerNorm(d_model, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: Tensor, key_mask: Tensor, pos: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_mask, pos)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Residual conv pair: the first sees `lookahead` future frames, the second two past frames."""

    def __init__(self, channels: int, lookahead: int) -> None:
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: Tensor) -> Tensor:
        y = x.transpose(1, 2)
        y = F.leaky_relu(self.conv1(F.pad(y, (0, self.lookahead))))
        y = self.conv2(F.pad(y, (2, 0)))
        return x + y.transpose(1, 2)


class CausalUpsample(nn.Module):
    """Nearest-neighbour repeat by `stride`, then a causal conv of width 2*stride+1."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T] -> [B, C, stride*T]."""
        x = x.repeat_interleave(self.stride, dim=2)
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        hidden: int,
        n_blocks: int,
        n_up_blocks: int,
        lookahead: int,
        up_stride: int,
    ) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.embed = LinearEmbed(d_model, d_model)
        self.after_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.pre_lookahead_layer = PreLookahead(d_model, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(d_model, n_heads, hidden) for _ in range(n_blocks))
        self.up_layer = CausalUpsample(d_model, up_stride)
        self.up_embed = LinearEmbed(d_model, d_model)
        self.up_encoders = nn.ModuleList(ConformerLayer(d_model, n_heads, hidden) for _ in range(n_up_blocks))

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] (zero past each length), lengths [B] -> ([B, s*T, D], lengths*s)."""
        mask = lengths_to_mask(lengths, x.size(1))
        x, pos = self.embed(x)
        # Zero the padding before the look-ahead conv so that a padded batch row equals the row run
        # alone (the reference leaves LayerNorm(bias) there, which leaks into the last frames).
        x = x * mask[..., None].to(x.dtype)
        x = self.pre_lookahead_layer(x)
        for layer in self.encoders:
            x = layer(x, mask, pos)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        lengths = lengths * self.up_stride
        mask = lengths_to_mask(lengths, x.size(1))
        x, pos = self.up_embed(x)
        for layer in self.up_encoders:
            x = layer(x, mask, pos)
        return self.after_norm(x), lengths
