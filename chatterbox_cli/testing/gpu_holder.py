"""A small card made of a big one: a process that holds GPU memory until NVML reports N GiB free.

`python -m chatterbox_cli.testing.gpu_holder N [DEVICE]` allocates with plain cudaMalloc calls (torch's
caching allocator is off), prints `ready <free bytes>` once NVML reports N GiB free (to within one 2 MiB
allocation), and holds the memory until its stdin closes. `HeldGpu` runs it from Python. Used by
benchmarks/small_card.py and the GPU tests, which then run `chatterbox synthesize` beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import TracebackType

from chatterbox_cli import vram

GRAIN = 2 * 2**20  # cudaMalloc's granularity


def nvml_free_bytes(index: int) -> int:
    free = vram.free_bytes(index)
    if free is None:
        raise RuntimeError(f"NVML sees no GPU {index}")
    return free


def hold(free_gib: float, index: int = 0) -> None:
    os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # each torch.empty is one cudaMalloc of its size
    import torch

    torch.zeros(1, device=f"cuda:{index}")  # this process's own context comes off the free memory first
    target = int(free_gib * 2**30)
    held = []
    while (excess := nvml_free_bytes(index) - target) >= GRAIN:
        # most of it at once, then smaller blocks: NVML sees the driver's own rounding too
        size = max(GRAIN, excess // GRAIN * GRAIN if excess < 256 * 2**20 else excess - 64 * 2**20)
        try:
            held.append(torch.empty(size, dtype=torch.uint8, device=f"cuda:{index}"))
        except torch.OutOfMemoryError:
            break
    print(f"ready {nvml_free_bytes(index)}", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin or ends


class HeldGpu:
    """Context manager: a holder process leaving `free_gib` GiB free on GPU `index`; `.free_bytes` is what
    NVML reported once it was ready."""

    def __init__(self, free_gib: float, index: int = 0) -> None:
        self.free_gib, self.index = free_gib, index
        self.free_bytes = 0
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> HeldGpu:
        module = "chatterbox_cli.testing.gpu_holder"
        command = [sys.executable, "-m", module, str(self.free_gib), str(self.index)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("ready "):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the GPU memory holder did not start (it said {line!r})")
        self.free_bytes = int(line.split()[1])
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None:
            return
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    hold(float(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
