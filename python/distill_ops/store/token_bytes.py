"""Token ids from token bytes: the student tokenizer's vocabulary as a byte-string lookup.

API and inference-server teachers name tokens by their text or bytes; the store needs the
student tokenizer's ids. A token maps by its bytes exactly (``bytes`` where the server gave
them, else the string's UTF-8, with ``<0xNN>`` byte tokens and ``token_id:<id>`` forms
understood), never by re-tokenising text. Byte-level BPE vocabularies (GPT-2 style, where
each byte has a printable stand-in) and SentencePiece ones (``▁`` for a space, ``<0xNN>``
byte fallback) are both read from a ``tokenizers`` object.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TOKEN_ID = "token_id:"


class ByteVocab:
    """Exact token -> id maps of a tokenizer: by the token's bytes, and by its text where the
    bytes are valid UTF-8 (the same thing, looked up without building a bytes object)."""

    def __init__(self, token_bytes: Sequence[bytes | None]) -> None:
        self.size = len(token_bytes)
        self.token_bytes = list(token_bytes)
        self._native = None
        self.by_bytes: dict[bytes, int] = {}
        self.by_text: dict[str, int] = {}
        for i, b in enumerate(token_bytes):
            if b is None or b in self.by_bytes:
                continue  # special tokens (no bytes), and later duplicates
            self.by_bytes[b] = i
            try:
                self.by_text.setdefault(b.decode("utf-8"), i)
            except UnicodeDecodeError:
                pass

    @property
    def native(self) -> Any:
        """The same map in C++ (distill_ops._C.TokenMap), for the native scanner."""
        if self._native is None:
            from ..backends.extension import native

            self._native = native().TokenMap(
                [None if b is None or self.by_bytes.get(b) != i else b
                 for i, b in enumerate(self.token_bytes)])
        return self._native

    def lookup(self, token: str | None, raw: list[int] | None) -> int | None:
        """The id of a token given as text and/or its bytes; None if the vocabulary has none.
        Text containing U+FFFD may stand for any partial UTF-8 sequence: only the bytes say."""
        if token is not None and token.startswith(_TOKEN_ID):
            try:
                i = int(token[len(_TOKEN_ID):])
            except ValueError:
                return None
            return i if 0 <= i < self.size else None
        if token is not None and "\ufffd" not in token:
            i = self.by_text.get(token)
            if i is not None:
                return i
        if raw is not None:
            return self.by_bytes.get(bytes(raw))
        return None


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE vocabularies (GPT-2 style)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_vocab(tokenizer: Any) -> ByteVocab:
    """A ByteVocab from a Hugging Face tokenizer: a directory (tokenizer.json), a
    `tokenizers.Tokenizer`, or a `transformers` tokenizer. Byte-level BPE vocabularies map
    through their byte table; SentencePiece-style ones map "\u2581" to a space and
    ``<0xNN>`` to a byte; special tokens have no bytes."""
    tok = tokenizer
    if isinstance(tok, (str, os.PathLike)):
        from tokenizers import Tokenizer

        path = Path(tok)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    backend = getattr(tok, "backend_tokenizer", tok)  # transformers fast tokenizer
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special} \
        if hasattr(backend, "get_added_tokens_decoder") else set()
    size = max(vocab.values()) + 1 if vocab else 0
    byte_level = _is_byte_level(backend)
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = [None] * size
    for text, i in vocab.items():
        if text in specials:
            continue
        if byte_level:
            try:
                out[i] = bytes(inverse[c] for c in text)
            except KeyError:  # an added non-byte-level token: its text is its bytes
                out[i] = text.encode("utf-8")
            continue
        m = _BYTE_TOKEN.match(text)
        out[i] = bytes([int(m.group(1), 16)]) if m else text.replace("\u2581", " ").encode()
    return ByteVocab(out)


def _is_byte_level(backend: Any) -> bool:
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a tokenizer without a JSON form: guess from its vocabulary
        return False
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return "ByteLevel" in text


# ----------------------------------------------------------------------------------------
# Reading the files


__all__ = ["ByteVocab", "tokenizer_vocab"]
