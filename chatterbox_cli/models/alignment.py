"""The multilingual model's alignment guard: where T3 is in the text, read from three attention heads, and
what that says about the next token.

chatterbox-tts 0.1.7 decodes multilingual T3 with an "alignment stream analyzer": the attention of three
heads, as (layer, head) ALIGNMENT_HEADS, averaged, over the text's key columns, marks the text position each
speech token is reading. From it the reference
  - holds the stop token back (logit -2^15) while the position read is more than 3 tokens from the end of
    a text longer than 5 tokens;
  - forces the stop token (every other logit -2^15, stop +2^15) on a long tail (after the text was read,
    the last 3 text columns gather 5 or more attention in total, ~200 ms of speech), on an alignment
    repetition (after the text was read, rows' maxima over all but the last 5 columns sum past 5), or
    when the two latest speech tokens are the same.
The position moves only by -3 .. +6 per step (larger jumps are ignored as discontinuities), and a row may
not attend past column `frame` (monotonic masking). Its false-start detection changes no logit, so it is
not kept. Texts of 5 or fewer tokens (start and stop included) never count a repetition here; the
reference raises IndexError on them once they are read (its row maxima reduce over no columns).

`AlignmentGuard` keeps this state for a batch of texts in fixed-size tensors and updates it without
reading the GPU from the host, so a decode step that includes it can be captured as one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALIGNMENT_HEADS = ((12, 15), (13, 11), (9, 2))  # (layer, head) of the multilingual Llama T3
FORCE = 2.0**15  # the reference's logit for forcing or holding back a token (safe in every 16-bit dtype)
BACK_SLACK, AHEAD_SLACK = 4, 7  # a position step d is followed when -BACK_SLACK < d < AHEAD_SLACK
END_TOKENS = 3  # the text counts as read at position >= length - END_TOKENS; its tail is that many columns
LONG_TAIL = 5.0  # attention on the tail after the text was read that forces the stop token
REPEAT_SKIP, REPEAT_LIMIT = 5, 5.0  # all but the last REPEAT_SKIP columns; their summed row maxima
MIN_GUARDED_TEXT = 6  # texts shorter than this never have the stop token held back


def alignment_heads(n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """ALIGNMENT_HEADS for the full-size T3; a smaller test model watches the heads it has at the same
    indices modulo its size (the guard's logic does not depend on which heads)."""
    return tuple((layer % n_layers, head % n_heads) for layer, head in ALIGNMENT_HEADS)


@dataclass
class AlignmentGuard:
    """State of the guard for `texts` texts whose text token counts (start and stop tokens included) are
    `lengths` [texts]. `step` is called once per decode step, before sampling."""

    lengths: Tensor  # [texts] long
    position: Tensor  # [texts] long: the text position being read
    complete: Tensor  # [texts] bool: the text has been read to its end
    tail: Tensor  # [texts, END_TOKENS] float32: attention on the tail since the step after completion
    repeat: Tensor  # [texts] float32: summed row maxima before the tail since then
    recent: Tensor  # [texts, 2] long: the two latest tokens given to `step`
    frame: Tensor  # [1] long: steps taken (the first is the prompt's)

    @classmethod
    def start(cls, lengths: Tensor) -> AlignmentGuard:
        n, device = lengths.numel(), lengths.device
        return cls(
            lengths=lengths.to(torch.long),
            position=torch.zeros(n, dtype=torch.long, device=device),
            complete=torch.zeros(n, dtype=torch.bool, device=device),
            tail=torch.zeros(n, END_TOKENS, dtype=torch.float32, device=device),
            repeat=torch.zeros(n, dtype=torch.float32, device=device),
            recent=torch.full((n, 2), -1, dtype=torch.long, device=device),
            frame=torch.zeros(1, dtype=torch.long, device=device),
        )

    def keep(self, rows: Tensor) -> None:
        """Keep only these texts (indices into the current batch), in order."""
        for name in ("lengths", "position", "complete", "tail", "repeat", "recent"):
            setattr(self, name, getattr(self, name)[rows])

    def step(self, attention: Tensor, last_token: Tensor, logits: Tensor, stop_token: int) -> Tensor:
        """Update the state with this step's attention and return `logits` with the stop token held back or
        forced. `attention` [texts, S]: the heads' mean attention of the newest query over the text
        columns (text position 0 first; columns past a text's length are ignored); unused at the first
        step, whose masking keeps column 0 only. `last_token` [texts]: the latest token (the start token
        at the first step). `logits` [texts, vocab] after CFG."""
        texts, width = attention.shape
        columns = torch.arange(width, device=attention.device)
        lengths = self.lengths[:, None]
        # monotonic masking: no column past the number of speech tokens so far; and no padding column
        visible = (columns[None, :] <= self.frame) & (columns[None, :] < lengths)
        row = torch.where(visible, attention.float(), 0.0)
        current = row.argmax(dim=1)  # probabilities >= 0: ties and all-zero rows give the first column
        # State changes in place: a captured CUDA graph replays into the same tensors.
        moved = current - self.position
        follow = (moved > -BACK_SLACK) & (moved < AHEAD_SLACK)
        self.position.copy_(torch.where(follow, current, self.position))
        was_complete = self.complete.clone()
        self.complete |= self.position >= self.lengths - END_TOKENS

        # rows after the one at which the text was read: the tail's columns and the maxima before the tail
        tail_columns = (
            self.lengths[:, None] - END_TOKENS + torch.arange(END_TOKENS, device=row.device)
        ).clamp(min=0)
        counted = was_complete[:, None].float()
        self.tail += counted * row.gather(1, tail_columns)
        before = columns[None, :] < lengths - REPEAT_SKIP
        self.repeat += counted[:, 0] * torch.where(before, row, 0.0).amax(dim=1)
        long_tail = self.complete & (self.tail.amax(dim=1) >= LONG_TAIL)
        repetition = self.complete & (self.repeat > REPEAT_LIMIT)

        self.recent.copy_(torch.stack([self.recent[:, 1], last_token.to(torch.long)], dim=1))
        # the reference counts the start token among the latest tokens: two sampled tokens must exist
        repeated = (self.frame >= 2) & (self.recent[:, 0] == self.recent[:, 1])

        out = logits.clone()
        hold = (current < self.lengths - END_TOKENS) & (self.lengths >= MIN_GUARDED_TEXT)
        out[:, stop_token] = torch.where(hold, -FORCE, out[:, stop_token])
        force = (long_tail | repetition | repeated)[:, None]
        forced = torch.full_like(out, -FORCE)
        forced[:, stop_token] = FORCE
        out = torch.where(force, forced, out)
        self.frame += 1
        return out
