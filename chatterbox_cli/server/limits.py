"""What one server takes: its limits, set by `chatterbox serve`'s options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 4096  # OpenAI's own limit for `input`
    max_concurrent: int = 64  # requests in flight; more get 429
    timeout_s: float = 300.0  # a request's whole time, queue included
    max_body_bytes: int = 64 * 1024
    max_tokens: int = 1000  # speech tokens per chunk
