"""The OOM step-down of service.ModelHolder at each stage, on the CPU with a tiny checkpoint.

The ladder is the one a GPU run walks (bnb-8bit → bnb-4bit → bnb-4bit-swap → the CPU's fp32); it is
started on the CPU, where bitsandbytes quantizes too, so every rung really loads. CUDA running out of
memory is the world at the edge: the function that would allocate at a stage's boundary raises
`torch.OutOfMemoryError` once, as torch's allocator does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chatterbox_cli import cli, jobs, oom, pipeline, service
from chatterbox_cli.errors import OutOfMemoryError
from chatterbox_cli.models.s3gen import S3Gen
from chatterbox_cli.models.s3gen.flow import CausalCFM
from chatterbox_cli.pipeline import SynthesisSettings
from chatterbox_cli.quant import cache as quant_cache

SETTINGS = SynthesisSettings(seed=11, max_tokens=20, flow_steps=2)
CHUNKS = [f"Chunk number {i} says a few words, then a few more." for i in range(4)]
OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 MiB (test)"


def start(preset: str) -> service.Decision:
    return service.Decision(torch.device("cpu"), preset, torch.bfloat16, f"starting at {preset}", None, None)


def make_holder(
    checkpoint: str, preset: str = "bnb-8bit", notes: list[str] | None = None, **request: object
) -> service.ModelHolder:
    options: dict = {"device": "auto", "max_tokens": 20, **request}
    req = service.LoadRequest(model=checkpoint, **options)
    sink = notes.append if notes is not None else service._quiet
    return service.ModelHolder(req, sink, decision=start(preset))


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int = 1) -> list[tuple]:
    """Make owner.name raise CUDA out-of-memory on its `call`-th call; returns the calls' arguments."""
    original: Callable = getattr(owner, name)
    calls: list[tuple] = []

    def wrapper(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == call:
            raise torch.OutOfMemoryError(OOM_TEXT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_oom_loading_t3_steps_down_one_preset(tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    notes: list[str] = []
    holder = make_holder(tiny_checkpoint, notes=notes)
    assert holder.model.preset == "bnb-4bit"
    assert holder.step_downs == ["out of GPU memory loading with bnb-8bit; continuing with bnb-4bit"]
    assert notes == ["starting at bnb-8bit", *holder.step_downs]


def test_what_the_failed_attempt_held_is_freed_before_the_next_load(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed attempt's S3Gen (loaded before T3 ran out of memory) is gone when the next preset's S3Gen
    starts loading: only the traceback referenced it, and the holder drops tracebacks."""
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    loaded: list[weakref.ref] = []
    alive_at_next_load: list[bool] = []
    load_s3gen = service._load_s3gen

    def tracked(*args: object) -> object:
        alive_at_next_load.extend(ref() is not None for ref in loaded)
        s3gen, report, cache = load_s3gen(*args)  # type: ignore[arg-type]
        loaded.append(weakref.ref(s3gen))
        return s3gen, report, cache

    monkeypatch.setattr(service, "_load_s3gen", tracked)
    holder = make_holder(tiny_checkpoint)
    assert holder.model.preset == "bnb-4bit"
    assert len(loaded) == 2 and alive_at_next_load == [False]


def test_oom_preparing_a_voice_clip(
    tiny_checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatterbox_cli import voice as voice_module

    t = np.arange(4 * 24_000) / 24_000
    clip = tmp_path / "clip.wav"
    sf.write(
        clip, (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 24_000
    )
    fail_on_call(monkeypatch, voice_module, "voice_from_clip")
    holder = make_holder(tiny_checkpoint)
    conds = holder.voice(str(clip), 0.5)
    assert holder.model.preset == "bnb-4bit"
    assert holder.step_downs == [
        "out of GPU memory preparing the voice with bnb-8bit; continuing with bnb-4bit"
    ]
    assert conds.t3.speaker_emb.device.type == "cpu" and conds.gen.prompt_token.numel() > 0


@pytest.mark.parametrize(
    ("owner", "name", "stage"),
    [(CausalCFM, "forward", "the flow"), (S3Gen, "mel_to_wav", "the vocoder")],
)
def test_oom_mid_run_goes_on_from_the_failed_chunk_with_its_seeds(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch, owner: type, name: str, stage: str
) -> None:
    """Chunks 1-2 come from bnb-8bit; S3Gen runs out of memory at chunk 3 (its third call); chunks 3-4 then
    come from bnb-4bit, exactly as a bnb-4bit run resumed at chunk 3 makes them."""
    holder = make_holder(tiny_checkpoint, batch=1)
    conds = holder.voice(None, 0.5)
    before = list(pipeline.synthesize(holder.model, CHUNKS[:2], conds, SETTINGS))
    lower = make_holder(tiny_checkpoint, "bnb-4bit", batch=1).model
    after = list(pipeline.synthesize(lower, CHUNKS[2:], conds, SETTINGS, first_index=2))
    del lower

    fail_on_call(monkeypatch, owner, name, call=3)
    got = list(holder.speak(CHUNKS, conds, SETTINGS))
    assert [c.index for c in got] == [0, 1, 2, 3], stage
    assert holder.step_downs == ["out of GPU memory at chunk 3 with bnb-8bit; continuing with bnb-4bit"]
    for made, expected in zip(got, before + after, strict=True):
        assert made.seed == expected.seed
        np.testing.assert_array_equal(made.audio, expected.audio)


def test_the_last_step_is_the_cpu_in_one_line(tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    notes: list[str] = []
    holder = make_holder(tiny_checkpoint, "bnb-4bit-swap", notes=notes, batch=1)
    conds = holder.voice(None, 0.5)
    assert not holder.model.takes_turns  # on a CPU there are no turns to take: all stays in host memory
    fail_on_call(monkeypatch, torch.nn.functional, "scaled_dot_product_attention", call=2)
    got = list(holder.speak(CHUNKS[:2], conds, SETTINGS))
    assert [c.index for c in got] == [0, 1]
    assert (holder.model.preset, holder.model.device.type) == ("fp32", "cpu")
    assert notes[1:] == ["out of GPU memory at chunk 1 with bnb-4bit-swap; continuing on the CPU"]


def test_a_forced_preset_ends_in_exit_4_naming_only_untried_presets(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    request = service.LoadRequest(model=tiny_checkpoint, device="cpu", preset="bnb-8bit")
    with pytest.raises(OutOfMemoryError) as info:
        service.ModelHolder(request).model  # noqa: B018
    message = str(info.value)
    assert int(info.value.exit_code) == 4
    assert message.startswith("out of GPU memory loading with preset bnb-8bit; try --preset bnb-4bit, ")
    assert "--preset bnb-4bit-swap" in message and "--preset auto (it steps down" in message
    assert "--preset bnb-8bit" not in message and "--preset fp16" not in message


def test_the_smallest_forced_preset_suggests_no_preset_but_auto(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    request = service.LoadRequest(model=tiny_checkpoint, device="cpu", preset="bnb-4bit-swap")
    with pytest.raises(OutOfMemoryError) as info:
        service.ModelHolder(request).model  # noqa: B018
    assert str(info.value) == (
        "out of GPU memory loading with preset bnb-4bit-swap; try --preset auto (it steps down by "
        "itself), a shorter --max-tokens, or --device cpu"
    )


def test_no_fallback_ends_in_exit_4_and_names_the_next_step(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    with pytest.raises(OutOfMemoryError) as info:
        make_holder(tiny_checkpoint, fallback=False).model  # noqa: B018
    assert str(info.value) == (
        "out of GPU memory loading with preset bnb-8bit; drop --no-fallback to step down by itself "
        "(next: bnb-4bit)"
    )


def test_a_forced_device_stops_at_the_smallest_gpu_preset(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_on_call(monkeypatch, quant_cache, "load_quantized_cached")
    with pytest.raises(OutOfMemoryError, match="bnb-4bit-swap is the smallest GPU preset; free GPU"):
        make_holder(tiny_checkpoint, "bnb-4bit-swap", device="cuda").model  # noqa: B018


def test_batch_is_halved_before_any_preset_step(
    tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = make_holder(tiny_checkpoint, batch=2)
    conds = holder.voice(None, 0.5)
    attention = torch.nn.functional.scaled_dot_product_attention

    def one_chunk_fits(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if q.shape[0] > 2:  # two chunks' CFG rows
            raise torch.OutOfMemoryError(OOM_TEXT)
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", one_chunk_fits)
    got = list(holder.speak(CHUNKS, conds, SETTINGS))
    assert [c.index for c in got] == [0, 1, 2, 3]
    assert holder.model.preset == "bnb-8bit" and holder.batch_cap == 1
    assert holder.step_downs == ["out of GPU memory decoding 2 chunks at once at chunk 2; trying 1"]


# --- recognising out-of-memory, and letting go of what failed -------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA driver error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        # cuDNN's fused attention with 1.5 GiB free (the message as torch 2.11 printed it)
        RuntimeError(
            "Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good() to be true, "
            "but got false.  (Could this error message be improved?  If so, please report an enhancement "
            "request to PyTorch.)"
        ),
    ],
)
def test_every_spelling_of_cuda_out_of_memory_is_recognised(error: BaseException) -> None:
    assert oom.is_out_of_memory(error)


def test_an_error_raised_while_handling_out_of_memory_is_recognised() -> None:
    """A CUDA-graph capture that runs out of memory ends in the capture's own error, raised during the
    out-of-memory error's handling."""
    try:
        try:
            raise torch.OutOfMemoryError(OOM_TEXT)
        except torch.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        assert oom.is_out_of_memory(e)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("out of memory"),  # not a runtime failure
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_out_of_memory(error: BaseException) -> None:
    assert not oom.is_out_of_memory(error)


def test_forget_frames_lets_the_failed_frames_tensors_go() -> None:
    refs: list[weakref.ref] = []

    def attempt() -> None:
        held = torch.zeros(1024)
        refs.append(weakref.ref(held))
        raise torch.OutOfMemoryError(OOM_TEXT)

    try:
        attempt()
    except torch.OutOfMemoryError as e:
        error = e
    assert refs[0]() is not None  # the traceback keeps the frame, and the tensor
    oom.forget_frames(error)
    assert refs[0]() is None


def test_out_of_memory_that_escapes_a_command_is_exit_4_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def out_of_memory(job: object) -> dict[str, object]:
        raise torch.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(jobs, "run_synthesize", out_of_memory)
    code = cli.run(["synthesize", "Hello.", "-o", str(tmp_path / "a.wav")])
    err = capsys.readouterr().err
    assert code == 4
    assert err.startswith(
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 MiB (test));"
    )
    assert "Traceback" not in err
    code = cli.run(["synthesize", "Hello.", "-o", str(tmp_path / "a.wav"), "--json"])
    out = capsys.readouterr().out
    assert code == 4 and '"exit_code": 4' in out
