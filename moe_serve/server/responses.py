"""Engine outputs -> OpenAI response bodies and stream chunks, for completions and chat.

A builder serves one HTTP request: `chunks(i, out, first)` turns choice i's newest output (the
engine's CompletionOutput of index i) into the stream chunks it calls for (each carrying `index` i),
`full(prompt_tokens, finals)` the finished choices into the whole response. Logprobs, when asked for, ride along in each shape (see server/logprobs.py).
"""
from __future__ import annotations

from moe_serve.server import protocol as P
from moe_serve.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs, delta_logprobs


def usage(prompt_tokens: int, finals: list) -> P.Usage:
    """The prompt counted once, the completions of every choice summed (as OpenAI counts n > 1)."""
    p = prompt_tokens if finals else 0
    c = sum(len(out.token_ids) for out in finals)
    return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class CompletionBuilder:
    chunk_object = "text_completion"

    def __init__(self, rid: str, model: str, echo: str, logprobs: bool, tokenizer):
        self.rid, self.model, self.echo, self.logprobs = rid, model, echo, logprobs
        self.texts = TokenTexts(tokenizer)
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token (streams)

    def chunks(self, i: int, out, first: bool):
        text = (self.echo if first else "") + out.delta_text
        lps = None
        if self.logprobs and out.delta_token_ids:
            start = self.offsets.get(i, len(self.echo))
            lps = completion_logprobs(delta_logprobs(out), self.texts, start)
            self.offsets[i] = start + sum(len(t) for t in lps.tokens)
        if text or out.finished() or lps is not None:
            yield P.CompletionResponse(id=self.rid, model=self.model, choices=[P.CompletionChoice(
                index=i, text=text, logprobs=lps, finish_reason=out.finish_reason)])

    def full(self, prompt_tokens: int, finals: list) -> P.CompletionResponse:
        return P.CompletionResponse(id=self.rid, model=self.model, usage=usage(prompt_tokens, finals), choices=[
            P.CompletionChoice(index=i, text=self.echo + out.text, finish_reason=out.finish_reason,
                               logprobs=completion_logprobs(out.logprobs, self.texts, len(self.echo))
                               if self.logprobs else None)
            for i, out in enumerate(finals)])


class ChatBuilder:
    chunk_object = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, logprobs: bool, tokenizer):
        self.rid, self.model, self.logprobs = rid, model, logprobs
        self.texts = TokenTexts(tokenizer)

    def _chunk(self, i: int, delta: P.DeltaMessage, **kw) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(id=self.rid, model=self.model, choices=[P.ChatChunkChoice(index=i, delta=delta, **kw)])

    def chunks(self, i: int, out, first: bool):
        if first:
            yield self._chunk(i, P.DeltaMessage(role="assistant", content=""))
        lps = chat_logprobs(delta_logprobs(out), self.texts) if self.logprobs and out.delta_token_ids else None
        if out.delta_text or lps is not None:
            yield self._chunk(i, P.DeltaMessage(content=out.delta_text), logprobs=lps)
        if out.finished():
            yield self._chunk(i, P.DeltaMessage(), finish_reason=out.finish_reason)

    def full(self, prompt_tokens: int, finals: list) -> P.ChatCompletionResponse:
        return P.ChatCompletionResponse(id=self.rid, model=self.model, usage=usage(prompt_tokens, finals), choices=[
            P.ChatChoice(index=i, message=P.ResponseMessage(content=out.text), finish_reason=out.finish_reason,
                         logprobs=chat_logprobs(out.logprobs, self.texts) if self.logprobs else None)
            for i, out in enumerate(finals)])
