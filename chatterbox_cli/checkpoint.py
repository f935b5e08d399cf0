"""Find, validate and read Chatterbox checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from chatterbox_cli.errors import ChatterboxError, CheckpointError, UsageError
from chatterbox_cli.variants import ENGLISH, Role, Variant, variant_of_folder, variant_of_repo

if TYPE_CHECKING:
    import torch

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


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


DEFAULT_REPO = "ResembleAI/chatterbox"  # both variants' files live in this one repo
REQUIRED_FILES = ENGLISH.all_files

CheckpointSource = Literal["local", "hub-cache", "download"]

# A hub repo id is "name" or "namespace/name" (letters, digits, "-", "_", ".").
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class NotDownloadedError(CheckpointError):
    """A hub checkpoint that is not (fully) in the hub cache and may not be downloaded now."""


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    source: CheckpointSource
    repo_id: str | None = None
    revision: str | None = None  # the commit hash for hub checkpoints, where known
    variant: Variant = ENGLISH

    def path(self, name: str) -> Path:
        return self.folder / name

    def file(self, role: Role) -> Path:
        """The path of this variant's file for `role` ("t3", "s3gen", "ve", "tokenizer", "conds")."""
        return self.folder / self.variant.file(role)


def looks_like_path(model: str) -> bool:
    """True when `model` can only be meant as a folder, not as a hub repo id."""
    return (
        model.startswith(("/", "./", "../", "~", ".\\"))
        or model in (".", "..")
        or "\\" in model
        or model.endswith("/")
        or not _REPO_ID.match(model)
    )


def hub_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (same precedence as huggingface_hub)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        raw = env["HF_HUB_CACHE"]
    elif env.get("HUGGINGFACE_HUB_CACHE"):
        raw = env["HUGGINGFACE_HUB_CACHE"]
    else:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        raw = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(raw)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says it now."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_command(
    repo_id: str,
    revision: str | None = None,
    files: tuple[str, ...] = ENGLISH.all_files,
    local_dir: Path | None = None,
    force: bool = False,
) -> str:
    """The shell command that fetches `files` of `repo_id` (into the hub cache, or into `local_dir`)."""
    # huggingface_hub >= 0.34 ships the `hf` CLI; older releases only `huggingface-cli`.
    cli = "hf" if importlib.util.find_spec("huggingface_hub.cli.hf") is not None else "huggingface-cli"
    cmd = f"{cli} download {repo_id} {' '.join(files)}"
    if revision:
        cmd += f" --revision {revision}"
    if local_dir is not None:
        cmd += f" --local-dir {local_dir}"
    if force:
        cmd += " --force-download"
    return cmd


def _how_to_get(
    repo_id: str,
    revision: str | None,
    files: tuple[str, ...],
    local_dir: Path | None = None,
    force: bool = False,
    variant: Variant = ENGLISH,
) -> str:
    where = f"into {local_dir}" if local_dir is not None else f"into the hub cache at {hub_cache_dir()}"
    return (
        f"Get them with `{download_command(repo_id, revision, files, local_dir, force)}` ({where}; needs "
        f"network access), or pass --model /path/to/folder holding {', '.join(variant.all_files)}."
    )


def _missing_files(folder: Path, variant: Variant) -> tuple[str, ...]:
    return tuple(name for name in variant.all_files if not (folder / name).is_file())


def _resolve_local(model: str, variant: Variant) -> Checkpoint:
    folder = Path(model).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"--model {model}: {folder} {what}. Pass a folder holding {', '.join(variant.all_files)}, "
            f"or a model hub repo id such as {DEFAULT_REPO}."
        )
    missing = _missing_files(folder, variant)
    if missing:
        other = variant_of_folder({p.name for p in folder.iterdir()})
        hint = (
            f" It holds the {other.name} checkpoint: pass --variant {other.name} to use it."
            if other is not None and other != variant
            else ""
        )
        raise CheckpointError(
            f"checkpoint folder {folder} lacks {', '.join(missing)} of the {variant.name} model.{hint} "
            + _how_to_get(variant.repo, None, missing, local_dir=folder, variant=variant)
        )
    return Checkpoint(folder=folder.resolve(), source="local", variant=variant)


