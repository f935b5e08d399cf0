"""`import bitsandbytes` without two notices that ask nothing of the user; every other message stays.

- "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" is logged at every eager int8 matmul
  with bf16 inputs (T3 on bf16 GPUs: over a thousand lines a run); the cast is how its int8 kernels work.
- "Failed to load CPU gemm_4bit_forward from kernels-community" is logged at import on CPUs with
  AVX512-BF16 when the optional `kernels` package is absent; bitsandbytes then uses its own CPU kernel.
  Its record carries the import error, whose traceback holds every frame on the stack at that moment.

Every import of bitsandbytes in this package goes through `import_bitsandbytes`, so the filter is in place
before the library's first message.
"""

from __future__ import annotations

import logging
from types import ModuleType

NOTICES = ("MatMul8bitLt: inputs will be cast", "Failed to load CPU gemm_4bit_forward")
LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOTICES)


_QUIET = _Quiet()


def import_bitsandbytes() -> ModuleType:
    """The bitsandbytes module; ImportError (or whatever its import raises) as is."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)
    import bitsandbytes

    return bitsandbytes
