"""triton_support.runs_on: where the project's Triton kernels may be chosen. A GPU's compute capability
and whether a kernel can be built on this machine are the world at the edge; on a machine without CUDA
the first kernel really fails, and that failure must come back as False, not as an exception."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from chatterbox_cli import triton_support

TRITON_MISSING = importlib.util.find_spec("triton") is None


@pytest.fixture(autouse=True)
def fresh_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_support, "_known", {})


def test_only_cuda_devices_run_triton() -> None:
    assert not triton_support.runs_on("cpu")
    assert not triton_support.runs_on("meta")


def test_without_triton_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_support, "triton", None)
    assert not triton_support.runs_on("cuda:0")


def test_gpus_older_than_volta_are_refused_before_any_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pascal card (6.1): Triton's compiler refuses it, so no kernel is tried (nothing touches CUDA here,
    which this CPU machine lacks) and the answer is remembered."""
    asked: list[object] = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (6, 1)
    )
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not triton_support.runs_on("cuda:0")
    assert not triton_support.runs_on("cuda:0")
    assert len(asked) == 1


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the first CUDA kernel fails")
def test_a_first_kernel_that_fails_means_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Turing card (7.5) on a machine where the kernel cannot run (here: no CUDA at all, as with a
    missing C compiler the launch raises): False, and no exception reaches the caller."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not triton_support.runs_on("cuda:0")
    assert triton_support._known == {"cuda:0": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed")
def test_triton_runs_on_this_gpu() -> None:
    assert triton_support.runs_on("cuda") == (
        torch.cuda.get_device_capability() >= triton_support.MIN_CAPABILITY
    )
