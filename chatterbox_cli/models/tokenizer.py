"""Text tokenizers: what they share (`TextTokenizer`, `open_tokenizer`) and the English one.

The English tokenizer is `tokenizer.json` (a 704-token BPE) read with the `tokenizers` package; the
multilingual one is in mtl_tokenizer.py. A checkpoint's tokenizer is bound to one language with
`for_language` before it encodes: the pipeline only sees a `TextTokenizer`.

Spaces are spelled as the special token "[SPACE]" before encoding (the BPE's whitespace pre-tokenizer
would otherwise drop them). Other whitespace (tabs, newlines) is dropped by that pre-tokenizer, and
characters outside the vocabulary become "[UNK]"; `encode_report` names both kinds so callers can warn.
Text normalisation (punctuation clean-up) is done before this, in chatterbox_cli.text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer

from chatterbox_cli.errors import CheckpointError, UsageError
from chatterbox_cli.text import chars_in_vocab, chunk_text, normalize
from chatterbox_cli.variants import TokenizerKind

START = "[START]"
STOP = "[STOP]"
UNK = "[UNK]"
SPACE = "[SPACE]"


@dataclass(frozen=True)
class EncodedText:
    ids: list[int]
    unknown_chars: list[str]  # became [UNK], in order of first appearance
    dropped_chars: list[str]  # produced no token at all (whitespace other than " ")


class TextTokenizer(Protocol):
    """A tokenizer bound to one language: what chunks are counted, checked and encoded with."""

    @property
    def language(self) -> str: ...  # its code, "en" for English

    def encode(self, text: str) -> list[int]: ...  # ids, no start/stop

    def encode_report(self, text: str) -> EncodedText: ...

    def speaks(self, char: str) -> bool: ...  # False: the character would become [UNK] or nothing

    def normalize(self, chunk: str) -> str: ...  # the reference's clean-up, right before encoding

    def chunk(self, text: str, max_tokens: int) -> list[str]: ...  # chunks of at most max_tokens ids


class CheckpointTokenizer(Protocol):
    """A checkpoint's tokenizer, as a loaded model holds it."""

    @property
    def vocab_size(self) -> int: ...

    def for_language(self, language: str | None) -> TextTokenizer: ...


def open_tokenizer(kind: TokenizerKind, path: Path) -> CheckpointTokenizer:
    """The tokenizer a variant names (variants.Variant.tokenizer), read from `path`."""
    if kind == "grapheme":
        from chatterbox_cli.models.mtl_tokenizer import MtlTokenizer

        return MtlTokenizer(path)
    if kind == "gpt2":
        from chatterbox_cli.models.gpt2_tokenizer import open_gpt2_tokenizer

        return open_gpt2_tokenizer(path)
    return EnTokenizer(path)


class EnTokenizer:
    language = "en"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise CheckpointError(f"cannot read tokenizer {path} ({e}); download the checkpoint again") from e
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (START, STOP, UNK, SPACE) if t not in vocab]
        if missing:
            raise CheckpointError(f"tokenizer {path} lacks the special tokens {missing}; is it Chatterbox's?")
        self.start_id = vocab[START]
        self.stop_id = vocab[STOP]
        self.unk_id = vocab[UNK]
        self._char_status: dict[str, str] = {}
        self._in_vocab = chars_in_vocab(vocab)

    def for_language(self, language: str | None) -> EnTokenizer:
        if language not in (None, "en"):
            raise UsageError(
                f"the English model does not speak {language!r}; use --variant multilingual for it"
            )
        return self

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no start/stop), like the reference EnTokenizer.encode."""
        return self.tokenizer.encode(text.replace(" ", SPACE)).ids

    def speaks(self, char: str) -> bool:
        return self._in_vocab(char)  # a BPE over characters: those that are tokens on their own

    def normalize(self, chunk: str) -> str:
        return normalize(chunk)

    def chunk(self, text: str, max_tokens: int) -> list[str]:
        return chunk_text(text, max_tokens, count_tokens=lambda piece: len(self.encode(piece)))

    def _status(self, char: str) -> str:
        """'ok', 'unknown' or 'dropped' for one character (cached)."""
        status = self._char_status.get(char)
        if status is None:
            ids = self.tokenizer.encode(char).ids
            status = "dropped" if not ids else ("unknown" if self.unk_id in ids else "ok")
            self._char_status[char] = status
        return status

    def encode_report(self, text: str) -> EncodedText:
        """Ids plus the characters the vocabulary cannot represent. A BPE over single characters maps a
        character to [UNK] or drops it regardless of its neighbours, so checking each distinct character
        on its own is exact."""
        unknown: list[str] = []
        dropped: list[str] = []
        for char in dict.fromkeys(text):
            if char == " ":
                continue
            status = self._status(char)
            if status == "unknown":
                unknown.append(char)
            elif status == "dropped":
                dropped.append(char)
        return EncodedText(self.encode(text), unknown, dropped)

    def text_to_tokens(self, text: str) -> torch.Tensor:
        """LongTensor [T] = start, encode(text), stop — what T3 decoding takes."""
        return torch.tensor([self.start_id, *self.encode(text), self.stop_id], dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids; [SPACE] becomes " ", start/stop/unk markers are removed."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        text = text.replace(" ", "").replace(SPACE, " ")
        for marker in (START, STOP, UNK):
            text = text.replace(marker, "")
        return text