def _from_cache(
    repo_id: str, revision: str | None, cache_dir: Path, variant: Variant
) -> tuple[Checkpoint | None, tuple[str, ...]]:
    """The cached snapshot holding every file of `variant`, or None and the files the cache lacks."""
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in variant.all_files:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str) and Path(hit).is_file():
            found[name] = Path(hit)
    missing = tuple(n for n in variant.all_files if n not in found)
    folders = {p.parent for p in found.values()}
    if missing or len(folders) != 1:
        return None, missing or variant.all_files
    folder = folders.pop()
    checkpoint = Checkpoint(folder, "hub-cache", repo_id=repo_id, revision=folder.name, variant=variant)
    return checkpoint, ()


def _download(repo_id: str, revision: str | None, cache_dir: Path, progress: bool, variant: Variant) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(variant.all_files)
            )
        )
    finally:
        if silence:
            enable_progress_bars()


def resolve_checkpoint(
    model: str = DEFAULT_REPO,
    revision: str | None = None,
    allow_download: bool = True,
    progress: bool = True,
    variant: Variant | None = None,
) -> Checkpoint:
    """Find the checkpoint `model` names: an existing folder, else a hub repo in the cache, else a download.
    The files looked for are `variant`'s (variants.Variant.all_files); None: the variant a local folder
    holds, else English.

    Raises CheckpointError (exit code 3) naming what is missing and the command that gets it.
    """
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    if Path(model).expanduser().is_dir() or looks_like_path(model):
        folder = Path(model).expanduser()
        if revision is not None and folder.is_dir():
            raise UsageError(f"--revision {revision} applies to hub repos, not to the folder {model}")
        if variant is None and folder.is_dir():
            variant = variant_of_folder({p.name for p in folder.iterdir()})
        return _resolve_local(model, variant or ENGLISH)

    variant = variant or variant_of_repo(model) or ENGLISH
    # the default repo stands for "the official checkpoint": Turbo's lives in a repo of its own
    repo_id = variant.repo if model == DEFAULT_REPO else model
    cache_dir = hub_cache_dir()
    try:
        checkpoint, missing = _from_cache(repo_id, revision, cache_dir, variant)
    except HFValidationError as e:
        raise CheckpointError(
            f"--model {model}: no such folder, and not a valid model hub repo id ({e}). Pass a folder "
            f"holding {', '.join(variant.all_files)}, or a repo id such as {DEFAULT_REPO}."
        ) from e
    if checkpoint is not None:
        return checkpoint

    rev = f" (revision {revision})" if revision else ""
    partial = "" if len(missing) == len(variant.all_files) else f" (missing: {', '.join(missing)})"
    not_cached = f"{repo_id}{rev} is not in the hub cache at {cache_dir}{partial}"
    if model != DEFAULT_REPO and "/" in model:
        not_cached += f", and there is no folder {model}"
    if not allow_download:
        raise NotDownloadedError(
            f"{not_cached}; downloading was not allowed. "
            + _how_to_get(repo_id, revision, missing, variant=variant)
        )
    if hub_offline():
        raise NotDownloadedError(
            f"{not_cached}, and HF_HUB_OFFLINE is set, so it cannot be downloaded (unset HF_HUB_OFFLINE to "
            "allow that). " + _how_to_get(repo_id, revision, missing, variant=variant)
        )
    try:
        folder = _download(repo_id, revision, cache_dir, progress, variant)
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        raise CheckpointError(
            f"{not_cached}, and downloading it failed: {type(e).__name__}: {e}\n"
            + _how_to_get(repo_id, revision, missing, variant=variant)
        ) from e
    except OSError as e:
        raise ChatterboxError(
            f"could not write {repo_id} into the hub cache at {cache_dir}: {e}. Free disk space or point "
            "HF_HUB_CACHE at a folder with room."
        ) from e
    still_missing = _missing_files(folder, variant)
    if still_missing:
        raise CheckpointError(
            f"{repo_id}{rev} was downloaded to {folder} but lacks {', '.join(still_missing)}: it is not a "
            f"Chatterbox checkpoint. Pass --model {DEFAULT_REPO} or a folder holding "
            f"{', '.join(variant.all_files)}."
        )
    return Checkpoint(folder, "download", repo_id=repo_id, revision=folder.name, variant=variant)


