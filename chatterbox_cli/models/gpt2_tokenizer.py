"""Chatterbox Turbo's text tokenizer: GPT-2's byte-level BPE plus the paralinguistic tags.

The checkpoint folder holds it in the Hugging Face layout: `vocab.json` and `merges.txt` (GPT-2's BPE),
`tokenizer_config.json` (its `added_tokens_decoder`: "<|endoftext|>" and the tags such as "[laugh]",
"[clear throat]" with their ids and matching flags), `added_tokens.json` (the tags' ids again) and
`special_tokens_map.json`. The reference (chatterbox-tts 0.1.7, tts_turbo.py) reads the folder with
transformers' AutoTokenizer and encodes the punc_norm'ed text with no start/stop tokens around it;
`Gpt2Tokenizer.encode` gives the same ids, read with the `tokenizers` package only.

Tags are matched as whole tokens anywhere in the text, case-sensitively ("[Laugh]" is four ordinary
tokens), also without spaces around them; the space before a tag becomes a token of its own, as in the
reference. "<|endoftext|>" typed in the text is encoded as that token, as the reference does.

A byte-level BPE represents every character: nothing becomes unknown or is dropped, so `speaks` is
True for every character and `encode_report` never names any. The reference likewise feeds emoji,
CJK and other rare characters to T3 as byte pieces; whether T3 pronounces them well is not a
question of the tokenizer (text.strip_unspeakable keeps them).

The ids of added tokens must follow the vocabulary without a gap (the official files: GPT-2's 50,257
tokens, then 19 tags, 50,276 in all). transformers renumbers gapped ids silently; we refuse them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.models.tokenizer import EncodedText
from chatterbox_cli.text import chunk_turbo_text, normalize_turbo

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# Every file of the official folder, vocab.json first (the file a variant names for the tokenizer role).
TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, ADDED_TOKENS_FILE, SPECIAL_TOKENS_FILE, CONFIG_FILE)
EOS = "<|endoftext|>"
# Small files in the official layout for tests (scripts/parity/gpt2_tokenizer.py): GPT-2's first 8,000
# merges (real GPT-2 ids) followed by "<|endoftext|>" and the 19 official tags, 8,276 ids in all.
TEST_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "testing" / "data" / "turbo"


def open_gpt2_tokenizer(path: str | Path) -> Gpt2Tokenizer:
    """Turbo's tokenizer from its folder, or from any file in it (e.g. its vocab.json)."""
    path = Path(path)
    return Gpt2Tokenizer(path if path.is_dir() else path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); download the checkpoint again") from e


def _added_tokens(folder: Path) -> dict[int, AddedToken]:
    """The added tokens by id: tokenizer_config.json's added_tokens_decoder (with their flags), and any
    other in added_tokens.json (as ordinary added tokens)."""
    config_path, added_path = folder / CONFIG_FILE, folder / ADDED_TOKENS_FILE
    if not config_path.exists() and not added_path.exists():
        raise CheckpointError(
            f"{folder} has neither {CONFIG_FILE} nor {ADDED_TOKENS_FILE}; is it Chatterbox Turbo's tokenizer?"
        )
    tokens: dict[int, AddedToken] = {}
    if config_path.exists():
        decoder = _read_json(config_path).get("added_tokens_decoder", {})
        for key, entry in decoder.items():
            tokens[int(key)] = AddedToken(
                entry["content"],
                single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", True),
                special=entry.get("special", False),
            )
    if added_path.exists():
        for content, token_id in _read_json(added_path).items():
            known = tokens.get(token_id)
            if known is None:
                tokens[token_id] = AddedToken(content, normalized=True, special=False)
            elif known.content != content:
                raise CheckpointError(
                    f"{added_path} names id {token_id} {content!r} but {config_path} {known.content!r}; "
                    "download the checkpoint again"
                )
    return tokens


class Gpt2Tokenizer:
    """The checkpoint's tokenizer (models.tokenizer.CheckpointTokenizer) and, Turbo speaking English
    only, also its English TextTokenizer."""

    language = "en"

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; download the checkpoint again")
        try:
            model = BPE.from_file(str(vocab_path), str(merges_path))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise CheckpointError(
                f"cannot read the BPE in {folder} ({e}); download the checkpoint again"
            ) from e
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        added = _added_tokens(folder)
        # Added one at a time in id order, each takes the next free id (or its own if in vocab.json).
        for token_id in sorted(added):
            token = added[token_id]
            if token.special:
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            given = tokenizer.token_to_id(token.content)
            if given != token_id:
                raise CheckpointError(
                    f"added token {token.content!r} of {folder} has id {token_id}, but added tokens must "
                    f"follow the vocabulary without a gap (it would get {given})"
                )
        self.tokenizer = tokenizer
        self.folder = folder
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise CheckpointError(f"{folder} lacks the token {EOS}; is it a GPT-2 tokenizer?")
        self.tags = {token.content: i for i, token in added.items() if not token.special}

    def for_language(self, language: str | None) -> Gpt2Tokenizer:
        if language not in (None, "en"):
            raise UsageError(
                f"Chatterbox Turbo speaks English only, not {language!r}; use --variant multilingual for it"
            )
        return self

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included: len(tokenizer) in the reference, 50,276 for the official
        files, the rows T3's text embedding needs."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no start/stop: the reference's `tokenizer(text).input_ids`."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_report(self, text: str) -> EncodedText:
        return EncodedText(self.encode(text), [], [])  # bytes cover every character

    def speaks(self, char: str) -> bool:
        return True  # see the module docstring

    def normalize(self, chunk: str) -> str:
        return normalize_turbo(chunk)

    def chunk(self, text: str, max_tokens: int) -> list[str]:
        count = lambda piece: len(self.encode(piece))  # noqa: E731
        return chunk_turbo_text(text, max_tokens, count_tokens=count, tags=list(self.tags))

    def text_to_tokens(self, text: str) -> torch.Tensor:
        """LongTensor [T] of encode(text): Turbo's T3 takes the text ids without start/stop tokens."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids, tags and "<|endoftext|>" included; bytes that are no UTF-8 become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)
