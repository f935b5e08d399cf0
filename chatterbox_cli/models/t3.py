"""T3: the text-to-speech-token model of Chatterbox (a Llama backbone with its own embeddings and heads).

Module and parameter names follow the official `t3_cfg.safetensors`, so its state dict loads strictly:
`tfmr.*` (the Llama stack, including an unused 8-row `embed_tokens`), `cond_enc.*`, `text_emb`,
`speech_emb`, `text_pos_emb.emb`, `speech_pos_emb.emb`, `text_head`, `speech_head`.

Sequence layout fed to the backbone:
    [conditioning (speaker, perceiver(prompt speech), emotion)] [text tokens] [speech tokens]
Text and speech tokens each get learned absolute position embeddings counted from 0 in their own segment;
on top of that the backbone applies RoPE over the whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    rms_norm_eps: float = 1e-5
    # Rows of the backbone's own token embedding; unused (T3 feeds embeddings) but present in the checkpoint.
    backbone_vocab_size: int = 8

    rope_theta: float = 500000.0
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    speech_cond_prompt_len: int = 150
    speaker_embed_size: int = 256
    perceiver_queries: int = 32
    perceiver_heads: int = 4

    @classmethod
    def english(cls) -> T3Config:
        return cls()

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
        """Conditioning prefix length with a speech prompt: speaker + perceiver outputs + emotion."""
        return 1 + self.perceiver_queries + 1

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
    """cos and sin [max_positions, head_dim], float32; each frequency appears in both halves."""
    inv_freq = llama3_inverse_frequencies(config, device)
    positions = torch.arange(config.max_positions, device=device).float()
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, T, D] by position; cos/sin are [T, D]. Pairs are (i, i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Preallocated keys and values for every layer: [layers, rows, heads, capacity, head_dim] each.

    Writes go to explicit positions (`index_copy_`), reads see the whole fixed-size buffer under a mask,
    so a decode step always has the same shapes.
    """

    def __init__(
        self,
        config: T3Config,
        rows: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (config.n_layers, rows, config.n_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity

    @staticmethod
    def nbytes_for(config: T3Config, rows: int, capacity: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * rows * config.n_heads * capacity * config.head_dim * element


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

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        rows, length, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(rows, length, self.n_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_cache, v_cache = cache
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, -1))


class MLP(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """The transformer stack. Takes embeddings, returns final-norm hidden states."""

    def __init__(self, config: T3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.backbone_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """Recompute the RoPE tables (float32) on `device`, e.g. after loading a model built on `meta`."""
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

    def forward(self, x: Tensor, cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """x: [rows, T, hidden]. Without a cache the sequence starts at position 0 and is causal.

        With a cache, `positions` [T] are the absolute positions of x; they are written into the cache and
        every query attends to cached positions <= its own.
        """
        length = x.shape[1]
        if cache is None:
            cos = self.rope_cos[:length].to(x.dtype)
            sin = self.rope_sin[:length].to(x.dtype)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.norm(x)

        assert positions is not None
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        slots = torch.arange(cache.capacity, device=x.device)
        mask = slots[None, :] <= positions[:, None]  # [T, capacity]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, (cache.k[i], cache.v[i]), positions, mask)
        return self.norm(x)


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
        self.emotion_adv_fc = nn.Linear(1, config.hidden_size, bias=False)
        self.perceiver = Perceiver(config.perceiver_queries, config.hidden_size, config.perceiver_heads)

    def forward(self, speaker_emb: Tensor, prompt_emb: Tensor | None, emotion_adv: Tensor) -> Tensor:
        """[B, 256], [B, P, hidden] | None, [B, 1, 1] -> [B, cond_len, hidden]."""
        parts = [self.spkr_enc(speaker_emb.reshape(-1, self.speaker_embed_size))[:, None]]
        if prompt_emb is not None:
            parts.append(self.perceiver(prompt_emb))
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
    text_logits: Tensor  # [rows, T_text, text_vocab]
    speech_logits: Tensor  # [rows, T_speech, speech_vocab]
    cond_emb: Tensor  # [rows, cond_len, hidden]
    hidden: Tensor = field(repr=False)  # [rows, cond_len + T_text + T_speech, hidden]


def combine_cfg(logits: Tensor, cfg_weight: float) -> Tensor:
    """Classifier-free guidance over rows (conditional, unconditional): cond + w * (cond - uncond)."""
    cond, uncond = logits[0:1], logits[1:2]
    return cond + cfg_weight * (cond - uncond)


STOP_CHECK_EVERY = 16  # decode steps between host reads of the stop token


class DecodeStep:
    """One decode step (a sampled speech token in, next speech logits out) with static shapes.

    The token, its positions and the KV cache live in fixed buffers, so on CUDA the whole step through the
    30-layer backbone can be captured once per utterance and replayed: one launch per token instead of
    hundreds, which is what makes batch-1 decoding GPU-bound rather than host-bound.
    """

    def __init__(self, model: T3, rows: int, capacity: int) -> None:
        self.model = model
        self.rows = rows
        device = model.device
        self.cache = KVCache(model.config, rows, capacity, device, model.dtype)
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.speech_position = torch.zeros(1, dtype=torch.long, device=device)  # 1-d: a 0-d index syncs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.mode = "eager"

    def _run(self) -> Tensor:
        m = self.model
        embeds = m.speech_emb(self.token[:, None]) + m.speech_pos_emb.emb.weight[self.speech_position]
        return m.step_logits(embeds.expand(self.rows, -1, -1), self.cache, self.position)

    def capture(self) -> None:
        """Record the step as a CUDA graph (all layers must be capturable: no host syncs)."""
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: lazy init, workspace allocation
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()
        self.mode = "cuda-graph"

    def start(self, prompt_len: int) -> None:
        """After the prefill: the first generated token sits at `prompt_len`, speech position 1."""
        self.position.fill_(prompt_len)
        self.speech_position.fill_(1)

    def __call__(self, token: Tensor) -> Tensor:
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._run()
        self.position += 1
        self.speech_position += 1
        return logits


class T3(nn.Module):
    def __init__(self, config: T3Config | None = None) -> None:
        super().__init__()
        config = config or T3Config.english()
        self.config = config
        dim = config.hidden_size
        self.tfmr = LlamaBackbone(config)
        self.cond_enc = CondEncoder(config)
        self.text_emb = nn.Embedding(config.text_vocab_size, dim)
        self.speech_emb = nn.Embedding(config.speech_vocab_size, dim)
        self.text_pos_emb = LearnedPositions(config.text_positions, dim)
        self.speech_pos_emb = LearnedPositions(config.speech_positions, dim)
        self.text_head = nn.Linear(dim, config.text_vocab_size, bias=False)
        self.speech_head = nn.Linear(dim, config.speech_vocab_size, bias=False)
        self.last_decode_mode = "none"  # how the last generate() ran its steps: eager or cuda-graph

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
            tokens = tokens.to(device=device, dtype=torch.long)
            prompt_emb = self.speech_emb(tokens) + self.speech_pos_emb(tokens.shape[1])
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
        positions = self.text_pos_emb(text_tokens.shape[1])
        emb = self.text_emb(text_tokens) + positions
        if with_uncond_row:
            emb = torch.cat((emb, positions.expand(1, -1, -1)), dim=0)
        return emb

    def embed_speech(self, tokens: Tensor, first_position: int = 0) -> Tensor:
        """Speech embeddings plus positions for tokens [rows, T] starting at `first_position`."""
        positions = self.speech_pos_emb.emb.weight[first_position : first_position + tokens.shape[1]]
        return self.speech_emb(tokens) + positions

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
            text_logits=self.text_head(hidden[:, n_cond : n_cond + n_text]),
            speech_logits=self.speech_head(hidden[:, n_cond + n_text :]),
            cond_emb=cond_emb,
            hidden=hidden,
        )

    # -- decoding -----------------------------------------------------------------------------------------

    def prompt_embeds(self, text_tokens: Tensor, cond: T3Cond, rows: int) -> Tensor:
        """The prefill sequence [rows, cond_len + T + 2, hidden].

        It ends with the start-of-speech token twice, both at speech position 0: once as the speech
        segment and once as the "BOS" the reference's decoding loop appends. That is what the reference
        computes (and what the released weights were used with), so it is kept.
        """
        cond_emb = self.encode_cond(cond)
        if cond_emb.shape[0] != 1:
            raise ValueError("generate() takes conditioning for one voice (batch 1)")
        text = self.embed_text(text_tokens, with_uncond_row=rows == 2)
        start = torch.full((1, 2), self.config.start_speech_token, dtype=torch.long, device=self.device)
        bos = self.speech_emb(start) + self.speech_pos_emb.emb.weight[0]
        return torch.cat((cond_emb.expand(rows, -1, -1), text, bos.expand(rows, -1, -1)), dim=1)

    def step_logits(self, embeds: Tensor, cache: KVCache, positions: Tensor) -> Tensor:
        """Run new positions through the backbone; speech logits of the last one, [rows, speech_vocab]."""
        hidden = self.tfmr(embeds, cache, positions)
        return self.speech_head(hidden[:, -1])

    def _check_text_tokens(self, text_tokens: Tensor) -> Tensor:
        tokens = torch.atleast_2d(text_tokens).to(device=self.device, dtype=torch.long)
        if tokens.shape[0] != 1:
            raise ValueError(f"generate() takes one text sequence, got a batch of {tokens.shape[0]}")
        cfg = self.config
        if int(tokens[0, 0]) != cfg.start_text_token or int(tokens[0, -1]) != cfg.stop_text_token:
            raise ValueError(
                f"text tokens must start with {cfg.start_text_token} and end with {cfg.stop_text_token} "
                "(use EnTokenizer.text_to_tokens)"
            )
        if tokens.shape[1] > cfg.text_positions:
            raise ValueError(
                f"{tokens.shape[1]} text tokens exceed the model's limit of {cfg.text_positions}"
            )
        return tokens

    @torch.inference_mode()
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
    ) -> Tensor:
        """Decode speech tokens for one text. Returns LongTensor [n] without start/stop tokens.

        cfg_weight > 0 runs a conditional and an unconditional row; cfg_weight == 0 runs only the
        conditional row (half the KV cache). With `ignore_stop` the stop token is never sampled and exactly
        `max_new_tokens` tokens come back. On CUDA the per-token step replays a captured CUDA graph unless
        `cuda_graph` is False (`last_decode_mode` says which ran).
        """
        sampling = sampling or SamplingSettings()
        cfg = self.config
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens + 1 > cfg.speech_positions:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} exceeds the speech length limit {cfg.speech_positions - 1}"
            )
        if cfg_weight < 0:
            raise ValueError(f"cfg_weight must be >= 0, got {cfg_weight}")
        tokens = self._check_text_tokens(text_tokens)
        rows = 2 if cfg_weight > 0 else 1
        device = self.device

        prompt = self.prompt_embeds(tokens, cond, rows)
        prompt_len = prompt.shape[1]
        step = DecodeStep(self, rows, prompt_len + max_new_tokens)
        if cuda_graph and device.type == "cuda":
            step.capture()
        self.last_decode_mode = step.mode
        logits = self.step_logits(prompt, step.cache, torch.arange(prompt_len, device=device))
        step.start(prompt_len)

        out = torch.empty(max_new_tokens, dtype=torch.long, device=device)
        seen = torch.zeros(1, cfg.speech_vocab_size, dtype=torch.bool, device=device)
        seen[0, cfg.start_speech_token] = True
        n = max_new_tokens
        for i in range(max_new_tokens):
            if rows == 2:
                logits = combine_cfg(logits, cfg_weight)
            logits = logits.float()
            if ignore_stop:
                logits[:, cfg.stop_speech_token] = float("-inf")
            token = choose_next_token(logits, seen, sampling, generator)  # [1]
            out[i] = token[0]
            # The host looks for the stop token only every STOP_CHECK_EVERY tokens, so the GPU never waits
            # for the CPU in between; the few tokens decoded past a stop are cut below.
            window = out[i + 1 - STOP_CHECK_EVERY : i + 1]
            if (
                not ignore_stop
                and (i + 1) % STOP_CHECK_EVERY == 0
                and bool((window == cfg.stop_speech_token).any())
            ):
                n = i + 1
                break
            if i == max_new_tokens - 1:
                break
            seen.scatter_(1, token[:, None], True)
            logits = step(token)
        if not ignore_stop:
            stops = (out[:n] == cfg.stop_speech_token).nonzero()
            if stops.numel():
                n = int(stops[0, 0])
        return out[:n].clone()


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
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return "ones"
    if name.endswith("norm.bias"):
        return "zeros"
    if name.endswith("pre_attention_query"):
        return "uniform"
    return "normal"


def t3_tensor_shapes(config: T3Config) -> dict[str, tuple[int, ...]]:
    """Official tensor names and shapes for a config, without allocating anything."""
    with torch.device("meta"):
        model = T3(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


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
