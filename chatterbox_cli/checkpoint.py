"""Find, validate and read Chatterbox checkpoints."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from chatterbox_cli.errors import CheckpointError

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a .safetensors file, read from its header alone."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            size = path.stat().st_size
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size - 8} after the length")
            header = json.loads(f.read(n))
        infos = {}
        end = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            infos[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]))
            end = max(end, meta["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has {size} (truncated?)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is not a valid .safetensors file ({e}); delete it and download the checkpoint again"
        ) from e
    return infos
