"""Write a checkpoint folder in the official Chatterbox layout, filled with seeded random weights.

English: t3_cfg.safetensors, ve.safetensors, s3gen.safetensors (fp32, official tensor names),
tokenizer.json (the real English vocabulary) and conds.pt (the built-in voice, official torch.save layout).
Multilingual (variants.MULTILINGUAL): t3_mtl23ls_v2.safetensors (text vocabulary 2,454), ve.pt and s3gen.pt
(torch.save'd state dicts, as the official files are), a synthetic grapheme vocabulary covering one test
sentence per language and a small Cangjie table (the official ones cannot be downloaded here), conds.pt.
Turbo (variants.TURBO): t3_turbo_v1.safetensors (GPT-2 layout: Conv1D weights [in, out], the unused `wte`),
s3gen_meanflow.safetensors (with the meanflow time mixer), ve.safetensors, GPT-2 tokenizer files (the real
GPT-2 vocabulary cut to its first 8,000 merges, the official tags; testing/data/turbo) and conds.pt with
Turbo's 375-token speech prompt (30 at the tiny size).

Each model module provides `random_state_dict(config, seed)`; this writer only calls them. Tensors are
streamed to disk: the safetensors header is written from the shapes first and T3 tensors are generated
one at a time, so a full-size checkpoint never needs more than one model copy in memory (T3: one tensor).
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from chatterbox_cli.checkpoint import SAFETENSORS_DTYPE_NAMES
from chatterbox_cli.models import t3 as t3_module
from chatterbox_cli.models.t3 import T3Config
from chatterbox_cli.variants import MULTILINGUAL, TURBO, Variant, get_variant

Size = Literal["tiny", "full"]

DATA = Path(__file__).parent / "data"
TOKENIZER_JSON = DATA / "tokenizer.json"
# Synthetic multilingual tokenizer files, written by scripts/parity/mtl_tokenizer.py.
MTL_TOKENIZER_JSON = DATA / "mtl_vocab.json"
MTL_CANGJIE_JSON = DATA / "mtl_cangjie.json"


def t3_config_for(size: Size, variant: Variant | None = None) -> T3Config:
    if size not in ("tiny", "full"):
        raise ValueError(f"unknown checkpoint size {size!r}; use 'tiny' or 'full'")
    if variant is TURBO:
        if size == "full":
            return T3Config.turbo()
        from chatterbox_cli.models.gpt2_tokenizer import TEST_TOKENIZER_DIR, open_gpt2_tokenizer

        # the tiny text table covers the test tokenizer's ids (8,276 rows instead of 50,276)
        vocab = open_gpt2_tokenizer(TEST_TOKENIZER_DIR).vocab_size
        return replace(T3Config.tiny_turbo(), text_vocab_size=vocab)
    config = T3Config.tiny() if size == "tiny" else T3Config.english()
    if variant is MULTILINGUAL:
        config = replace(config, text_vocab_size=T3Config.multilingual().text_vocab_size)
    return config


def write_safetensors_streaming(
    path: Path,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, Tensor]],
) -> None:
    """Write a .safetensors file whose header is known up front (`layout`: name -> (shape, dtype)).

    `tensors` must yield every name of `layout` exactly once, in layout order; each is written and can be
    freed before the next is produced.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in layout.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPE_NAMES[str(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned

    expected = iter(layout.items())
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, tensor in tensors:
            want_name, (shape, dtype) = next(expected)
            if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the layout"
                )
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise ValueError("fewer tensors than the layout announced")
    tmp.replace(path)


def write_state_dict(path: Path, state: dict[str, Tensor]) -> None:
    layout = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    write_safetensors_streaming(path, layout, state.items())


def write_t3(path: Path, config: T3Config, seed: int) -> None:
    shapes = t3_module.t3_tensor_shapes(config)
    layout = {name: (shape, torch.float32) for name, shape in shapes.items()}
    write_safetensors_streaming(path, layout, t3_module.iter_random_state_dict(config, seed))


def _optional_state_dict(
    module_name: str, config_name: str, size: Size, seed: int
) -> dict[str, Tensor] | None:
    """`module.random_state_dict(Config.tiny() | Config.english(), seed)`, or None while the module or
    function does not exist yet."""
    try:
        module = importlib.import_module(module_name)
        config_cls = getattr(module, config_name)
        make = module.random_state_dict
    except (ImportError, AttributeError):
        return None
    config = config_cls.tiny() if size == "tiny" else config_cls.english()
    return make(config, seed)


def random_conds(
    seed: int = 0, prompt_tokens: int = 150, gen_tokens: int = 100
) -> dict[str, dict[str, object]]:
    """The built-in voice in the official `conds.pt` layout (the reference's Conditionals.save).

    t3: VoiceEncoder embedding [1, 256] (non-negative, unit length, like the real one), 150 prompt speech
    tokens, exaggeration 0.5. gen: S3 prompt tokens [1, T], their length, the 24 kHz log-mel of the prompt
    [1, 2T, 80] and the CAMPPlus x-vector [1, 192].
    """
    gen = torch.Generator().manual_seed(seed + 17)
    speaker = torch.randn(1, 256, generator=gen).abs()
    speaker = speaker / speaker.norm(dim=-1, keepdim=True)
    return {
        "t3": {
            "speaker_emb": speaker,
            "clap_emb": None,
            "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, prompt_tokens), generator=gen),
            "cond_prompt_speech_emb": None,
            "emotion_adv": torch.full((1, 1, 1), 0.5),
        },
        "gen": {
            "prompt_token": torch.randint(0, 6561, (1, gen_tokens), generator=gen),
            "prompt_token_len": torch.tensor([gen_tokens]),
            "prompt_feat": torch.randn(1, 2 * gen_tokens, 80, generator=gen) * 2.0 - 6.0,
            "prompt_feat_len": None,
            "embedding": torch.randn(1, 192, generator=gen),
        },
    }


def write_random_checkpoint(
    folder: str | Path, size: Size = "tiny", seed: int = 0, variant: str = "english"
) -> Path:
    """Write (or overwrite) a random checkpoint of `variant` (variants.VARIANTS) into `folder`; returns the
    folder."""
    v = get_variant(variant)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = t3_config_for(size, v)
    write_t3(folder / v.file("t3"), config, seed)
    s3gen_config = "MeanflowS3GenConfig" if v is TURBO else "S3GenConfig"
    for role, module_name, config_name in (
        ("ve", "chatterbox_cli.models.voice_encoder", "VoiceEncoderConfig"),
        ("s3gen", "chatterbox_cli.models.s3gen", s3gen_config),
    ):
        state = _optional_state_dict(module_name, config_name, size, seed)
        if state is None:
            continue
        path = folder / v.file(role)
        if path.suffix == ".pt":
            torch.save(state, path)
        else:
            write_state_dict(path, state)
        del state
    if v is MULTILINGUAL:
        shutil.copyfile(MTL_TOKENIZER_JSON, folder / v.file("tokenizer"))
        shutil.copyfile(MTL_CANGJIE_JSON, folder / "Cangjie5_TC.json")
    elif v is TURBO:
        from chatterbox_cli.models.gpt2_tokenizer import TEST_TOKENIZER_DIR, TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            shutil.copyfile(TEST_TOKENIZER_DIR / name, folder / name)
    else:
        shutil.copyfile(TOKENIZER_JSON, folder / v.file("tokenizer"))
    torch.save(random_conds(seed, prompt_tokens=config.speech_cond_prompt_len), folder / v.file("conds"))
    return folder


def written_files(folder: str | Path, variant: str = "english") -> Iterator[Path]:
    """The checkpoint files of `variant` present in `folder`."""
    for name in get_variant(variant).all_files:
        if (Path(folder) / name).exists():
            yield Path(folder) / name
