"""The OOM step-down of the loading service, on a real GPU with a full-size random checkpoint.

The allocator is capped (torch.cuda.set_per_process_memory_fraction) so that fp16 weights cannot fit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatterbox_cli import service
from chatterbox_cli.errors import OutOfMemoryError
from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CAP_BYTES = int(1.2 * 2**30)  # fp16 T3 alone is 1.07 GB of weights, S3Gen another 0.27 GB


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


def test_oom_while_loading_fp16_steps_down_to_a_quantized_preset(
    full_checkpoint: Path, capped_gpu: None
) -> None:
    notes: list[str] = []
    request = service.LoadRequest(model=str(full_checkpoint), preset="fp16", device="cuda")
    model = service.load(request, notes.append)
    assert model.preset in ("bnb-8bit", "bnb-4bit")
    assert any("out of GPU memory loading with fp16; stepping down" in n for n in notes), notes
    assert model.quant["t3"].quantized_layers == 210
    assert torch.cuda.memory_allocated() < CAP_BYTES


def test_no_fallback_turns_the_oom_into_exit_code_4(full_checkpoint: Path, capped_gpu: None) -> None:
    request = service.LoadRequest(model=str(full_checkpoint), preset="fp16", device="cuda", fallback=False)
    with pytest.raises(OutOfMemoryError) as info:
        service.load(request)
    assert int(info.value.exit_code) == 4
    assert "--no-fallback" in str(info.value)
