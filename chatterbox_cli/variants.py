"""The Chatterbox model family: one description per variant, read by everything that differs between them.

A variant says which files its checkpoint holds (by role: T3, S3Gen, the voice encoder, the tokenizer, the
built-in voice, and any extra file its tokenizer needs) and in which hub repo, which languages it speaks,
its generation defaults (`Generation`: the reference's, and the settings the variant has no input for)
and how a voice clip is prepared (`VoiceRules`). The checkpoint resolver, the checkpoint writer,
`estimate` and the service read this, instead of branching on the variant. Shapes are never listed here:
T3's config is read from the checkpoint's header.

Facts from the released reference `chatterbox-tts` 0.1.7 (`tts.py`, `mtl_tts.py`, `tts_turbo.py`): English
and Turbo ship safetensors; the multilingual model keeps T3 in safetensors but S3Gen and the voice encoder
as torch pickles of state dicts (`s3gen.pt`, `ve.pt`), which we read with `torch.load(weights_only=True)`
only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chatterbox_cli.errors import UsageError
from chatterbox_cli.languages import LANGUAGES

Role = Literal["t3", "s3gen", "ve", "tokenizer", "conds"]
ROLES: tuple[Role, ...] = ("t3", "s3gen", "ve", "tokenizer", "conds")
# english: a BPE, spaces spelled [SPACE]; grapheme: lower-cased NFKD graphemes with a [xx] language token and
# per-language steps (models/mtl_tokenizer.py); gpt2: GPT-2's byte-level BPE with paralinguistic tags
# (models/gpt2_tokenizer.py). models.tokenizer.open_tokenizer reads each.
TokenizerKind = Literal["english", "grapheme", "gpt2"]
Setting = Literal["cfg_weight", "exaggeration", "min_p"]


@dataclass(frozen=True)
class Generation:
    """A variant's generation defaults (the reference's) and the settings it has no input for."""

    repetition_penalty: float
    cfg_weight: float = 0.5
    exaggeration: float = 0.5
    min_p: float = 0.05
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    penalty_last: bool = False  # the repetition penalty after the filters (models.sampling)
    flow_steps: int = 10
    # S3Gen's silence token appended this many times to every chunk's speech tokens before rendering
    trailing_silence: int = 0
    # Settings the model has no input for: a value given is ignored (with a warning) and the neutral value
    # (0) used; the reference does the same.
    ignored: tuple[Setting, ...] = ()


@dataclass(frozen=True)
class VoiceRules:
    """How a reference clip becomes a voice (the reference's prepare_conditionals)."""

    min_seconds: float = 0.5  # shorter clips are refused
    t3_prompt_seconds: float = 6.0  # the start of the clip that T3's speech prompt is tokenized from
    loudness_lufs: float | None = None  # the clip is first normalised to this integrated loudness


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    files: dict[Role, str]  # the checkpoint file of each role
    tokenizer: TokenizerKind
    languages: tuple[str, ...]
    generation: Generation
    # T3 decodes under the alignment guard (models/alignment.py), which holds back or forces the stop token
    alignment_guard: bool
    extra_files: tuple[str, ...] = ()  # fetched with the others; needed by the tokenizer
    voice: VoiceRules = VoiceRules()
    repo: str = "ResembleAI/chatterbox"  # the model hub repo that holds the files

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
    generation=Generation(repetition_penalty=1.2),
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
    generation=Generation(repetition_penalty=2.0),
    alignment_guard=True,
    extra_files=("Cangjie5_TC.json",),
)

TURBO = Variant(
    name="turbo",
    description="Chatterbox Turbo, English (GPT-2 medium T3 without guidance, 2-step meanflow S3Gen, "
    "paralinguistic tags such as [laugh])",
    files={
        "t3": "t3_turbo_v1.safetensors",
        "s3gen": "s3gen_meanflow.safetensors",
        "ve": "ve.safetensors",
        "tokenizer": "vocab.json",
        "conds": "conds.pt",
    },
    tokenizer="gpt2",
    languages=("en",),
    generation=Generation(
        repetition_penalty=1.2,
        cfg_weight=0.0,
        exaggeration=0.0,
        min_p=0.0,
        top_p=0.95,
        top_k=1000,
        penalty_last=True,
        flow_steps=2,
        trailing_silence=3,
        ignored=("cfg_weight", "exaggeration", "min_p"),
    ),
    alignment_guard=False,
    extra_files=("merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"),
    repo="ResembleAI/chatterbox-turbo",
    voice=VoiceRules(min_seconds=5.0, t3_prompt_seconds=15.0, loudness_lufs=-27.0),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in (ENGLISH, MULTILINGUAL, TURBO)}


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


def variant_of_repo(repo_id: str) -> Variant | None:
    """The variant whose own repo `repo_id` is, when only one variant lives there (Turbo), else None."""
    owners = [v for v in VARIANTS.values() if v.repo == repo_id]
    return owners[0] if len(owners) == 1 else None


def variant_of_folder(present: set[str]) -> Variant | None:
    """The variant whose T3 file is among the file names `present` (English first), or None."""
    for variant in VARIANTS.values():
        if variant.file("t3") in present:
            return variant
    return None
