"""`--batch auto`: how many chunks T3 decodes together, from the GPU memory left after loading.

The model is a real `service.LoadedModel` placed on "cuda:0" whose checkpoint is the official T3 header
(a sparse file, no weights); only torch.cuda's memory queries, the world at the edge on this CPU machine,
are faked. Expected sizes are worked out by hand from the estimate's terms for the full English T3
(30 layers, 1024 wide, 1000 tokens per chunk, a 300-token text, CFG on).
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch

from chatterbox_cli import service
from chatterbox_cli.checkpoint import Checkpoint
from chatterbox_cli.estimate import T3Shape

INVENTORY = Path(__file__).parent / "fixtures" / "official_tensor_inventory.json.gz"
GiB = 1024**3

# Per chunk: KV cache 2 (K, V) x 30 layers x 2 rows x (34 + 300 + 3 + 1000) positions x 1024 x 2 bytes,
# plus T3's prefill workspace int(0.46 x 82,781,376) (see test_estimate.py).
KV = 2 * 30 * 2 * 1337 * 1024 * 2
PER_CHUNK = KV + 38_079_432
# S3Gen for a group of b >= 5 chunks, whose flow runs r = s3gen.flow_batch_rows(b) rows (b rounded up to
# 8, 16, 24, ...): the flow estimator's 2r x 2500 frames x 3808 channels x 2 bytes, x 1.42 (= 54,073,600 per
# row); smaller groups are dominated by the vocoder instead.
S3GEN_PER_CHUNK = 54_073_600
NEED_PER_CHUNK = PER_CHUNK + S3GEN_PER_CHUNK  # for groups of a multiple of 8 (no blank rows)


def _needs(chunks: int) -> int:
    """Free bytes at which `chunks` chunks just fit if their flow ran no blank rows (so, for a multiple of
    8, at which they do): their bytes are 90 % of it (10 % margin)."""
    return -(-chunks * NEED_PER_CHUNK * 10 // 9)


@pytest.fixture(scope="module")
def official_t3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder with the official t3_cfg.safetensors header: right size, no data (sparse)."""
    folder = tmp_path_factory.mktemp("official-t3")
    with gzip.open(INVENTORY) as f:
        tensors = json.loads(f.read())["t3_cfg.safetensors"]
    header, offset = {}, 0
    for name, (shape, _kind) in tensors.items():
        nbytes = 4 * torch.Size(shape).numel()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(folder / "t3_cfg.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def _model(folder: Path, device: str = "cuda:0") -> service.LoadedModel:
    decision = service.Decision(torch.device(device), "fp16", torch.float16, "test", None, None)
    return service.LoadedModel(
        checkpoint=Checkpoint(folder, "local"),
        decision=decision,
        t3=None,  # type: ignore[arg-type]  # batch_size reads only the device and the T3 header
        s3gen=None,  # type: ignore[arg-type]
        tokenizer=None,  # type: ignore[arg-type]
        builtin_voice=None,
        load_seconds=0.0,
    )


@pytest.fixture
def gpu_memory(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """torch.cuda's memory queries answering from this dict (free: what the driver reports)."""
    state = {"free": 0, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    return state


def test_the_header_gives_the_english_shape(official_t3: Path) -> None:
    assert _model(official_t3).t3_shape == T3Shape(30, 1024, 1024, 4096, 34, 8194)
    assert PER_CHUNK == 366_660_552


@pytest.mark.parametrize(
    ("free", "chunks", "expected"),
    [
        (_needs(8), 200, 8),  # exactly enough for 8
        (_needs(8) - 100, 200, 7),  # a hair less
        (_needs(24), 200, 24),
        (_needs(24) - 100, 200, 23),  # 23 chunks: the flow runs 24 rows, one blank
        ((_needs(24) + _needs(25)) // 2, 200, 24),  # 25 chunks would run 32 flow rows
        # 20 chunks' flow runs 24 rows: with 4 blank rows' workspace they do not fit, 19 (one chunk less) do
        (_needs(20), 200, 19),
        (512 * 2**20, 200, 1),  # not even two chunks fit: one at a time
        (1024 * GiB, 200, 64),  # plenty of memory: the cap
        (1024 * GiB, 10, 9),  # the first chunk runs alone, the other 9 together
    ],
)
def test_auto_batch_from_free_memory(
    official_t3: Path, gpu_memory: dict[str, int], free: int, chunks: int, expected: int
) -> None:
    gpu_memory["free"] = free
    request = service.LoadRequest(batch=0, max_tokens=1000, cfg_weight=0.5)
    size, why = service.batch_size(_model(official_t3), request, chunks)
    assert size == expected
    per_chunk = "0.34 GiB per chunk (KV cache + workspace)"
    assert why == f"batch {expected}: {free / GiB:.1f} GiB free after loading, {per_chunk}"


def test_memory_torch_holds_but_does_not_use_counts_as_free(
    official_t3: Path, gpu_memory: dict[str, int]
) -> None:
    gpu_memory.update(free=_needs(24) - 3 * GiB, reserved=5 * GiB, allocated=2 * GiB)
    request = service.LoadRequest(batch=0)
    assert service.batch_size(_model(official_t3), request, 200)[0] == 24


def test_without_cfg_a_chunk_needs_half_the_t3_memory(official_t3: Path, gpu_memory: dict[str, int]) -> None:
    # one row per chunk: KV cache and T3 workspace halve (int(0.46 x 82,781,376 / 2)); S3Gen does not
    per_chunk = KV // 2 + 19_039_716
    gpu_memory["free"] = -(-24 * (per_chunk + S3GEN_PER_CHUNK) * 10 // 9)
    request = service.LoadRequest(batch=0, cfg_weight=0.0)
    size, why = service.batch_size(_model(official_t3), request, 200)
    assert size == 24 and "0.17 GiB per chunk" in why


def test_a_given_batch_and_the_cpu(official_t3: Path, gpu_memory: dict[str, int]) -> None:
    assert service.batch_size(_model(official_t3), service.LoadRequest(batch=3), 200) == (
        3,
        "batch 3 (--batch)",
    )
    cpu = service.batch_size(_model(official_t3, "cpu"), service.LoadRequest(batch=0), 200)
    assert cpu == (1, "batch 1: the CPU decodes one chunk at a time")
