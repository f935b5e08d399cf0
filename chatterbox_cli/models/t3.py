"""T3: the text-to-speech-token model of Chatterbox (a transformer backbone with its own embeddings and
heads).

Module and parameter names follow the official checkpoints, so their state dicts load strictly:
`tfmr.*` (the backbone), `cond_enc.*`, `text_emb`, `speech_emb`, `text_pos_emb.emb`, `speech_pos_emb.emb`,
`text_head`, `speech_head`.

English and multilingual (`t3_cfg.safetensors`, `t3_mtl23ls_v2.safetensors`): a Llama backbone (with an
unused 8-row `embed_tokens`), fed
    [conditioning (speaker, perceiver(prompt speech), emotion)] [text tokens] [speech tokens]
where text and speech tokens each get learned position embeddings counted from 0 in their own segment, and
the backbone applies RoPE over the whole sequence.

Turbo (`t3_turbo_v1.safetensors`): a GPT-2 medium backbone, fed
    [conditioning (speaker, prompt speech tokens as they are)] [text tokens] [speech tokens]
with no segment positions: GPT-2's learned positions `wpe` count over the whole sequence. Its Linear
weights are stored as GPT-2's Conv1D, [in, out] (see STORED_TRANSPOSED), and its own token embedding
`wte` is stored but unused.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatterbox_cli.models.alignment import AlignmentGuard
from chatterbox_cli.models.conds import T3Cond
from chatterbox_cli.models.sampling import SamplingSettings, choose_next_token


@dataclass(frozen=True)
class T3Config:
    text_vocab_size: int = 704
    speech_vocab_size: int = 8194
    start_text_token: int = 255
    stop_text_token: int = 0
    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    max_text_tokens: int = 2048
    max_speech_tokens: int = 4096

    hidden_size: int = 1024
    n_layers: int = 30
    n_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    norm_eps: float = 1e-5
    # Rows of the backbone's own token embedding; unused (T3 feeds embeddings) but present in the checkpoint.
    backbone_vocab_size: int = 8
    backbone: Literal["llama", "gpt2"] = "llama"
    gpt2_positions: int = 8196  # rows of GPT-2's position table `wpe`

    rope_theta: float = 500000.0
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    speech_cond_prompt_len: int = 150
    speaker_embed_size: int = 256
    perceiver_queries: int = 32  # 0: no perceiver, the prompt's speech embeddings go in as they are
    perceiver_heads: int = 4
    emotion_input: bool = True  # the exaggeration ("emotion_adv") conditioning input
    segment_positions: bool = True  # learned text/speech positions counted within each segment
    speech_head_bias: bool = False
    # The text is wrapped in start/stop text tokens (pipeline.text_tokens); Turbo's is not.
    wrap_text: bool = True
    # The prompt ends with the start-of-speech token this many times (see T3.prompt_embeds).
    prompt_start_tokens: int = 2
    # The repetition penalty's history holds the start token at every step (English: the reference's
    # generated ids begin with it); Turbo's history holds it only at the first step.
    start_in_history: bool = True

    @classmethod
    def english(cls) -> T3Config:
        return cls()

    @classmethod
    def multilingual(cls) -> T3Config:
        """The English T3 with the 23-language grapheme vocabulary (variants.MULTILINGUAL)."""
        return cls(text_vocab_size=2454)

    @classmethod
    def turbo(cls) -> T3Config:
        """Turbo: GPT-2 medium, the GPT-2 text vocabulary, a 375-token speech prompt without perceiver or
        emotion input, one start token, no text wrapping (reference tts_turbo.py and llama_configs.py)."""
        return cls(
            text_vocab_size=50276,
            speech_vocab_size=6563,
            n_layers=24,
            backbone="gpt2",
            backbone_vocab_size=50276,
            speech_cond_prompt_len=375,
            perceiver_queries=0,
            emotion_input=False,
            segment_positions=False,
            speech_head_bias=True,
            wrap_text=False,
            prompt_start_tokens=1,
            start_in_history=False,
        )

    @classmethod
    def tiny(cls) -> T3Config:
        """A few-hundred-kB model for tests: real vocabularies and special tokens, tiny backbone."""
        return cls(
            max_text_tokens=256,
            max_speech_tokens=512,
            hidden_size=64,
            n_layers=2,
            n_heads=4,
            head_dim=16,
            intermediate_size=128,
            perceiver_queries=8,
        )

    @classmethod
    def tiny_turbo(cls) -> T3Config:
        """Turbo's layout with a tiny backbone, for tests (a GPT-2 vocabulary of 50276 rows would be 3 MB
        per table even at width 16: the tiny text vocabulary is 1024)."""
        return replace(
            cls.turbo(),
            text_vocab_size=1024,
            backbone_vocab_size=1024,
            max_text_tokens=256,
            max_speech_tokens=512,
            hidden_size=64,
            n_layers=2,
            n_heads=4,
            head_dim=16,
            intermediate_size=256,
            gpt2_positions=1024,
            speech_cond_prompt_len=30,
        )

    @property
    def text_positions(self) -> int:
        """Rows of the learned text position table (text plus start/stop)."""
        return self.max_text_tokens + 2

    @property
    def speech_positions(self) -> int:
        """Rows of the learned speech position table."""
        return self.max_speech_tokens + 4

    @property
    def cond_len(self) -> int:
        """Conditioning prefix length with a speech prompt: speaker + perceiver outputs (or the prompt
        itself) + emotion."""
        prompt = self.perceiver_queries or self.speech_cond_prompt_len
        return 1 + prompt + int(self.emotion_input)

    @property
    def max_positions(self) -> int:
        """Longest sequence the backbone can see (sizes the RoPE tables)."""
        return self.cond_len + self.text_positions + self.speech_positions


# ---------------------------------------------------------------------------------------------------------
# Llama backbone


def llama3_inverse_frequencies(config: T3Config, device: torch.device | str | None = None) -> Tensor:
    """RoPE inverse frequencies with Llama 3's long-context rescaling.

    Wavelengths shorter than original_max / high_freq_factor are kept, those longer than
    original_max / low_freq_factor are divided by `factor`, and the band between is blended linearly in
    original_max / wavelength.
    """
    dims = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (config.rope_theta ** (dims / config.head_dim))
    wavelength = 2 * math.pi / inv_freq
    long_limit = config.rope_original_max_positions / config.rope_low_freq_factor
    short_limit = config.rope_original_max_positions / config.rope_high_freq_factor

    scaled = torch.where(wavelength > long_limit, inv_freq / config.rope_factor, inv_freq)
    blend = (config.rope_original_max_positions / wavelength - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    blended = (1 - blend) * scaled / config.rope_factor + blend * scaled
    in_band = (wavelength >= short_limit) & (wavelength <= long_limit)
    return torch.where(in_band, blended, scaled)


def rope_tables(config: T3Config, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin [max_positions, head_dim], float32; each frequency appears in both halves.

    The angles (up to thousands of radians) and their cos/sin are taken in float64: float32 cos of large
    arguments differs between vectorised and scalar code paths, which made the tables vary between runs.
    """
    inv_freq = llama3_inverse_frequencies(config, device).double()
    positions = torch.arange(config.max_positions, device=device, dtype=torch.float64)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, T, D] by position; cos/sin are [T, D]. Pairs are (i, i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


def rope_swap(dim: int, device: torch.device | str | None = None) -> Tensor:
    """P [D, D] with x @ P == (-x2, x1), the "rotate half" of RoPE as a matrix (float32)."""
    half = dim // 2
    eye = torch.eye(half, device=device)
    zero = torch.zeros_like(eye)
    return torch.cat((torch.cat((zero, eye), dim=1), torch.cat((-eye, zero), dim=1)))


def rotation_matrices(cos: Tensor, sin: Tensor, swap: Tensor) -> Tensor:
    """RoPE for single positions as matrices: [rows, D] cos/sin -> R [rows, D, D] with x @ R == apply_rope.

    R = diag(cos) + P diag(sin) (P from rope_swap). A decode step rotates each row's queries and keys
    with one batched matmul instead of the five elementwise kernels of apply_rope.
    """
    return torch.diag_embed(cos) + swap * sin[:, None, :]


@dataclass
class Rope:
    """The rotary embedding of a block of positions: cos/sin tables, or per-row matrices for one position."""

    cos: Tensor | None = None  # [T, D] or [rows, 1, T, D]
    sin: Tensor | None = None
    rotation: Tensor | None = None  # [rows * 3, D, D] when T == 1: per row, for q, k and v (identity)

    def __call__(self, qkv: Tensor) -> Tensor:
        """qkv [rows, T, 3H, D] (projection layout) -> [rows, 3H, T, D] with q and k rotated, v as it was."""
        rows, length, heads, dim = qkv.shape
        if self.rotation is None:
            qkv = qkv.transpose(1, 2)
            qk = apply_rope(qkv[:, : 2 * heads // 3], self.cos, self.sin)
            return torch.cat((qk, qkv[:, 2 * heads // 3 :]), dim=1)
        # one batched matmul; v goes through it too (times the identity, exact) so that k and v come out
        # side by side and reach the cache in one copy
        rotated = torch.bmm(qkv.reshape(self.rotation.shape[0], -1, dim), self.rotation)
        return rotated.view(rows, length, heads, dim).transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            # one fused kernel (fp32 accumulation) instead of seven on 16-bit activations
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x


def layer_views(cache: Tensor, rows: int) -> list[Tensor]:
    """Each layer's [2, rows, ...] keys and values for the first `rows` rows of a KVCache buffer."""
    return [cache[i, :, :rows] for i in range(cache.shape[0])]


class KVCache:
    """Preallocated keys and values of every layer in one buffer: [layers, 2 (k, v), rows, heads, capacity,
    head_dim].

    Writes go to explicit columns (`index_copy_`, keys and values of a layer in one copy), reads see the
    whole fixed-size buffer under a mask, so a decode step always has the same shapes. `layer_views` gives
    per-layer views of the first rows: a batch whose finished rows were compacted away keeps using the
    same storage.
    """

    def __init__(
        self,
        config: T3Config,
        rows: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (config.n_layers, 2, rows, config.n_heads, capacity, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)

    def keep_rows(self, rows: Tensor) -> None:
        """Move rows `rows` (in that order) to the front, one layer at a time to bound the temporary."""
        n = rows.numel()
        for i in range(self.kv.shape[0]):
            self.kv[i, :, :n] = self.kv[i, :, rows]


def add_linear_(residual: Tensor, linear: nn.Module, x: Tensor) -> Tensor:
    """residual + linear(x). For a plain bias-free Linear the sum is written into `residual` by the matmul
    itself (addmm_ with beta 1): one kernel instead of a matmul and an add."""
    if type(linear) is not nn.Linear or linear.bias is not None:
        return residual + linear(x)
    dim = residual.shape[-1]
    residual.view(-1, dim).addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    return residual


def _fuse_linears(*linears: nn.Linear) -> Tensor | None:
    """Concatenate bias-free Linears' weights along the output dim and point each Linear at its slice.
    Returns None (nothing fused) unless all are plain nn.Linear: bitsandbytes layers stay separate."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


class Attention(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        inner = config.n_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.qkv_weight: Tensor | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """One [3 * inner, hidden] weight for q, k and v (one matmul instead of three); the three Linears
        keep views of it, so nothing is stored twice. Only for plain (unquantized) Linears."""
        self.qkv_weight = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def qkv(self, x: Tensor) -> Tensor:
        """[rows, T, 3 * inner]: one matmul when fused, else the three projections side by side."""
        if self.qkv_weight is not None:
            return F.linear(x, self.qkv_weight)
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        cache: Tensor | None = None,
        columns: Tensor | None = None,
        bias: Tensor | None = None,
        watch: tuple[list[int], list[Tensor]] | None = None,
    ) -> Tensor:
        """Attention output before o_proj, [rows, T, inner]. Without a cache: causal over x. With one
        ([2, rows, H, capacity, D]): x's keys/values go to cache `columns` [T] and every query attends to
        the whole cache under the additive `bias` [rows, 1, T, capacity]. `watch` (heads, sink), with a
        cache: each head's attention probabilities [rows, T, capacity] (float32) are appended to sink."""
        rows, length, _ = x.shape
        heads = rope(self.qkv(x).view(rows, length, 3 * self.n_heads, self.head_dim))
        return attend(heads, self.n_heads, cache, columns, bias, watch)


def attend(
    heads: Tensor,
    n_heads: int,
    cache: Tensor | None = None,
    columns: Tensor | None = None,
    bias: Tensor | None = None,
    watch: tuple[list[int], list[Tensor]] | None = None,
) -> Tensor:
    """Attention of heads [rows, 3H, T, D] (q, k, v) -> [rows, T, H * D]; see Attention.forward."""
    rows, _, length, head_dim = heads.shape
    q, kv = heads.split([n_heads, 2 * n_heads], dim=1)
    if cache is None:
        k, v = kv.chunk(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        cache.index_copy_(3, columns, kv.unflatten(1, (2, n_heads)).transpose(0, 1))
        out = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=bias)
        if watch is not None:
            watched, sink = watch
            for head in watched:  # the probabilities SDPA does not return, for a few heads
                scores = q[:, head] @ cache[0][:, head].transpose(-1, -2) * head_dim**-0.5
                sink.append(torch.softmax(scores.float() + bias[:, 0].float(), dim=-1))
    return out.transpose(1, 2).reshape(rows, length, -1)


class MLP(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: Tensor | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        self.gate_up_weight = _fuse_linears(self.gate_proj, self.up_proj)

    def hidden(self, x: Tensor) -> Tensor:
        """silu(gate) * up, the input of down_proj."""
        if self.gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        cache: Tensor | None = None,
        columns: Tensor | None = None,
        bias: Tensor | None = None,
        watch: tuple[list[int], list[Tensor]] | None = None,
    ) -> Tensor:
        """Updates the residual stream x in place (see add_linear_) and returns it."""
        attn = self.self_attn(self.input_layernorm(x), rope, cache, columns, bias, watch)
        x = add_linear_(x, self.self_attn.o_proj, attn)
        return add_linear_(x, self.mlp.down_proj, self.mlp.hidden(self.post_attention_layernorm(x)))


class LlamaBackbone(nn.Module):
    """The transformer stack. Takes embeddings, returns final-norm hidden states."""

    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.backbone_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_swap", rope_swap(config.head_dim), persistent=False)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into single matmuls in every layer (fewer kernels per decode step)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """Recompute the RoPE tables (float32) on `device`, e.g. after loading a model built on `meta`."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)
        self.rope_swap = rope_swap(self.config.head_dim, device)

    def forward(self, x: Tensor) -> Tensor:
        """x: [rows, T, hidden], a whole sequence from position 0, causal -> final-norm hidden states."""
        length = x.shape[1]
        rope = Rope(self.rope_cos[:length].to(x.dtype), self.rope_sin[:length].to(x.dtype))
        x = x.clone()  # the layers add into the residual stream in place
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def forward_cached(
        self,
        x: Tensor,
        cache: Sequence[Tensor],
        columns: Tensor,
        positions: Tensor,
        key_valid: Tensor,
        watch: Sequence[tuple[int, int]] = (),
        sink: list[Tensor] | None = None,
    ) -> Tensor:
        """Run x [rows, T, hidden] against a KV cache (per layer [2 (k, v), rows, H, capacity, D]).

        x's keys and values are written to cache `columns` [T]; `positions` [rows, T] are their RoPE
        positions (a row padded on the left starts counting after its padding); `key_valid` [rows, capacity]
        is False at padding columns. A query sees valid columns up to its own, and always itself, so a
        padding query's scores are never all masked. The attention probabilities of the `watch`ed
        (layer, head)s are appended to `sink`, in that order (see Attention.forward).
        """
        rows, length, _ = x.shape
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [rows, T, D], float32
        if length == 1:
            rotation = rotation_matrices(cos[:, 0], sin[:, 0], self.rope_swap.float())
            identity = torch.eye(rotation.shape[-1], device=x.device).expand_as(rotation)
            per_head_group = torch.stack((rotation, rotation, identity), dim=1)  # q, k, v
            rope = Rope(rotation=per_head_group.flatten(0, 1).to(x.dtype))
        else:
            rope = Rope(cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))
        x = x.clone()  # the layers add into the residual stream in place
        return self.norm(run_cached(self.layers, x, rope, cache, columns, key_valid, watch, sink))


def run_cached(
    layers: Sequence[nn.Module],
    x: Tensor,
    rope: Rope | None,
    cache: Sequence[Tensor],
    columns: Tensor,
    key_valid: Tensor,
    watch: Sequence[tuple[int, int]],
    sink: list[Tensor] | None,
) -> Tensor:
    """Run `layers` over x against the KV cache under the causal, padding-aware mask (see
    LlamaBackbone.forward_cached); returns the residual stream before the final norm."""
    slots = torch.arange(key_valid.shape[1], device=x.device)
    visible = (key_valid[:, None, :] & (slots <= columns[:, None])) | (slots == columns[:, None])
    bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, -math.inf)
    bias = bias[:, None]  # [rows, 1, T, capacity]
    heads: dict[int, list[int]] = {}
    for layer_index, head in watch:
        heads.setdefault(layer_index, []).append(head)
    probs: dict[int, list[Tensor]] = {i: [] for i in heads}
    for i, (layer, layer_cache) in enumerate(zip(layers, cache, strict=True)):
        watched = (heads[i], probs[i]) if i in heads else None
        if rope is None:
            x = layer(x, layer_cache, columns, bias, watched)
        else:
            x = layer(x, rope, layer_cache, columns, bias, watched)
    if watch:
        assert sink is not None
        sink.extend(probs[i][heads[i].index(head)] for i, head in watch)
    return x


# ---------------------------------------------------------------------------------------------------------
# GPT-2 backbone (Turbo)


class GPT2Attention(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        inner = config.n_heads * config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * inner)  # q | k | v
        self.c_proj = nn.Linear(inner, config.hidden_size)

    def forward(
        self,
        x: Tensor,
        cache: Tensor | None = None,
        columns: Tensor | None = None,
        bias: Tensor | None = None,
        watch: tuple[list[int], list[Tensor]] | None = None,
    ) -> Tensor:
        """Attention output before c_proj, [rows, T, inner]; as Attention.forward, without RoPE."""
        rows, length, _ = x.shape
        heads = self.c_attn(x).view(rows, length, 3 * self.n_heads, self.head_dim).transpose(1, 2)
        return attend(heads, self.n_heads, cache, columns, bias, watch)


class GPT2MLP(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        fc = self.c_fc
        if x.is_cuda and type(fc) is nn.Linear:
            # The bias and tanh-GELU as the matmul's cuBLASLt epilogue: one kernel instead of two (Turbo
            # fp16 decoding +2.7 % on an H100, benchmarks/decode_profile.py). Not on the CPU, where
            # _addmm_activation's GELU is the erf one.
            flat = x.reshape(-1, x.shape[-1])
            hidden = torch._addmm_activation(fc.bias, flat, fc.weight.t(), use_gelu=True)
            return self.c_proj(hidden.view(*x.shape[:-1], -1))
        return self.c_proj(F.gelu(fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


# Decode steps of GPT-2 blocks through models/gpt2_fused.py's Triton kernels where they apply (CUDA, 1-4
# rows, 16-bit plain Linears): five launches a layer instead of about eleven. Turbo fp16 at batch 1 on an
# H100: 998 tokens/s against 698 on the torch path (benchmarks/decode_profile.py). False: torch only.
FUSED_GPT2_DECODE = True


@functools.cache
def _gpt2_fused() -> ModuleType:
    """models/gpt2_fused, imported on first use (importing triton takes a while)."""
    from chatterbox_cli.models import gpt2_fused

    return gpt2_fused


class GPT2Block(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(
        self,
        x: Tensor,
        cache: Tensor | None = None,
        columns: Tensor | None = None,
        bias: Tensor | None = None,
        watch: tuple[list[int], list[Tensor]] | None = None,
    ) -> Tensor:
        if cache is not None and x.shape[1] == 1 and watch is None and (fused := self._fused_kernels(x)):
            return self._fused_step(fused, x, cache, columns, bias)
        x = x + self.attn.c_proj(self.attn(self.ln_1(x), cache, columns, bias, watch))
        return x + self.mlp(self.ln_2(x))

    def _fused_kernels(self, x: Tensor) -> ModuleType | None:
        """gpt2_fused where it takes this step's rows and every Linear of the block, else None."""
        if not FUSED_GPT2_DECODE or not x.is_contiguous():
            return None
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            return None  # on the CPU only under Triton's interpreter (tests)
        linears = (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)
        if any(type(m) is not nn.Linear for m in linears):  # bitsandbytes and AWQ layers: the torch path
            return None
        fused = _gpt2_fused()
        weights = [t for m in (*linears, self.ln_1, self.ln_2) for t in (m.weight, m.bias)]
        return fused if fused.usable(x.view(x.shape[0], -1), *weights) else None  # False without triton

    def _fused_step(
        self, fused: ModuleType, x: Tensor, cache: Tensor, columns: Tensor | None, bias: Tensor | None
    ) -> Tensor:
        """One token per row [rows, 1, hidden] through the block; x is updated in place and returned."""
        rows = x.shape[0]
        h = x.view(rows, -1)
        attn, mlp = self.attn, self.mlp
        qkv = fused.layer_norm_linear(
            h, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps, attn.c_attn.weight, attn.c_attn.bias
        )
        heads = qkv.view(rows, 1, 3 * attn.n_heads, attn.head_dim).transpose(1, 2)
        out = attend(heads, attn.n_heads, cache, columns, bias).reshape(rows, -1).contiguous()
        fused.linear_add_(h, out, attn.c_proj.weight, attn.c_proj.bias)
        up = fused.layer_norm_linear(
            h, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, mlp.c_fc.weight, mlp.c_fc.bias, gelu=True
        )
        fused.linear_add_(h, up, mlp.c_proj.weight, mlp.c_proj.bias)
        return x


class GPT2Backbone(nn.Module):
    """GPT-2's stack with its learned positions; takes embeddings, returns final-norm hidden states. Its
    token embedding `wte` is in the checkpoint but not in this module (T3 feeds embeddings)."""

    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.config = config
        self.wpe = nn.Embedding(config.gpt2_positions, config.hidden_size)
        self.h = nn.ModuleList([GPT2Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def fuse_projections(self) -> None:
        """q/k/v are already one matmul (c_attn)."""

    def forward(self, x: Tensor) -> Tensor:
        """x: [rows, T, hidden], a whole sequence from position 0, causal -> final-norm hidden states."""
        x = x + self.wpe.weight[: x.shape[1]]
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def forward_cached(
        self,
        x: Tensor,
        cache: Sequence[Tensor],
        columns: Tensor,
        positions: Tensor,
        key_valid: Tensor,
        watch: Sequence[tuple[int, int]] = (),
        sink: list[Tensor] | None = None,
    ) -> Tensor:
        """As LlamaBackbone.forward_cached; `positions` [rows, T] index `wpe`."""
        x = x + self.wpe(positions)
        return self.ln_f(run_cached(self.h, x, None, cache, columns, key_valid, watch, sink))


# ---------------------------------------------------------------------------------------------------------
# Conditioning encoder


class PerceiverAttention(nn.Module):
    """Pre-norm multi-head attention with a residual; one LayerNorm shared by queries and keys/values."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        q_in, kv_in = self.norm(queries), self.norm(context)

        def heads(t: Tensor) -> Tensor:
            rows, length, dim = t.shape
            return t.view(rows, length, self.n_heads, dim // self.n_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.to_q(q_in)), heads(self.to_k(kv_in)), heads(self.to_v(kv_in))
        )
        rows, _, length, _ = out.shape
        return queries + self.proj_out(out.transpose(1, 2).reshape(rows, length, -1))


class Perceiver(nn.Module):
    """Resamples a variable-length prompt to a fixed number of learned queries (cross- then self-attention,
    both through the same attention block)."""

    def __init__(self, n_queries: int, dim: int, n_heads: int) -> None:
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.zeros(1, n_queries, dim))
        self.attn = PerceiverAttention(dim, n_heads)

    def forward(self, prompt: Tensor) -> Tensor:
        queries = self.pre_attention_query.expand(prompt.shape[0], -1, -1)
        summary = self.attn(queries, prompt)
        return self.attn(summary, summary)


class CondEncoder(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.speaker_embed_size = config.speaker_embed_size
        self.spkr_enc = nn.Linear(config.speaker_embed_size, config.hidden_size)
        self.emotion_adv_fc = nn.Linear(1, config.hidden_size, bias=False) if config.emotion_input else None
        self.perceiver = (
            Perceiver(config.perceiver_queries, config.hidden_size, config.perceiver_heads)
            if config.perceiver_queries
            else None
        )

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor | None, emotion_adv: Tensor) -> Tensor:
        """[B, 256], [B, P, hidden] | None, [B, 1, 1] -> [B, cond_len, hidden]."""
        parts = [self.spkr_enc(speaker_emb.reshape(-1, self.speaker_embed_size))[:, None]]
        if prompt_emb is not None:
            parts.append(prompt_emb if self.perceiver is None else self.perceiver(prompt_emb))
        if self.emotion_adv_fc is not None:
            parts.append(self.emotion_adv_fc(emotion_adv.reshape(-1, 1, 1)))
        return torch.cat(parts, dim=1)


class LearnedPositions(nn.Module):
    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)

    def forward(self, length: int) -> Tensor:
        """Embeddings of positions 0..length-1: [length, dim]."""
        return self.emb.weight[:length]


# ---------------------------------------------------------------------------------------------------------
# T3


@dataclass
class T3Output:
    text_logits: Tensor | None  # [rows, T_text, text_vocab]; None without a text head (drop_text_head)
    speech_logits: Tensor  # [rows, T_speech, speech_vocab]
    cond_emb: Tensor  # [rows, cond_len, hidden]
    hidden: Tensor = field(repr=False)  # [rows, cond_len + T_text + T_speech, hidden]


def combine_cfg(logits: Tensor, cfg_weight: float) -> Tensor:
    """Classifier-free guidance: rows are [conditional rows; unconditional rows] in two equal halves,
    combined as cond + w * (cond - uncond)."""
    cond, uncond = logits.chunk(2)
    return cond + cfg_weight * (cond - uncond)


STOP_CHECK_EVERY = 16  # decode steps between host reads of the stop token
CAPACITY_BLOCK = 64  # KV-cache columns are allocated in blocks of this many


def _decode_body(
    model: T3,
    tokens: Tensor,
    texts: int,
    per_text: int,
    column: Tensor,
    positions: Tensor,
    speech_position: Tensor,
    key_valid: Tensor,
    cache: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """One token per text in (the first `texts` of `tokens`); next speech logits per row out ([rows, V]),
    and with `model.alignment_heads` those heads' mean attention of each text's conditional row over the
    cache ([texts, capacity], float32), else None.

    Rows are the texts' conditional rows, then (per_text 2: CFG) their unconditional rows, which get the
    same token. The buffers are whole and sliced here, so compiled code sees fixed storage.
    """
    rows = texts * per_text
    emb = model.embed_speech(tokens[:texts, None], speech_position)
    if per_text > 1:
        emb = emb.repeat(per_text, 1, 1)
    views = layer_views(cache, rows)
    sink: list[Tensor] = []
    hidden = model.tfmr.forward_cached(
        emb, views, column, positions[:rows, None], key_valid[:rows], model.alignment_heads, sink
    )
    attention = torch.stack(sink).mean(dim=0)[:texts, -1] if sink else None
    return model.speech_head(hidden[:, -1]), attention


@functools.cache
def _compiled_decode_body() -> Callable[..., Tensor]:
    return torch.compile(_decode_body, mode="reduce-overhead")


class DecodeStep:
    """Decoding a batch of texts with static shapes: each `advance` samples one speech token per text from
    the current logits and runs it through the backbone to the next logits.

    Logits, tokens, positions, the repetition mask, the output and the KV cache live in fixed buffers, so
    on CUDA the whole advance (sampling and all layers) is captured once as a CUDA graph and replayed:
    one launch per token, and the host never waits for the GPU between stop checks. Each text samples
    from its own generator; captured random ops draw from the same generator offsets as eager ones
    (PyTorch's graph-safe RNG), so graphed and eager decoding give the same tokens.
    `keep` moves the rows of unfinished texts to the front of the same buffers; later steps run (and are
    captured) for the smaller batch.
    """

    def __init__(
        self,
        model: T3,
        cfg_weight: float,
        capacity: int,
        pads: Tensor,
        sampling: SamplingSettings,
        generators: Sequence[torch.Generator | None],
        *,
        length: int,
        ignore_stop: bool,
        guard: AlignmentGuard | None = None,
        text_columns: Tensor | None = None,
        cuda_graph: bool = True,
        compiled: bool = False,
    ) -> None:
        self.model = model
        self.texts = len(generators)
        self.cfg_weight = cfg_weight
        self.per_text = 2 if cfg_weight > 0 else 1
        self.sampling = sampling
        self.generators = list(generators)
        self.ignore_stop = ignore_stop
        config, device, rows = model.config, model.device, self.rows
        self.cache = KVCache(config, rows, capacity, device, model.dtype)
        self.logits = torch.zeros(rows, config.speech_vocab_size, dtype=model.dtype, device=device)
        # the latest token of each text; the start token before the first (the alignment guard reads it)
        self.tokens = torch.full((self.texts,), config.start_speech_token, dtype=torch.long, device=device)
        self.seen = torch.zeros(self.texts, config.speech_vocab_size, dtype=torch.bool, device=device)
        self.seen[:, config.start_speech_token] = config.start_in_history
        self.out = torch.zeros(self.texts, length, dtype=torch.long, device=device)  # [text, step]
        self.out_rows = torch.arange(self.texts, device=device)  # the out row of each batch row
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # 1-d: a 0-d index syncs
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.speech_position = torch.zeros(1, dtype=torch.long, device=device)
        slots = torch.arange(capacity, device=device)
        self.pads = pads.to(device)
        self.key_valid = slots[None, :] >= self.pads[:, None]  # [rows, capacity]
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        # The multilingual alignment guard (models/alignment.py): its state, each text's cache columns of
        # its text tokens [texts, S], and the watched heads' attention over them from the last step
        # (zeros at the first step, where the guard does not read it).
        self.guard = guard
        if guard is not None:
            assert text_columns is not None
            self.text_columns = text_columns.to(device)
            self.attention = torch.zeros(text_columns.shape, dtype=torch.float32, device=device)
        on_cuda = device.type == "cuda"
        # torch.compile(mode="reduce-overhead") only on CUDA (CPU inductor needs a C++ toolchain); it brings
        # its own CUDA graphs around the backbone, which need the buffers it mutates marked static.
        self.compiled = compiled and on_cuda
        self.graphed = cuda_graph and on_cuda and not self.compiled
        if self.compiled:
            static = (self.cache.kv, self.tokens, self.column, self.positions, self.speech_position)
            for buffer in (*static, self.key_valid):
                torch._dynamo.mark_static_address(buffer)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # One graph memory pool per model, shared by every batch's graphs (they run one after another), so
        # later batches reuse the memory of earlier ones instead of each leaving a pool of its own behind.
        # A MemPool object keeps the pool alive between batches: a pool id whose graphs are all gone
        # cannot be captured into again.
        if self.graphed and model.decode_pool is None:
            model.decode_pool = torch.cuda.MemPool()
            model.warm_stream = torch.cuda.Stream(device)
        self.pool = model.decode_pool.id if self.graphed else None
        self.mode = "torch.compile" if self.compiled else "cuda-graph" if self.graphed else "eager"

    @property
    def rows(self) -> int:
        return self.texts * self.per_text

    def prefill(self, prompt: Tensor) -> None:
        """Run the left-padded prompts [rows, L, hidden]; their last position's logits come next."""
        length = prompt.shape[1]
        columns = torch.arange(length, device=prompt.device)
        positions = (columns[None, :] - self.pads[:, None]).clamp(min=0)
        hidden = self.model.tfmr.forward_cached(
            prompt, layer_views(self.cache.kv, self.rows), columns, positions, self.key_valid
        )
        self.logits.copy_(self.model.speech_head(hidden[:, -1]))
        self.column.fill_(length)
        self.positions.copy_(positions[:, -1] + 1)
        self.speech_position.fill_(1)  # the prompt ends with the start token at speech position 0

    def _sample(self) -> None:
        """Choose each text's next token into `tokens` and `out`; mark it seen."""
        texts, config = self.texts, self.model.config
        logits = self.logits[: self.rows]
        if self.cfg_weight > 0:
            logits = combine_cfg(logits, self.cfg_weight)
        logits = logits.to(torch.float32, copy=True)
        if self.guard is not None:
            logits = self.guard.step(
                self.attention[:texts], self.tokens[:texts], logits, config.stop_speech_token
            )
        if self.ignore_stop:
            logits[:, config.stop_speech_token] = float("-inf")
        seen = self.seen[:texts]
        if not config.start_in_history:  # the start token is the whole history at the first step only
            seen = seen.clone()
            seen[:, config.start_speech_token] |= self.step == 0
        token = choose_next_token(logits, seen, self.sampling, self.generators[:texts])
        self.out.index_put_((self.out_rows[:texts], self.step.expand(texts)), token)
        self.seen[:texts].scatter_(1, token[:, None], True)
        self.tokens[:texts].copy_(token)
        self.step += 1

    def _decode(self) -> tuple[Tensor, Tensor | None]:
        body = _compiled_decode_body() if self.compiled else _decode_body
        return body(
            self.model,
            self.tokens,
            self.texts,
            self.per_text,
            self.column,
            self.positions,
            self.speech_position,
            self.key_valid,
            self.cache.kv,
        )

    def _advance(self) -> None:
        self._sample()
        logits, attention = self._decode()
        self.logits[: self.rows].copy_(logits)
        if attention is not None:
            self.attention[: self.texts].copy_(attention.gather(1, self.text_columns[: self.texts]))
        self.column += 1
        self.positions += 1
        self.speech_position += 1

    def _capture(self) -> torch.cuda.CUDAGraph:
        # A warm-up of the backbone alone (lazy init, cuBLAS workspaces, attention plans for this batch)
        # writes garbage keys/values at the current column only, which the next real step overwrites
        # before anything reads it, and draws no random numbers.
        side = self.model.warm_stream
        assert side is not None
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for gen in {id(g): g for g in self.generators[: self.texts] if g is not None}.values():
            graph.register_generator_state(gen)  # the default generator registers itself
        with torch.cuda.graph(graph, pool=self.pool):
            self._advance()
        return graph

    def advance(self) -> None:
        """Sample the next token of every text in the batch and decode it (logits for the one after)."""
        if not self.graphed:
            self._advance()
            return
        if self.texts not in self.graphs:
            self.graphs = {self.texts: self._capture()}
        self.graphs[self.texts].replay()

    def keep(self, rows: list[int]) -> None:
        """Keep only these batch rows (indices into the current batch, in order) for the following steps."""
        index = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        full = torch.cat((index, index + self.texts)) if self.per_text == 2 else index
        self.cache.keep_rows(full)
        n = full.numel()
        self.positions[:n] = self.positions[full]
        self.key_valid[:n] = self.key_valid[full]
        self.logits[:n] = self.logits[full]
        self.seen[: len(rows)] = self.seen[index]
        self.out_rows[: len(rows)] = self.out_rows[index]
        self.tokens[: len(rows)] = self.tokens[index]
        if self.guard is not None:
            self.guard.keep(index)
            self.text_columns[: len(rows)] = self.text_columns[index]
            self.attention[: len(rows)] = self.attention[index]
        self.generators = [self.generators[r] for r in rows]
        self.texts = len(rows)


class Decoding:
    """A batch of texts being decoded (T3.start_batch): `run` advances it, possibly in several calls, so a
    caller can look at the tokens so far (`tokens`) before decoding goes on."""

    def __init__(self, step: DecodeStep, limits: list[int]) -> None:
        self.step = step
        self.limits = limits
        self.stop_token = step.model.config.stop_speech_token
        n = len(limits)
        self.decoded = [0] * n  # tokens decoded per text (past a stop too, until the host sees it)
        self.batch = list(range(n))  # the text in each row of the step's batch
        self.done: set[int] = set()
        self.steps = 0

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.limits)

    @torch.inference_mode()
    def run(self, until: int | None = None) -> None:
        """Decode until every text is finished, or until `until` tokens per text have been decoded."""
        step = self.step
        while not self.finished and (until is None or self.steps < until):
            step.advance()
            self.steps = i = self.steps + 1
            finished = {t for t in self.batch if t not in self.done and i >= self.limits[t]}
            # The host looks for stop tokens only every STOP_CHECK_EVERY steps, so the GPU never waits for
            # the CPU in between; the few tokens decoded past a stop are cut in `tokens`.
            if not step.ignore_stop and i % STOP_CHECK_EVERY == 0:
                window = step.out[:, i - STOP_CHECK_EVERY : i]
                stopped = (window == self.stop_token).any(dim=1).tolist()
                finished |= {t for t in self.batch if t not in self.done and stopped[t]}
            for t in finished:
                self.decoded[t] = i
            self.done |= finished
            live = [r for r, t in enumerate(self.batch) if t not in self.done]
            # Finished texts leave the batch; with CUDA graphs (one capture per batch size) only once at
            # most half of the rows are still needed, so a batch is captured a few times, not once per text.
            shrink = len(live) < len(self.batch) and (not step.graphed or 2 * len(live) <= len(self.batch))
            if live and shrink:
                step.keep(live)
                self.batch = [self.batch[r] for r in live]

    def _length(self, text: int, host_row: Tensor) -> int:
        """How many of text `text`'s tokens so far (all, once finished) come before a stop token, from its
        output row read to the host."""
        length = self.decoded[text] if text in self.done else self.steps
        stops = (host_row[:length] == self.stop_token).nonzero()
        return int(stops[0, 0]) if stops.numel() else length

    def tokens_of(self, texts: Sequence[int]) -> list[Tensor]:
        """The speech tokens of each of `texts` so far (all, once finished), without a stop token and
        after, on the host, from one read of the GPU."""
        host = self.step.out[:, : self.steps].cpu()
        return [host[t, : self._length(t, host[t])] for t in texts]

    def results(self) -> list[Tensor]:
        """Every text's tokens on the model's device (one read of the output); call after `run` finished."""
        if not self.finished:
            raise RuntimeError("decoding is not finished; call run() first")
        host = self.step.out.cpu()
        return [self.step.out[t, : self._length(t, host[t])].clone() for t in range(len(self.limits))]


class T3(nn.Module):
    def __init__(self, config: T3Config | None = None) -> None:
        super().__init__()
        config = config or T3Config.english()
        self.config = config
        dim = config.hidden_size
        self.tfmr = GPT2Backbone(config) if config.backbone == "gpt2" else LlamaBackbone(config)
        self.cond_enc = CondEncoder(config)
        self.text_emb = nn.Embedding(config.text_vocab_size, dim)
        self.speech_emb = nn.Embedding(config.speech_vocab_size, dim)
        if config.segment_positions:
            self.text_pos_emb = LearnedPositions(config.text_positions, dim)
            self.speech_pos_emb = LearnedPositions(config.speech_positions, dim)
        self.text_head: nn.Linear | None = nn.Linear(dim, config.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(dim, config.speech_vocab_size, bias=config.speech_head_bias)
        # The checkpoint's layout where it differs from this module's (models/loading.py)
        self.stored_transposed = stored_transposed(config)
        self.stored_unused = stored_unused(config)
        self.last_decode_mode = "none"  # how the last generate() ran its steps: eager, cuda-graph, ...
        # (layer, head)s of the multilingual alignment guard (models/alignment.py); () decodes without it.
        # Set by the loader from the variant (variants.Variant.alignment_guard).
        self.alignment_heads: tuple[tuple[int, int], ...] = ()
        self.decode_pool: torch.cuda.MemPool | None = None  # CUDA-graph memory of decoding (DecodeStep)
        # The side stream of every capture's warm-up. One per model: freed blocks are cached for the stream
        # that used them, and cuBLAS keeps a workspace per stream, so a new stream per batch left about
        # 20 MiB behind at every chunk (H100, benchmarks/small_card.py).
        self.warm_stream: torch.cuda.Stream | None = None

    def drop_text_head(self) -> None:
        """Leave text_head out before loading for synthesis: decoding never reads text logits (training
        does), and Turbo's is 50,276 x 1,024 (103 MB at 16 bits). Its tensor stays in the file, unread."""
        if self.text_head is not None:
            self.stored_unused = {**self.stored_unused, TEXT_HEAD: tuple(self.text_head.weight.shape)}
            self.text_head = None

    def keep_text_table_on_host(self) -> None:
        """Move the text embedding table to host memory: it is read once per text, for its prompt (a few
        hundred rows gathered on the CPU and copied over), and Turbo's 50,276 x 1,024 table is 103 MB at
        16 bits. Everything else stays where it is."""
        self.text_emb.to("cpu")

    @property
    def device(self) -> torch.device:
        return self.speech_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.speech_emb.weight.dtype

    # -- embeddings ---------------------------------------------------------------------------------------

    def encode_cond(self, cond: T3Cond) -> Tensor:
        """Conditioning prefix [B, cond_len, hidden] (cond_len = 2 without a speech prompt)."""
        dtype, device = self.dtype, self.device
        prompt_emb = None
        tokens = cond.cond_prompt_speech_tokens
        if tokens is not None:
            prompt_emb = self.embed_speech(tokens.to(device=device, dtype=torch.long))
        return self.cond_enc(
            cond.speaker_emb.to(device=device, dtype=dtype),
            prompt_emb,
            cond.emotion_adv.to(device=device, dtype=dtype),
        )

    def embed_text(self, text_tokens: Tensor, *, with_uncond_row: bool = False) -> Tensor:
        """Text embeddings plus positions, [B, T] -> [B, T, hidden].

        `with_uncond_row` (B must be 1) appends the unconditional CFG row: position embeddings only, the
        token embeddings zeroed — what the reference feeds its unconditional row.
        """
        table = self.text_emb.weight  # in host memory once keep_text_table_on_host ran
        emb = F.embedding(text_tokens.to(table.device), table).to(self.device)
        if not self.config.segment_positions:
            return torch.cat((emb, torch.zeros_like(emb[:1])), dim=0) if with_uncond_row else emb
        positions = self.text_pos_emb(text_tokens.shape[1])
        emb = emb + positions
        if with_uncond_row:
            emb = torch.cat((emb, positions.expand(1, -1, -1)), dim=0)
        return emb

    def embed_speech(self, tokens: Tensor, first_position: int | Tensor = 0) -> Tensor:
        """Speech embeddings plus segment positions for tokens [rows, T] starting at `first_position` (an int,
        or a 1-element tensor for one token per row, as a decode step has it)."""
        emb = self.speech_emb(tokens)
        if not self.config.segment_positions:
            return emb
        table = self.speech_pos_emb.emb.weight
        if isinstance(first_position, Tensor):
            return emb + table[first_position]
        return emb + table[first_position : first_position + tokens.shape[1]]

    # -- teacher forcing ----------------------------------------------------------------------------------

    def forward(
        self, text_tokens: Tensor, speech_tokens: Tensor, cond: T3Cond, *, cfg: bool = False
    ) -> T3Output:
        """Logits for a whole known sequence (one pass, causal).

        text_tokens [B, Tt] (with start/stop), speech_tokens [B, Ts] (starting with the start token).
        A conditioning batch of 1 is shared by all rows. With `cfg`, B must be 1 and a second, unconditional
        row is added (text token embeddings zeroed), as decoding with guidance does.
        """
        cond_emb = self.encode_cond(cond)
        if cfg:
            if text_tokens.shape[0] != 1 or speech_tokens.shape[0] != 1:
                raise ValueError("forward(cfg=True) takes one row of text and speech tokens")
            speech_tokens = speech_tokens.expand(2, -1)
        text = self.embed_text(text_tokens, with_uncond_row=cfg)
        speech = self.embed_speech(speech_tokens)
        rows = text.shape[0]
        cond_emb = cond_emb.expand(rows, -1, -1)
        hidden = self.tfmr(torch.cat((cond_emb, text, speech), dim=1))
        n_cond, n_text = cond_emb.shape[1], text.shape[1]
        return T3Output(
            text_logits=None
            if self.text_head is None
            else self.text_head(hidden[:, n_cond : n_cond + n_text]),
            speech_logits=self.speech_head(hidden[:, n_cond + n_text :]),
            cond_emb=cond_emb,
            hidden=hidden,
        )

    # -- decoding -----------------------------------------------------------------------------------------

    def prompt_embeds(self, text_tokens: Tensor, cond: T3Cond, rows: int) -> Tensor:
        """The prefill sequence of one text [rows, cond_len + T + starts, hidden] (rows 2: with the CFG
        row), ending with `config.prompt_start_tokens` start-of-speech tokens.

        English and multilingual end with it twice, both at speech position 0: once as the speech segment
        and once as the "BOS" the reference's decoding loop appends. That is what the reference computes
        (and what the released weights were used with), so it is kept. Turbo's ends with it once.
        """
        cond_emb = self.encode_cond(cond)
        if cond_emb.shape[0] != 1:
            raise ValueError("generate() takes conditioning for one voice (batch 1)")
        text = self.embed_text(text_tokens, with_uncond_row=rows == 2)
        starts = self.config.prompt_start_tokens
        start = torch.full((1, starts), self.config.start_speech_token, dtype=torch.long, device=self.device)
        bos = self.embed_speech(start, torch.zeros(1, dtype=torch.long, device=self.device))
        return torch.cat((cond_emb.expand(rows, -1, -1), text, bos.expand(rows, -1, -1)), dim=1)

    def batch_prompt(self, texts: Sequence[Tensor], cond: T3Cond, cfg: bool) -> tuple[Tensor, Tensor]:
        """Prompts of several texts, left-padded to one length so they all end at the same column.

        Returns embeddings [rows, L, hidden] (the texts' conditional rows, then with `cfg` their
        unconditional rows) and each row's padding length [rows].
        """
        per_text = 2 if cfg else 1
        prompts = [self.prompt_embeds(t, cond, per_text) for t in texts]
        length = max(p.shape[1] for p in prompts)
        rows = [F.pad(p[r], (0, 0, length - p.shape[1], 0)) for r in range(per_text) for p in prompts]
        pads = [length - p.shape[1] for _ in range(per_text) for p in prompts]
        return torch.stack(rows), torch.tensor(pads, dtype=torch.long, device=self.device)

    def _check_text_tokens(self, text_tokens: Tensor) -> Tensor:
        tokens = torch.atleast_2d(text_tokens).to(device=self.device, dtype=torch.long)
        if tokens.shape[0] != 1:
            raise ValueError(f"give one text per sequence, got a batch of {tokens.shape[0]}")
        cfg = self.config
        wrapped = int(tokens[0, 0]) == cfg.start_text_token and int(tokens[0, -1]) == cfg.stop_text_token
        if cfg.wrap_text and not wrapped:
            raise ValueError(
                f"text tokens must start with {cfg.start_text_token} and end with {cfg.stop_text_token} "
                "(pipeline.text_tokens wraps them)"
            )
        if tokens.shape[1] > cfg.text_positions:
            raise ValueError(
                f"{tokens.shape[1]} text tokens exceed the model's limit of {cfg.text_positions}"
            )
        return tokens

    def _check_limit(self, max_new_tokens: int) -> int:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens + 1 > self.config.speech_positions:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} exceeds the speech length limit "
                f"{self.config.speech_positions - 1}"
            )
        return max_new_tokens

    def generate(
        self,
        text_tokens: Tensor,
        cond: T3Cond,
        *,
        max_new_tokens: int = 1000,
        cfg_weight: float = 0.5,
        sampling: SamplingSettings | None = None,
        generator: torch.Generator | None = None,
        ignore_stop: bool = False,
        cuda_graph: bool = True,
        compiled: bool = False,
    ) -> Tensor:
        """Decode speech tokens for one text [T] or [1, T]. Returns LongTensor [n] without start/stop
        tokens. See generate_batch."""
        return self.generate_batch(
            [text_tokens],
            cond,
            max_new_tokens=max_new_tokens,
            cfg_weight=cfg_weight,
            sampling=sampling,
            generators=[generator],
            ignore_stop=ignore_stop,
            cuda_graph=cuda_graph,
            compiled=compiled,
        )[0]

    @torch.inference_mode()
    def start_batch(
        self,
        texts: Sequence[Tensor],
        cond: T3Cond,
        *,
        max_new_tokens: int | Sequence[int] = 1000,
        cfg_weight: float = 0.5,
        sampling: SamplingSettings | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        ignore_stop: bool = False,
        cuda_graph: bool = True,
        compiled: bool = False,
    ) -> Decoding:
        """Start decoding speech tokens for several texts at once, all in one voice: the prompts are run
        and a Decoding is returned, which `run` advances (see generate_batch).

        cfg_weight > 0 runs a conditional and an unconditional row per text; 0 runs only the conditional
        row (half the KV cache). `max_new_tokens` is one limit or one per text. Each text samples from its
        own generator (`generators`, None: torch's global RNG), so its tokens do not depend on which texts
        share its batch. With `ignore_stop` the stop token is never sampled and each text gets exactly its
        limit. Finished texts leave the batch at the next stop check. On CUDA each step replays a captured
        CUDA graph unless `cuda_graph` is False; `compiled` uses torch.compile(mode="reduce-overhead")
        and its graphs instead (CUDA only; slower on the H100, see benchmarks/speed.py).
        `last_decode_mode` says which ran.
        """
        n = len(texts)
        if n == 0:
            raise ValueError("no texts to decode")
        sampling = sampling or SamplingSettings()
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != n:
            raise ValueError(f"{len(limits)} max_new_tokens for {n} texts")
        limits = [self._check_limit(m) for m in limits]
        if cfg_weight < 0:
            raise ValueError(f"cfg_weight must be >= 0, got {cfg_weight}")
        gens = list(generators) if generators is not None else [None] * n
        if len(gens) != n:
            raise ValueError(f"{len(gens)} generators for {n} texts")
        tokens = [self._check_text_tokens(t) for t in texts]
        prompt, pads = self.batch_prompt(tokens, cond, cfg_weight > 0)
        guard, text_columns = None, None
        if self.alignment_heads:
            lengths = torch.tensor([t.shape[1] for t in tokens], device=self.device)
            guard = AlignmentGuard.start(lengths)
            # every prompt ends at the same column: its text, then the start-of-speech token(s)
            first = prompt.shape[1] - self.config.prompt_start_tokens - lengths
            text_columns = (first[:, None] + torch.arange(int(lengths.max()), device=self.device)).clamp(
                max=prompt.shape[1] - 1
            )
        length = max(limits)
        # capacity in whole blocks: texts of similar lengths share attention shapes (and kernel plans)
        capacity = -(-(prompt.shape[1] + length) // CAPACITY_BLOCK) * CAPACITY_BLOCK
        step = DecodeStep(
            self,
            cfg_weight,
            capacity,
            pads,
            sampling,
            gens,
            length=length,
            ignore_stop=ignore_stop,
            guard=guard,
            text_columns=text_columns,
            cuda_graph=cuda_graph,
            compiled=compiled,
        )
        self.last_decode_mode = step.mode
        step.prefill(prompt)
        return Decoding(step, limits)

    def generate_batch(self, texts: Sequence[Tensor], cond: T3Cond, **options: Any) -> list[Tensor]:
        """Decode speech tokens for several texts at once, all in one voice. Returns one LongTensor [n_i]
        per text, without start/stop tokens. Options as for start_batch."""
        if not texts:
            return []
        decoding = self.start_batch(texts, cond, **options)
        decoding.run()
        return decoding.results()


def _stable_seed(seed: int, name: str) -> int:
    """A seed per tensor name that does not depend on Python's randomised str hash."""
    h = 1469598103934665603
    for byte in name.encode():
        h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return (h ^ (seed * 0x9E3779B97F4A7C15)) % (1 << 63)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, kind: str) -> Tensor:
    """One seeded float32 tensor: kind 'normal' (std 0.02), 'ones', 'zeros' or 'uniform' (±sqrt(3/n))."""
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(_stable_seed(seed, name))
    if kind == "normal":
        return torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    if kind == "uniform":
        bound = math.sqrt(3.0 / shape[-2]) if len(shape) >= 2 else 0.1
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    raise ValueError(kind)


def _init_kind(name: str) -> str:
    if name.endswith(("norm.weight", "layernorm.weight", ".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
        return "ones"
    if name.endswith("norm.bias"):
        return "zeros"
    if name.endswith("pre_attention_query"):
        return "uniform"
    return "normal"


# GPT-2 stores its Linear weights as Conv1D, [in, out]: the weights of these, in each block.
_CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
GPT2_TOKEN_EMBEDDING = "tfmr.wte.weight"  # stored, unused: T3 feeds embeddings
TEXT_HEAD = "text_head.weight"  # stored, unused in synthesis (T3.drop_text_head)
TEXT_TABLE = "text_emb.weight"  # in host memory in synthesis on a GPU (T3.keep_text_table_on_host)


def stored_transposed(config: T3Config) -> frozenset[str]:
    """Names of the weights the checkpoint stores transposed ([in, out]) against our nn.Linear."""
    if config.backbone != "gpt2":
        return frozenset()
    return frozenset(f"tfmr.h.{i}{suffix}" for i in range(config.n_layers) for suffix in _CONV1D_WEIGHTS)


def stored_unused(config: T3Config) -> dict[str, tuple[int, ...]]:
    """Tensors the checkpoint holds that T3 never uses (not read at load), with their shapes."""
    if config.backbone != "gpt2":
        return {}
    return {GPT2_TOKEN_EMBEDDING: (config.backbone_vocab_size, config.hidden_size)}


def t3_tensor_shapes(config: T3Config) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes of the checkpoint file for a config, without allocating anything."""
    with torch.device("meta"):
        model = T3(config)
    transposed = stored_transposed(config)
    shapes = {
        name: tuple(t.shape)[::-1] if name in transposed else tuple(t.shape)
        for name, t in model.state_dict().items()
    }
    return shapes | stored_unused(config)


def random_state_dict(config: T3Config, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random float32 T3 weights at a sane init scale (see iter_random_state_dict)."""
    return dict(iter_random_state_dict(config, seed))


def iter_random_state_dict(config: T3Config, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs one at a time, so a writer holds one tensor in memory.

    Linear/Embedding weights and biases: normal, std 0.02 (biases random rather than zero so parity tests
    exercise them); RMSNorm/LayerNorm weights: 1; the perceiver queries: uniform. Every tensor comes from
    its own generator seeded by (seed, name), so the result does not depend on module order.
    """
    for name, shape in t3_tensor_shapes(config).items():
        yield name, random_tensor(name, shape, seed, _init_kind(name))
