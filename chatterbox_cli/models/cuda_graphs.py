"""Replaying a fixed-shape GPU computation as one CUDA graph instead of hundreds of kernel launches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class GraphedCall:
    """fn(*args) captured once as a CUDA graph over static copies of its tensor arguments; each call copies
    new argument values (same shapes) in and replays the graph. The returned tensor is the graph's own
    output buffer: use it before the next call.

    Run fn once eagerly at these shapes before capturing (lazy initialisation must not happen during
    capture). The graph's memory comes from `pool` (the id of a torch.cuda.MemPool, which graphs that
    never run at the same time can share) or from a pool of its own, and goes back to it with the object.
    """

    def __init__(self, fn: Callable[..., Tensor], *args: Tensor, pool: tuple[int, int] | None = None) -> None:
        self.inputs = [a.clone() for a in args]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, *args: Tensor) -> Tensor:
        for static, value in zip(self.inputs, args, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output


def capturable(module: nn.Module, x: Tensor) -> bool:
    """Whether `module` may run inside a CUDA graph for input `x`: on CUDA, not already capturing, and
    without bitsandbytes int8 layers that split outlier columns off (a threshold above 0: that search
    reads the GPU from the host). Their threshold-0 int8 and their nf4 matmuls are plain kernels."""
    return (
        x.is_cuda
        and not torch.cuda.is_current_stream_capturing()
        and all(getattr(getattr(m, "state", None), "threshold", 0.0) == 0.0 for m in module.modules())
    )