def validate(checkpoint: Checkpoint) -> dict[str, dict[str, TensorInfo]]:
    """Check every required file is present and well-formed, without loading weights.

    Returns the parsed header of each .safetensors file. Raises CheckpointError listing every problem.
    """
    problems: list[str] = []
    bad: list[str] = []
    headers: dict[str, dict[str, TensorInfo]] = {}
    first_cause: BaseException | None = None
    variant = checkpoint.variant
    for name in variant.all_files:
        p = checkpoint.path(name)
        if not p.is_file():
            problems.append(f"{name} is missing")
            bad.append(name)
            continue
        try:
            if name.endswith(".safetensors"):
                headers[name] = safetensors_header(p)
                if not headers[name]:
                    raise CheckpointError(f"{p} holds no tensors")
            elif name == variant.file("tokenizer") and variant.tokenizer != "gpt2":
                _check_tokenizer_json(p)  # (GPT-2's vocab.json is a plain map, read with merges.txt)
            elif name.endswith(".pt"):
                _check_torch_zip(p)
            elif name.endswith(".json"):
                _check_json(p)
        except CheckpointError as e:
            problems.append(str(e))
            bad.append(name)
            first_cause = first_cause or e
    if problems:
        where = checkpoint.repo_id or str(checkpoint.folder)
        fix = (
            _how_to_get(checkpoint.repo_id, checkpoint.revision, tuple(bad), force=True, variant=variant)
            if checkpoint.repo_id
            else _how_to_get(
                variant.repo, None, tuple(bad), local_dir=checkpoint.folder, force=True, variant=variant
            )
        )
        raise CheckpointError(
            f"checkpoint {where} ({checkpoint.folder}) is not usable:\n  - "
            + "\n  - ".join(problems)
            + "\n"
            + fix
        ) from first_cause
    return headers


def _check_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _check_tokenizer_json(path: Path) -> None:
    data = _check_json(path)
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f'{path} is JSON but not a tokenizers file (no "model" key)')


def _check_torch_zip(path: Path) -> None:
    # torch.save writes a zip archive with <name>/data.pkl; its pickle is not opened here.
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a torch.save archive ({e})") from e
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(f"{path} is a zip file but not a torch.save archive (no data.pkl)")


# safetensors' name of each torch dtype, by str(dtype) (this module does not import torch up front).
SAFETENSORS_DTYPE_NAMES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save (`s3gen.pt`, `ve.pt`), read with `weights_only=True`: tensors and
    plain containers only, never an arbitrary unpickle. Memory-mapped: nothing is read until used, so the
    shapes cost no I/O. CheckpointError (exit 3) if the file is refused or is not a flat tensor dict."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds more than tensors, so it is not read (torch.load with weights_only=True refused "
            f"it: {first}). Official Chatterbox files load this way: download it again"
        ) from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read as a torch.save file ({e}); download it again") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} is not a state dict (names to tensors); is it a Chatterbox file?")
    return state


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a checkpoint file, .safetensors (its header) or .pt (mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_header(path)
    state = read_torch_state_dict(path)
    return {
        name: TensorInfo(SAFETENSORS_DTYPE_NAMES[str(t.dtype)], tuple(t.shape)) for name, t in state.items()
    }


class TensorFile:
    """The tensors of one checkpoint file by name, .safetensors (read one at a time) or a torch.save'd
    state dict (.pt, memory-mapped, weights only): what every loader reads, whichever the variant ships.

        with TensorFile(path) as f:
            for name in f.keys(): f.shape(name), f.get_tensor(name)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._safe: object | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> TensorFile:
        if self.path.suffix == ".pt":
            self._state = read_torch_state_dict(self.path)
            return self
        from safetensors import SafetensorError, safe_open

        try:
            self._safe = safe_open(str(self.path), framework="pt", device="cpu").__enter__()
        except (OSError, SafetensorError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"cannot read {self.path} ({e}); delete it and download the checkpoint again"
            ) from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self._safe is not None:
            self._safe.__exit__(*exc)  # type: ignore[attr-defined]
        self._safe = self._state = None

    def keys(self) -> list[str]:
        return list(self._state) if self._state is not None else list(self._safe.keys())  # type: ignore[union-attr]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[name].shape)
        return tuple(self._safe.get_slice(name).get_shape())  # type: ignore[union-attr]

    def get_tensor(self, name: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[name]
        from safetensors import SafetensorError

        try:
            return self._safe.get_tensor(name)  # type: ignore[union-attr]
        except SafetensorError as e:
            raise CheckpointError(
                f"cannot read tensor {name} of {self.path} ({e}); delete it and download the checkpoint again"
            ) from e


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file so that `path` is either the old file or the complete new one: into a
    temporary file beside it, then renamed over it. The temporary file never outlives a failure."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
