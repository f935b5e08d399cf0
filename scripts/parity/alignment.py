"""Make tests/fixtures/parity_alignment.json: the REFERENCE AlignmentStreamAnalyzer (chatterbox-tts 0.1.7) run
step by step on synthetic attention, tokens and logits, for texts that exercise each of its rules.

    python scripts/parity/alignment.py [path/to/alignment_stream_analyzer.py]

The analyzer module imports only torch, logging and dataclasses, so it is loaded from the unpacked reference
source in our own environment. Its attention hooks are bypassed: each step sets the three heads' attention
rows (`last_aligned_attns`) directly, as the hooks would. Per step the fixture holds the heads' mean over the
text columns (what our AlignmentGuard takes), the last token, the logits in and the reference's logits out.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = Path("/tmp/ref/src/chatterbox/models/t3/inference/alignment_stream_analyzer.py")
OUT = ROOT / "tests" / "fixtures" / "parity_alignment.json"
VOCAB, STOP, LEN_COND, STEPS = 12, 3, 4, 48
START = 6561  # the start-of-speech token the reference loop passes first


def load_reference(path: Path):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("reference_alignment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positions(kind: str, length: int) -> list[int]:
    """The text position each frame attends to most, per scenario."""
    if kind == "steady":  # one text token every 2 frames, then stays on the last: a long tail
        return [min(k // 2, length - 1) for k in range(STEPS)]
    if kind == "jumps":  # a jump ahead and one back, both too large to follow
        base = [min(k // 2, length - 1) for k in range(STEPS)]
        return [p + 9 if k in (12, 13) else p - 6 if k == 20 else p for k, p in enumerate(base)]
    if kind == "repeat":  # reads to the end, then goes back to the start: alignment repetition
        return [min(k, length - 1) if k < length + 2 else (k - length) % 4 for k in range(STEPS)]
    if kind == "back":  # at 8, back by 4 (not followed), then on by 6 from 8 (followed: the text is read)
        return [min(k // 2, 8) if k < 20 else 4 if k < 22 else length - 3 for k in range(STEPS)]
    if kind == "ahead7":  # at 5, on by 7 (not followed), then on by 8 from 5: never read
        return [k // 3 if k < 18 else 12 if k == 18 else 13 for k in range(STEPS)]
    if kind == "edges":  # from position 2: +6 and -3 are followed
        fixed = {8: 8, 9: 5}
        return [fixed.get(k, k // 3 if k < 8 else min(5 + (k - 9) // 2, length - 1)) for k in range(STEPS)]
    if kind == "echo":  # read to the end, then back on column length - 5, the last one the check skips
        return [min(k, length - 3) if k < length else length - 5 for k in range(STEPS)]
    if kind == "ahead":  # attends one column past the frame: masked off until the frame gets there
        return [min(k + 1, length - 1) for k in range(STEPS)]
    if kind == "stuck":  # never reads past its first tokens
        return [k % 2 for k in range(STEPS)]
    if kind == "linger":  # reaches length - 3 and stays there: the row that completes it starts the tail
        return [min(k, length - 3) for k in range(STEPS)]
    return [min(k // 3, length - 1) for k in range(STEPS)]  # "slow"


def heads(gen: torch.Generator, key_len: int, focus: int) -> list[torch.Tensor]:
    """Three heads' attention rows [1, key_len], each peaked at key column `focus`."""
    rows = []
    for _ in range(3):
        scores = torch.randn(key_len, generator=gen)
        scores[focus] += 6.0 + torch.rand((), generator=gen).item()
        rows.append(torch.softmax(scores, dim=0)[None, :])
    return rows


def tokens(gen: torch.Generator, repeat_at: int | None) -> list[int]:
    out: list[int] = []
    for k in range(STEPS):
        if repeat_at == 0 and k == 0:  # the first token sampled equals the start token given before it
            out.append(START)
            continue
        if repeat_at is not None and k == repeat_at:
            out.append(out[-1])
            continue
        t = int(torch.randint(4, VOCAB, (), generator=gen))
        while out and t == out[-1]:
            t = int(torch.randint(4, VOCAB, (), generator=gen))
        out.append(t)
    return out


def run(reference, kind: str, length: int, seed: int, repeat_at: int | None) -> dict[str, object]:  # noqa: ANN001
    gen = torch.Generator().manual_seed(seed)
    tfmr = SimpleNamespace(layers=[SimpleNamespace(self_attn=torch.nn.Identity()) for _ in range(16)])
    i, j = LEN_COND, LEN_COND + length
    analyzer = reference.AlignmentStreamAnalyzer(tfmr, None, text_tokens_slice=(i, j), eos_idx=STOP)
    sampled = tokens(gen, repeat_at)
    steps = []
    prompt = j + 2  # condition, text, two start-of-speech rows (as the reference's prompt has)
    for k, focus in enumerate(positions(kind, length)):
        key_len = prompt + k
        rows = heads(gen, key_len, i + focus)
        if k == 0:  # the prompt's chunk: rows j: of a square map; only its last row's argmax matters
            rows = [torch.cat([torch.zeros(prompt - 1, key_len), r]) for r in rows]
        analyzer.last_aligned_attns = rows
        mean = torch.stack(rows).mean(dim=0)[-1, i:j]
        last = reference_last_token(k, sampled)
        logits = torch.randn(1, VOCAB, generator=gen)
        out = analyzer.step(logits.clone(), next_token=last)
        steps.append(
            {
                "attention": mean.tolist(),
                "last_token": last,
                "logits": logits[0].tolist(),
                "out": out[0].tolist(),
            }
        )
    return {"kind": kind, "length": length, "steps": steps}


def reference_last_token(k: int, sampled: list[int]) -> int:
    """What the reference loop passes: the start token first, then the token sampled at the step before."""
    return START if k == 0 else sampled[k - 1]


def main() -> None:
    reference = load_reference(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
    cases = [
        run(reference, "steady", 12, 1, None),
        run(reference, "jumps", 20, 2, None),
        run(reference, "repeat", 10, 3, None),
        # 6 tokens: the shortest text the stop token is held back for, and the shortest the reference runs
        # to the end (with 5 or fewer its repetition check reduces over no columns and raises IndexError)
        run(reference, "slow", 6, 4, None),
        run(reference, "slow", 24, 5, 17),  # a token repeated at step 17
        run(reference, "steady", 7, 6, None),
        run(reference, "edges", 30, 7, None),
        run(reference, "ahead", 16, 8, 0),  # and its first sampled token is the start token
        run(reference, "stuck", 5, 9, None),  # 5 tokens: never held back
        run(reference, "linger", 9, 10, None),
        run(reference, "echo", 12, 11, None),
        run(reference, "back", 17, 12, None),
        run(reference, "ahead7", 16, 13, None),
    ]
    fixture = {"vocab": VOCAB, "stop_token": STOP, "cases": cases}
    OUT.write_text(json.dumps(fixture, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
