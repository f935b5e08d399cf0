"""The alignment guard against the reference AlignmentStreamAnalyzer (chatterbox-tts 0.1.7), step by step.

The fixture (scripts/parity/alignment.py) holds, per text and step, the heads' mean attention over the text
columns, the last token, the logits in and the reference's logits out. The logits are copied or set to
+-2^15, and every decision is a comparison of integers or of sums of at most 48 float32 probabilities
(each <= 1) with 5: summed in another order, such a sum moves by at most 48 * 48 * 2^-24 < 1.4e-4, so
where every sum in the fixture is farther than that from 5 (asserted below) the outputs must be equal,
not close, on any CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chatterbox_cli.models.alignment import AlignmentGuard

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "parity_alignment.json").read_text("utf-8"))
STOP = FIXTURE["stop_token"]
CASES = FIXTURE["cases"]


def batch_inputs(cases: list[dict], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's attention (padded with junk past each text's length), last tokens and logits."""
    width = max(c["length"] for c in cases)
    attention = torch.full((len(cases), width), 0.9)  # padding the guard must ignore
    for row, case in enumerate(cases):
        attention[row, : case["length"]] = torch.tensor(case["steps"][step]["attention"])
    last = torch.tensor([c["steps"][step]["last_token"] for c in cases])
    logits = torch.tensor([c["steps"][step]["logits"] for c in cases])
    return attention, last, logits


def test_the_guard_gives_the_references_logits_at_every_step_for_a_batch() -> None:
    guard = AlignmentGuard.start(torch.tensor([c["length"] for c in CASES]))
    outcomes = set()
    for step in range(len(CASES[0]["steps"])):
        out = guard.step(*batch_inputs(CASES, step), stop_token=STOP)
        expected = torch.tensor([c["steps"][step]["out"] for c in CASES])
        assert torch.equal(out, expected), step
        margins = torch.cat([guard.tail.flatten(), guard.repeat]) - 5.0
        assert margins.abs().min() > 1.4e-4  # see the module docstring
        outcomes |= {("held", bool(r)) for r in (out[:, STOP] == -(2.0**15)) & (out[:, 0] != -(2.0**15))}
        outcomes |= {("forced", bool(r)) for r in out[:, STOP] == 2.0**15}
    assert outcomes == {("held", True), ("held", False), ("forced", True), ("forced", False)}


def test_texts_leaving_the_batch_do_not_change_the_others() -> None:
    guard = AlignmentGuard.start(torch.tensor([c["length"] for c in CASES]))
    kept = [0, 2, 4]
    for step in range(len(CASES[0]["steps"])):
        cases = CASES if step < 10 else [CASES[i] for i in kept]
        if step == 10:
            guard.keep(torch.tensor(kept))
        out = guard.step(*batch_inputs(cases, step), stop_token=STOP)
        assert torch.equal(out, torch.tensor([c["steps"][step]["out"] for c in cases])), step


def test_each_rule_alone() -> None:
    """One 10-token text read one token per step, then lingering on its last token. The stop token is held
    back while the position read is below 10 - 3 (steps 0-6), free from step 7, when the text counts as
    read; the steps after that add their attention on the last 3 columns: 1 at steps 8 and 9 (columns 8,
    9), then 1 per step on column 9, which reaches 5 at step 13, where the stop token is forced."""
    length, logits = 10, torch.zeros(1, 8)
    guard = AlignmentGuard.start(torch.tensor([length]))
    stop_logits = []
    for frame in range(20):
        attention = torch.zeros(1, length)
        attention[0, min(frame, length - 1)] = 1.0
        out = guard.step(attention, torch.tensor([100 + frame]), logits, stop_token=1)
        stop_logits.append(float(out[0, 1]))
        if frame >= 13:
            assert torch.equal(out[0, [0, 2, 3]], torch.full((3,), -(2.0**15)))
    assert stop_logits == [-(2.0**15)] * 7 + [0.0] * 6 + [2.0**15] * 7
