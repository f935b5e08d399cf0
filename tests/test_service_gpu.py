"""The loading service and `chatterbox synthesize` on a real GPU, with a full-size random checkpoint.

Two ways of making a small card: capping this process's allocator (torch.cuda.set_per_process_memory_fraction)
for the in-process tests, and, as users meet it, another process holding the rest of the memory
(chatterbox_cli.testing.gpu_holder) while the real CLI runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatterbox_cli import pipeline, service
from chatterbox_cli.errors import OutOfMemoryError
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
from chatterbox_cli.testing.gpu_holder import HeldGpu
from chatterbox_cli.turns import weight_tensors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CAP_BYTES = int(1.2 * 2**30)  # fp16 T3 alone is 1.07 GB of weights, S3Gen another 0.27 GB
PARAGRAPH = " ".join(f"Sentence {i} of the paragraph has a handful of words in it." for i in range(6))


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("full"), size="full", seed=0)


@pytest.fixture()
def capped_gpu():
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total)
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def _t3_weight_bytes(model: service.LoadedModel) -> int:
    return sum(t.untyped_storage().nbytes() for t in model.t3.state_dict().values())


def test_auto_steps_down_when_loading_runs_out(full_checkpoint: Path, capped_gpu: None) -> None:
    """auto started at fp16 (as an estimate that was wrong would), and the load ran out of memory: the holder
    freed the half-loaded model and loaded a quantized preset in its place."""
    notes: list[str] = []
    request = service.LoadRequest(model=str(full_checkpoint), device="cuda")
    start = service.Decision(torch.device("cuda:0"), "fp16", torch.bfloat16, "test: fp16", None, None)
    model = service.ModelHolder(request, notes.append, decision=start).model
    assert model.preset in ("bnb-8bit", "bnb-4bit"), notes
    assert notes[1] == f"out of GPU memory loading with fp16; continuing with {model.preset}"
    assert model.quant["t3"].quantized_layers == 210
    assert _t3_weight_bytes(model) < 0.6 * 2**30  # int8 or nf4 backbone, not the 1.07 GB of fp16


def test_a_forced_preset_that_does_not_fit_is_exit_4(full_checkpoint: Path, capped_gpu: None) -> None:
    request = service.LoadRequest(model=str(full_checkpoint), preset="fp16", device="cuda")
    with pytest.raises(OutOfMemoryError) as info:
        service.load(request)
    message = str(info.value)
    assert int(info.value.exit_code) == 4
    assert message.startswith("out of GPU memory loading with preset fp16; try --preset bnb-8bit, ")
    assert "--preset fp16" not in message


def test_the_default_path_speaks_a_paragraph(full_checkpoint: Path) -> None:
    """What `synthesize` does on a GPU with room: auto preset and batch, warm-up, the early piece first."""
    holder = service.ModelHolder(service.LoadRequest(model=str(full_checkpoint), batch=0, max_tokens=120))
    conds = holder.voice(None, 0.5)
    chunks, _ = pipeline.prepare_chunks(holder.model.tokenizer, PARAGRAPH)
    settings = SynthesisSettings(seed=4, max_tokens=120)
    assert holder.warm_up(conds, chunks[0], settings) > 0
    pieces = list(holder.speak(chunks, conds, settings))
    assert holder.model.preset == "fp16" and holder.model.device.type == "cuda"
    assert [(p.index, p.final) for p in pieces[:2]] == [(0, False), (0, True)]  # the early piece
    assert [p.index for p in pieces if p.final] == list(range(len(chunks)))
    size, _ = service.batch_size(holder.model, holder.request, len(chunks))
    assert size == len(chunks) - 1  # the rest of the chunks decode together
    assert holder.step_downs == []


def test_a_bnb_preset_parks_its_vocoder_and_speaks(full_checkpoint: Path) -> None:
    request = service.LoadRequest(model=str(full_checkpoint), preset="bnb-4bit", max_tokens=80)
    holder = service.ModelHolder(request)
    conds = holder.voice(None, 0.5)
    s3gen = holder.model.s3gen
    assert s3gen.vocoder_home == torch.device("cuda:0")
    pieces = list(
        holder.speak(["A short sentence to speak."], conds, SynthesisSettings(seed=1, max_tokens=80))
    )
    assert pieces[-1].final and pieces[-1].audio.size > 0
    assert next(s3gen.mel2wav.parameters()).device.type == "cpu"  # back in host memory between calls


def _synthesize_beside(held_gib: float, checkpoint: Path, text: str, tmp_path: Path) -> dict:
    with HeldGpu(held_gib):
        done = subprocess.run(
            [sys.executable, "-m", "chatterbox_cli", "synthesize", text, "-o", str(tmp_path / "out.wav")]
            + ["--model", str(checkpoint), "--max-tokens", "120", "--seed", "1", "--json"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert done.returncode == 0, summary
    return summary


@pytest.mark.parametrize("free_gib", [1.0, 1.5])
def test_the_cli_speaks_beside_another_process_holding_the_rest(
    full_checkpoint: Path, tmp_path: Path, free_gib: float
) -> None:
    summary = _synthesize_beside(free_gib, full_checkpoint, "The keeper lit the lamp.", tmp_path)
    assert summary["audio_seconds"] > 0
    assert summary["preset"] in ("bnb-8bit", "bnb-4bit", "bnb-4bit-swap", "fp32"), summary["notes"]


def test_taking_turns_moves_t3_and_s3gen_and_keeps_their_audio(full_checkpoint: Path) -> None:
    """bnb-4bit-swap holds one of T3 and S3Gen on the GPU at a time, in one weight arena; their turns
    (bitsandbytes int8 and nf4 layers included, CUDA graphs captured in an earlier turn replayed) change no
    value: its chunks equal bnb-4bit's (batch 1), the first chunk's early piece included, which S3Gen
    renders in a turn of its own in the middle of T3's decoding."""
    texts = ["The first sentence is here.", "A second one follows it.", "And then a third."]
    # 120 steps: random weights give about 3 codebook tokens in 4 steps, enough for the 48-token early piece
    settings = SynthesisSettings(seed=7, max_tokens=120)
    audio, tokens = {}, {}
    for preset in ("bnb-4bit", "bnb-4bit-swap"):
        request = service.LoadRequest(model=str(full_checkpoint), preset=preset, batch=1, max_tokens=120)
        holder = service.ModelHolder(request)
        conds = holder.voice(None, 0.5)
        pieces = list(holder.speak(texts, conds, settings))
        assert not pieces[0].final and pieces[0].audio.size > 0  # the early piece
        audio[preset] = [p.audio for p in pieces]
        tokens[preset] = [p.speech_tokens for p in pieces if p.final]
        model = holder.model
        if preset == "bnb-4bit-swap":
            assert model.takes_turns and model.turn == "s3gen"
            assert model.t3.text_emb.weight.device.type == "cpu"  # kept in host memory, out of the arena
            torch.cuda.synchronize()
            with_s3gen = torch.cuda.memory_allocated()
            model.use("t3")
            # a turn is one copy into the weight arena, which T3 and S3Gen share: nothing allocated or freed
            assert torch.cuda.memory_allocated() == with_s3gen
            arena = model.turns.arena.untyped_storage().data_ptr()
            for module in (model.t3, model.s3gen):
                on_gpu = [t for _, _, t in weight_tensors(module) if t.is_cuda]
                assert on_gpu and all(t.untyped_storage().data_ptr() == arena for t in on_gpu)
            assert model.turns.nbytes == max(dict(model.turns.modules_bytes()).values())
        del holder, model
        torch.cuda.empty_cache()
    assert tokens["bnb-4bit"] == tokens["bnb-4bit-swap"]
    # T3 is exact. After a move S3Gen's fp16 matmuls may take other kernels (cuBLAS picks by pointer
    # alignment, among others): 4 fp16 roundings (2^-11 each) of the peak. Measured on the H100: one chunk
    # equal to the bit, the other 3.5e-4 of its peak.
    for a, b in zip(audio["bnb-4bit"], audio["bnb-4bit-swap"], strict=True):
        assert a.shape == b.shape and abs(a - b).max() <= 4 * 2.0**-11 * abs(a).max()
