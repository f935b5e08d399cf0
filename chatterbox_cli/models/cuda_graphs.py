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
    capture). The graph's memory is freed with the object.
    """

    def __init__(self, fn: Callable[..., Tensor], *args: Tensor) -> None:
        self.inputs = [a.clone() for a in args]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *args: Tensor) -> Tensor:
        for static, value in zip(self.inputs, args, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output


def capturable(module: nn.Module, x: Tensor) -> bool:
    """Whether `module` may run inside a CUDA graph for input `x`: on CUDA, not already capturing, and
    with plain Linears only (bitsandbytes layers may synchronise with the host)."""
    return (
        x.is_cuda
        and not torch.cuda.is_current_stream_capturing()
        and all(type(m) is nn.Linear for m in module.modules() if isinstance(m, nn.Linear))
    )
