"""What counts as running out of GPU memory, and giving back what a failed attempt held.

CUDA memory runs out in more than one way: torch's caching allocator raises `torch.OutOfMemoryError`,
while libraries that allocate on their own (cuBLAS and cuDNN handles and workspaces, bitsandbytes, the
driver loading kernels lazily) surface a RuntimeError whose text names the failed allocation. A failure
during CUDA-graph capture may also surface as the capture's own error, with the out-of-memory error as its
cause or context. `is_out_of_memory` recognises all of these, and only these.
"""

from __future__ import annotations

import gc
import sys

# Messages of CUDA out-of-memory failures raised outside torch's allocator (cudaErrorMemoryAllocation as
# the runtime, driver, cuBLAS and cuDNN spell it). cuDNN's fused attention reports a failed execution
# without its status: seen with 1.5 GiB free (H100, torch 2.11, benchmarks/small_card.py), never with room.
_OOM_TEXTS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "Expected mha_graph.execute(",
)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, is CUDA running out of memory."""
    torch = sys.modules.get("torch")
    for e in _chain(error):
        if torch is not None and isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and any(text in str(e) for text in _OOM_TEXTS):
            return True
    return False


def forget_frames(error: BaseException) -> BaseException:
    """`error` without its tracebacks (its chain's too): they reference the frames, and so the tensors, of
    the attempt that failed, which would otherwise stay allocated while the next attempt runs."""
    for e in _chain(error):
        e.__traceback__ = None
    return error


def release_cuda() -> None:
    """Return unreferenced GPU memory to the driver: collect reference cycles, then empty torch's cache
    (blocks of freed tensors and of destroyed CUDA graphs' pools)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError:  # a broken context has nothing to give back; the CPU step still works
            pass
