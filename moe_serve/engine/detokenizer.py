"""Incremental detokenization and stop strings, for streaming.

Decoding a growing token list from scratch every step is quadratic, and decoding one token at a time
breaks multi-byte characters and the spacing rules of some tokenizers. As vLLM does, each step
decodes a short window twice (with and without the new tokens) and emits the difference, holding
back text that ends in an incomplete UTF-8 character (U+FFFD).

Stop strings: the text is cut before the first stop string (the stop string is not returned). While
streaming, the last `len(longest stop) - 1` characters are held back, so the text already sent never
has to be taken back and the deltas always concatenate to the final text.
"""
from __future__ import annotations

from moe_serve.engine.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5  # prompt tokens decoded along with the output, for correct leading spaces


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index in `text` of the earliest stop string that begins at or after `start`, or None."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # the output text decoded so far (cut at a stop string once one is found)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False  # a stop string was found: the text is final

    def _decode_new(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def push(self, token_id: int) -> None:
        """Append a token without decoding (no stop strings, nobody reading yet): decoded at the next add."""
        self.ids.append(token_id)

    def add(self, token_id: int | None, final: bool = False, find_stops: bool = True) -> bool:
        """Append a token (None: only flush); True when a stop string was found (text cut before it).
        find_stops=False (before SamplingParams.min_tokens): the new text is not searched."""
        if self.stopped:
            return True
        if token_id is not None:
            self.ids.append(token_id)
        new = self._decode_new(final)
        if not new:
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += new
        cut = find_stop(self.text, self.stops, start) if self.stops and find_stops else None
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return True
        return False

    def visible(self, finished: bool) -> str:
        """The text that may be shown now: all of it once finished, else without the held-back tail."""
        if finished or self.hold == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
