"""The Chatterbox model family: one description per variant, read by everything that differs between them.

A variant says which files its checkpoint holds (by role: T3, S3Gen, the voice encoder, the tokenizer, the
built-in voice, and any extra file its tokenizer needs), which languages it speaks and its generation
defaults. The checkpoint resolver, the checkpoint writer, `estimate` and the service read this, instead of
branching on the variant. Shapes are never listed here: T3's config is read from the checkpoint's header.

Facts from the released reference `chatterbox-tts` 0.1.7 (`tts.py`, `mtl_tts.py`): English ships
safetensors; the multilingual model keeps T3 in safetensors but S3Gen and the voice encoder as torch
pickles of state dicts (`s3gen.pt`, `ve.pt`), which we read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chatterbox_cli.errors import UsageError
from chatterbox_cli.languages import LANGUAGES

Role = Literal["t3", "s3gen", "ve", "tokenizer", "conds"]
ROLES: tuple[Role, ...] = ("t3", "s3gen", "ve", "tokenizer", "conds")
# english: a BPE, spaces spelled [SPACE]; grapheme: lower-cased NFKD graphemes with a [xx] language token and
# per-language steps (models/mtl_tokenizer.py). models.tokenizer.open_tokenizer reads either.
TokenizerKind = Literal["english", "grapheme"]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    files: dict[Role, str]  # the checkpoint file of each role
    tokenizer: TokenizerKind
    languages: tuple[str, ...]
    repetition_penalty: float  # the reference's default for this variant
    # T3 decodes under the alignment guard (models/alignment.py), which holds back or forces the stop token
    alignment_guard: bool
    extra_files: tuple[str, ...] = ()  # fetched with the others; needed by the tokenizer for some languages

    @property
    def all_files(self) -> tuple[str, ...]:
        """Every file of the checkpoint, in the order of ROLES, then the extras."""
        return (*(self.files[role] for role in ROLES), *self.extra_files)

    def file(self, role: Role) -> str:
        return self.files[role]


ENGLISH = Variant(
    name="english",
    description="English Chatterbox (0.5B Llama T3, 704-token text vocabulary)",
    files={
        "t3": "t3_cfg.safetensors",
        "s3gen": "s3gen.safetensors",
        "ve": "ve.safetensors",
        "tokenizer": "tokenizer.json",
        "conds": "conds.pt",
    },
    tokenizer="english",
    languages=("en",),
    repetition_penalty=1.2,
    alignment_guard=False,
)

MULTILINGUAL = Variant(
    name="multilingual",
    description="Multilingual Chatterbox, 23 languages (the English T3 with a 2,454-token text vocabulary)",
    files={
        "t3": "t3_mtl23ls_v2.safetensors",
        "s3gen": "s3gen.pt",
        "ve": "ve.pt",
        "tokenizer": "grapheme_mtl_merged_expanded_v1.json",
        "conds": "conds.pt",
    },
    tokenizer="grapheme",
    languages=tuple(LANGUAGES),
    repetition_penalty=2.0,
    alignment_guard=True,
    extra_files=("Cangjie5_TC.json",),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (ENGLISH, MULTILINGUAL)}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UsageError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def variant_for(variant: str | None, language: str | None) -> Variant | None:
    """The variant a run asks for: `--variant` if given (it must speak `language`), else multilingual for
    any language but English, else None: whichever the checkpoint holds (a local folder's, else English)."""
    if variant is not None:
        chosen = get_variant(variant)
        if language is not None and language not in chosen.languages:
            raise UsageError(
                f"--variant {chosen.name} does not speak {language!r} (it speaks "
                f"{', '.join(chosen.languages)}); use --variant multilingual"
            )
        return chosen
    if language is not None and language != "en":
        if language not in MULTILINGUAL.languages:
            raise UsageError(
                f"unknown language {language!r}; the multilingual model speaks "
                f"{', '.join(MULTILINGUAL.languages)}"
            )
        return MULTILINGUAL
    return None


def variant_of_folder(present: set[str]) -> Variant | None:
    """The variant whose T3 file is among the file names `present` (English first), or None."""
    for variant in VARIANTS.values():
        if variant.file("t3") in present:
            return variant
    return None
