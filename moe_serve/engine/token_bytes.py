"""A token's own bytes (OpenAI's logprobs `bytes`), also when they are not a whole UTF-8 character.

Decoding one token of a byte-level BPE that holds part of a multi-byte character gives U+FFFD: its
bytes are lost. They are still in the vocabulary: a byte-level token is spelled in GPT-2's alphabet
of 256 printable characters, one per byte, so mapping its characters back gives the bytes exactly.
SentencePiece-style vocabularies (Llama's, Mixtral's) spell such bytes `<0xE2>` (byte fallback) and
a space as "▁", which the decoder replaces; decoding one such token also strips its leading space,
which its bytes keep (" world", as it reads inside a text). Special and added tokens are their text.
For any other token this returns None and the caller uses its decoded text.
"""
from __future__ import annotations

import json
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_char() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, reversed: printable bytes stand for themselves, the other 68 for
    the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


BYTE_OF_CHAR = _byte_of_char()


def _decoders(tokenizer_json: dict) -> list[dict]:
    dec = tokenizer_json.get("decoder") or {}
    parts = (dec.get("decoders") or []) if dec.get("type") == "Sequence" else [dec]
    return [p for p in parts if isinstance(p, dict)]


def _replacements(decoders: list[dict]) -> list[tuple[str, str]]:
    """The plain-string replacements the decoder makes ("▁" -> " "), in its order."""
    out = []
    for d in decoders:
        if d.get("type") == "Replace" and isinstance((d.get("pattern") or {}).get("String"), str):
            out.append((d["pattern"]["String"], d.get("content", "")))
        elif d.get("type") == "Metaspace":
            out.append((d.get("replacement") or "\u2581", " "))
    return out


class TokenBytes:
    """token id -> its bytes, for a `tokenizers.Tokenizer` (a transformers fast tokenizer's backend)."""

    def __init__(self, fast_tokenizer):
        self.tok = fast_tokenizer
        # the decoder's own JSON only: the whole tokenizer's (to_str) holds the vocabulary, 0.2-0.5 s to
        # serialize and parse for 150k tokens, and this runs on the server's event loop
        decoder = fast_tokenizer.decoder
        decoders = _decoders({"decoder": json.loads(decoder.__getstate__()) if decoder is not None else {}})
        kinds = {d.get("type") for d in decoders}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.replacements = _replacements(decoders)
        self.added = {i: t.content for i, t in fast_tokenizer.get_added_tokens_decoder().items()}

    def __call__(self, token_id: int) -> bytes | None:
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return None
        if self.byte_level:
            try:
                return bytes(BYTE_OF_CHAR[c] for c in piece)
            except KeyError:  # not in the byte alphabet: not a byte-level spelling after all
                return None
        if self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if self.replacements:
            for old, new in self.replacements:
                piece = piece.replace(old, new)
            return piece.encode("utf-8")
        return None
