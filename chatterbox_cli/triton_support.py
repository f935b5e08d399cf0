"""Whether Triton kernels run on a CUDA device. The project's Triton kernels (quant/awq_triton.py,
models/gpt2_fused.py) are chosen only where `runs_on` says so; elsewhere the torch path runs, rather than
the first decode step failing.

Triton needs the package (Linux wheels of torch bring it), a GPU of compute capability 7.0 or later (its
compiler refuses older ones) and a C compiler, with which it builds its kernel launcher on first use
(slim containers lack one). The last is known only by trying, so `runs_on` compiles and runs a one-line
kernel once per device and remembers the answer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: nothing runs
    triton = tl = None

MIN_CAPABILITY = (7, 0)
_known: dict[str, bool] = {}

if triton is not None:

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):  # noqa: ANN001, ANN202
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)


def runs_on(device: torch.device | str) -> bool:
    """Whether Triton kernels compile and run on CUDA `device`: False for other devices, without triton,
    on GPUs older than MIN_CAPABILITY, and where a first kernel fails (the failure is not raised)."""
    device = torch.device(device)
    if triton is None or device.type != "cuda":
        return False
    key = str(device)
    if key not in _known:
        if torch.cuda.is_current_stream_capturing():
            return False  # nothing may run while a CUDA graph is captured: tried on the next call
        _known[key] = _first_kernel_runs(device)
    return _known[key]


def _first_kernel_runs(device: torch.device) -> bool:
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return False
    try:
        x = torch.zeros(16, device=device)
        _add_one[(1,)](x, 16, BLOCK=16)
        return bool((x == 1).all())
    except Exception:  # no C compiler, a driver triton does not support, ...: the torch path
        return False
