"""Exit codes and the errors that carry them. The one place both are defined."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    MODEL_NOT_FOUND = 3
    OUT_OF_MEMORY = 4
    INTERRUPTED = 130


class ChatterboxError(Exception):
    """An error the user can act on. The message names the problem and the fix."""

    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ChatterboxError):
    exit_code = ExitCode.USAGE


class CheckpointError(ChatterboxError):
    exit_code = ExitCode.MODEL_NOT_FOUND


class OutOfMemoryError(ChatterboxError):
    exit_code = ExitCode.OUT_OF_MEMORY
