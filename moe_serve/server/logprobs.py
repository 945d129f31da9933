"""The engine's TokenLogprobs in OpenAI's two response shapes (completions' legacy one, chat's).

A token's text is its own bytes from the vocabulary (Tokenizer.token_bytes) as UTF-8, special tokens
kept: the tokenizer's decoding of that one token for a byte-level BPE, and for a SentencePiece-style
one with the leading space that decoding alone strips (" world", as the token reads in the text, so
completions' text_offset follows the text). A token that is part of a multi-byte character reads
U+FFFD, so chat's `bytes` are the token's bytes themselves, from which a client rebuilds the text exactly.
JSON has no -inf: a log-probability below LOGPROB_FLOOR is sent as the floor (vLLM's -9999.0).
"""
from __future__ import annotations

from moe_serve.engine.logprobs import TokenLogprob
from moe_serve.server import protocol as P

LOGPROB_FLOOR = -9999.0


def _value(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


class TokenTexts:
    """Token id -> its text, decoded once per id per request (and its bytes, with `bytes_of`)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache, self.bytes_cache = tokenizer, {}, {}

    def bytes_of(self, token_id: int) -> list[int]:
        found = self.bytes_cache.get(token_id)
        if found is None:
            found = self.bytes_cache[token_id] = list(self.tokenizer.token_bytes(token_id))
        return found

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = bytes(self.bytes_of(token_id)).decode("utf-8", errors="replace")
        return text


def delta_logprobs(out) -> list[TokenLogprob]:
    """The logprobs of the tokens new in this output (`delta_token_ids`); not read from the cumulative
    `logprobs`, which would copy the whole list at every streamed token."""
    return out.delta_logprobs or []


def completion_logprobs(lps: list[TokenLogprob], text: TokenTexts, offset: int) -> P.CompletionLogprobs:
    """`offset`: where the first of these tokens starts in the choice's text (streams carry it on)."""
    out = P.CompletionLogprobs()
    for lp in lps:
        token = text(lp.token_id)
        top = {text(i): _value(v) for i, v in lp.top}
        top[token] = _value(lp.logprob)  # the sampled token is always among them, as in vLLM
        out.tokens.append(token)
        out.token_logprobs.append(_value(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(lps: list[TokenLogprob], text: TokenTexts) -> P.ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict:
        token = text(token_id)
        return {"token": token, "logprob": _value(logprob), "bytes": text.bytes_of(token_id)}

    return P.ChatLogprobs(content=[
        P.ChatTokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[P.TopLogprob(**entry(i, v)) for i, v in lp.top])
        for lp in lps])
