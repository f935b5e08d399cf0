"""Modules that take turns on the GPU in one weight arena.

Each module's weights (parameters, buffers, tensor attributes, bitsandbytes quantization state) are packed
once into a pinned host buffer. All modules' tensors then point, for good, into one GPU buffer (the
arena) as large as the largest module: module A at offsets 0.., module B at offsets 0.. as well. A module's
turn is one host-to-device copy of its packed bytes into the arena; the idle module needs no copy out,
since weights never change. Because no tensor ever moves, a CUDA graph captured during a module's turn
(T3's decode steps, the flow's kept graph) stays valid for its later turns, and the GPU holds one
module's weights at a time, in memory that is never freed and reallocated.

The idle module's tensors still point into the arena, at the other module's bytes: only the module whose
turn it is may run (service.LoadedModel.use).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ALIGN = 512  # bytes: every storage starts at a multiple (cuBLAS and vectorised kernels like 16 or more)

# Objects besides modules and parameters whose tensors are weights: bitsandbytes' 4-bit quantization state
# (absmax, code, offset; `state2` for double quantization) and its int8 matmul state (CB, SCB).
_STATE_CLASSES = ("QuantState", "MatmulLtState")


@dataclass
class _Slot:
    """Where a weight tensor is referenced: `holder.name` (or `holder[name]` for a dict), and the tensor's
    place in its storage."""

    holder: object
    name: str
    storage: int  # index into _Packed.storages
    offset: int  # storage_offset, in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Packed:
    slots: list[_Slot]
    starts: list[int]  # byte offset of each storage in the packed layout
    host: Tensor  # uint8, pinned on CUDA machines: every storage's bytes at its start
    nbytes: int


def _slots_of(obj: object, found: list[tuple[object, str, Tensor]], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for name, value in list(vars(obj).items()):
        if name in ("_parameters", "_buffers"):
            for key, tensor in value.items():
                if tensor is not None:
                    found.append((value, key, tensor))
                    if isinstance(tensor, nn.Parameter):
                        _slots_of(tensor, found, seen)
        elif isinstance(value, Tensor):
            found.append((obj, name, value))
        elif type(value).__name__ in _STATE_CLASSES:
            _slots_of(value, found, seen)


def weight_tensors(module: nn.Module) -> list[tuple[object, str, Tensor]]:
    """Every (holder, name, tensor) of `module` and its submodules that holds weights (see _STATE_CLASSES)."""
    found: list[tuple[object, str, Tensor]] = []
    seen: set[int] = set()
    for sub in module.modules():
        _slots_of(sub, found, seen)
    return found


def _bytes_of(storage: torch.UntypedStorage) -> Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _pack(module: nn.Module, device: torch.device) -> _Packed:
    """Copy every storage that `module`'s weights on `device` live in into one host buffer (views into one
    storage, such as fused projections or an int8 weight that its matmul state also holds, keep sharing
    it); pinned when `device` is a GPU."""
    pin = device.type == "cuda"
    storages: dict[int, int] = {}
    originals: list[torch.UntypedStorage] = []
    slots = []
    for holder, name, tensor in weight_tensors(module):
        if tensor.device.type != device.type:
            continue  # kept in host memory on purpose (T3.keep_text_table_on_host)
        storage = tensor.untyped_storage()
        index = storages.setdefault(storage.data_ptr(), len(originals))
        if index == len(originals):
            originals.append(storage)
        slot = _Slot(
            holder, name, index, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype
        )
        slots.append(slot)
    starts, total = [], 0
    for storage in originals:
        starts.append(total)
        total += -(-storage.nbytes() // ALIGN) * ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for storage, start in zip(originals, starts, strict=True):
        host[start : start + storage.nbytes()].copy_(_bytes_of(storage))
    return _Packed(slots, starts, host, total)


def _bind(packed: _Packed, buffer: Tensor) -> None:
    """Point every slot of `packed` at its place in `buffer` (uint8, laid out as packed.host)."""
    storage = buffer.untyped_storage()
    base = buffer.storage_offset()
    for slot in packed.slots:
        start = base + packed.starts[slot.storage]
        itemsize = slot.dtype.itemsize
        view = torch.empty(0, dtype=slot.dtype, device=buffer.device)
        view.set_(storage, start // itemsize + slot.offset, slot.shape, slot.stride)
        if isinstance(slot.holder, dict):
            old = slot.holder[slot.name]
            if isinstance(old, nn.Parameter):
                old.data = view  # the Parameter object stays: bitsandbytes keeps state on it
            else:
                slot.holder[slot.name] = view
        else:
            setattr(slot.holder, slot.name, view)


class Turns:
    """Modules that take turns on `device` in one arena (see the module docstring).

    `add` each module (wherever its weights are: it is packed to host memory and its device copy freed),
    then `use(name)` before running one. The arena is allocated at the first `use`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.packed: dict[str, _Packed] = {}
        self.arena: Tensor | None = None
        self.turn: str | None = None

    def add(self, name: str, module: nn.Module) -> None:
        if self.arena is not None:
            raise RuntimeError("add every module before the first turn")
        packed = _pack(module, self.device)
        _bind(packed, packed.host)  # the module's device tensors are freed here
        self.packed[name] = packed

    @property
    def nbytes(self) -> int:
        """The arena's size: the largest module's packed weights."""
        return max((p.nbytes for p in self.packed.values()), default=0)

    def use(self, name: str) -> None:
        """Copy `name`'s weights into the arena (nothing to do when it already has the turn)."""
        if self.turn == name:
            return
        if self.arena is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the added modules' freed blocks: the arena is one allocation
            self.arena = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
            for packed in self.packed.values():
                _bind(packed, self.arena)
        packed = self.packed[name]
        self.arena[: packed.nbytes].copy_(packed.host, non_blocking=True)
        self.turn = name

    def modules_bytes(self) -> Iterator[tuple[str, int]]:
        for name, packed in self.packed.items():
            yield name, packed.nbytes
