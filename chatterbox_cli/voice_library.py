"""The voice library: prepared voices kept under a name (`chatterbox voices add|list|remove`, and
`synthesize --voice NAME`).

Each voice is one `.voice` file (models/conds.py) named after it in one folder: $CHATTERBOX_VOICES, else
$XDG_DATA_HOME/chatterbox-cli/voices (~/.local/share/...). A name is letters, digits, "-" and "_" (up to
64, starting with a letter or digit), so it can never name a path outside the folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from chatterbox_cli.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUFFIX = ".voice"


def library_dir() -> Path:
    if os.environ.get("CHATTERBOX_VOICES"):
        return Path(os.environ["CHATTERBOX_VOICES"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "chatterbox-cli" / "voices"


def is_name(text: str) -> bool:
    return _NAME.fullmatch(text) is not None


def path_of(name: str) -> Path:
    """The library file of voice `name`; UsageError for a name that is not one."""
    if not is_name(name):
        raise UsageError(
            f"{name!r} is not a voice name: use letters, digits, - and _ (up to 64, starting with a letter "
            "or digit)"
        )
    return library_dir() / f"{name}{SUFFIX}"


def find(name: str) -> Path:
    """The file of library voice `name`; UsageError naming the voices there when it has none."""
    path = path_of(name)
    if not path.is_file():
        names = ", ".join(e.name for e in entries()) or "none yet"
        raise UsageError(
            f"no voice {name!r} in the voice library {library_dir()} (it has: {names}); add one with "
            f"`chatterbox voices add {name} clip.wav`, or give a clip's path"
        )
    return path


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    metadata: dict[str, str]


def entries() -> list[Entry]:
    """The library's voices by name; files that cannot be read are listed with their problem."""
    from chatterbox_cli.errors import ChatterboxError
    from chatterbox_cli.models.conds import load_voice

    folder = library_dir()
    found = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        if not is_name(path.stem):
            continue
        try:
            _, metadata = load_voice(path)
        except ChatterboxError as e:
            metadata = {"problem": str(e)}
        found.append(Entry(path.stem, path, metadata))
    return found


def remove(name: str) -> Path:
    path = find(name)
    path.unlink()
    return path
