"""/v1/completions and /v1/chat/completions: request -> prompt ids + SamplingParams -> response or SSE.

Prompts are tokenized here (not in the engine) so that a prompt over the context, or a token id
outside the vocabulary, is a 400 naming `prompt`/`messages`/`max_tokens` before any engine work.
A request's `n` choices are the engine request's n completions (SamplingParams.n: one request id, queued
together, aborted together; seeds per `completion_seed`). Streams are server-sent events ending in `data: [DONE]`; with `stream_options.include_usage` the
last chunk before it carries `usage` (and empty `choices`), as OpenAI sends it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from moe_serve.engine.sampling_params import SamplingParams
from moe_serve.server import protocol as P
from moe_serve.server.chat import render_chat, template_writes_special_tokens
from moe_serve.server.errors import APIError, error_body
from moe_serve.server.lifecycle import RequestRunner, RunState, engine_error
from moe_serve.server.responses import ChatBuilder, CompletionBuilder, usage


@dataclass
class ModelInfo:
    """What the handlers need to know about the served model."""

    name: str
    tokenizer: object  # moe_serve.engine.tokenizer.Tokenizer: encode / decode
    max_model_len: int
    vocab_size: int
    chat_template: str
    template_vars: dict
    sampling_defaults: dict  # SamplingParams fields from generation_config.json for what a request leaves unset


def check_prompt(ids: list[int], max_tokens: int | None, info: ModelInfo, field: str) -> int:
    """Validate prompt length against the context; return the output limit: max_tokens, else the
    checkpoint's max_new_tokens cut to what fits (as vLLM), else what fits."""
    n, ctx = len(ids), info.max_model_len
    if n == 0:
        raise APIError(400, f"{field}: the prompt is empty after tokenization", param=field)
    bad = [t for t in ids if t >= info.vocab_size]
    if bad:
        raise APIError(400, f"{field}: token ids must be < vocab size {info.vocab_size}, got {bad[:5]}", param=field)
    if n >= ctx:
        raise APIError(400, f"{field}: the prompt is {n} tokens; the model's context is {ctx} tokens "
                            f"(max_model_len), which must hold the prompt and at least 1 output token",
                       param=field, code="context_length_exceeded")
    if max_tokens is not None and n + max_tokens > ctx:
        raise APIError(400, f"max_tokens: {max_tokens} output tokens + {n} prompt tokens exceed the model's "
                            f"context of {ctx} tokens (max_model_len)", param="max_tokens",
                       code="context_length_exceeded")
    if max_tokens is not None:
        return max_tokens
    return min(ctx - n, info.sampling_defaults.get("max_tokens", ctx - n))


# a request's null takes the model's default (generation_config.json), then SamplingParams'
DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
PENALTIES = ("presence_penalty", "frequency_penalty")  # null: SamplingParams' (none)


def sampling_params(req: P.SamplingFields, max_tokens: int, defaults: dict,
                    logprobs: int | None = None) -> SamplingParams:
    """The request's values win; a field it leaves unset takes `defaults` (the checkpoint's
    generation_config.json, see ModelInfo.sampling_defaults), else SamplingParams' own default."""
    chosen = {name: defaults[name] for name in DEFAULTED_FIELDS if name in defaults}
    chosen.update({name: getattr(req, name) for name in DEFAULTED_FIELDS if getattr(req, name) is not None})
    chosen.update({name: getattr(req, name) for name in PENALTIES if getattr(req, name) is not None})
    try:
        return SamplingParams(**chosen, n=req.n, max_tokens=max_tokens, seed=req.seed, stop=req.stop,
                              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              logit_bias=req.logit_bias, min_tokens=req.min_tokens)
    except ValueError as exc:
        raise engine_error(exc) from exc


def sse(obj, exclude: set[str] | None = None) -> str:
    data = obj.model_dump_json(exclude=exclude) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


class Handlers:
    def __init__(self, runner: RequestRunner, info: ModelInfo):
        self.runner, self.info = runner, info

    # -- completions --------------------------------------------------------------------------
    def completion_prompt(self, req: P.CompletionRequest) -> tuple[list[int], str | None]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            try:
                return self.info.tokenizer.encode(prompt), prompt
            except ValueError as exc:
                raise APIError(400, str(exc), param="prompt") from exc
        return list(prompt), None

    async def completions(self, req: P.CompletionRequest, request: Request):
        return await self._serve(request, req, self._prepare_completion)

    async def _prepare_completion(self, req: P.CompletionRequest):
        ids, text = await run_in_threadpool(self.completion_prompt, req)  # a long prompt takes seconds
        limit = check_prompt(ids, req.max_tokens, self.info, "prompt")
        params = sampling_params(req, limit, self.info.sampling_defaults, req.logprobs)
        echo = (text if text is not None else self.info.tokenizer.decode(ids)) if req.echo else ""
        rid = P.new_id("cmpl")
        return rid, ids, params, CompletionBuilder(rid, self.info.name, echo, req.logprobs is not None,
                                                   self.info.tokenizer)

    # -- chat ---------------------------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest, request: Request):
        return await self._serve(request, req, self._prepare_chat)

    async def _prepare_chat(self, req: P.ChatCompletionRequest):
        messages = [m.model_dump() for m in req.messages]
        try:  # in a worker thread, as for completions: the event loop keeps streaming meanwhile
            text = render_chat(messages, self.info.chat_template, self.info.template_vars, req.add_generation_prompt)
            ids = await run_in_threadpool(self.info.tokenizer.encode, text,
                                          not template_writes_special_tokens(self.info.chat_template))
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        try:
            limit = check_prompt(ids, req.output_limit, self.info, "messages")
        except APIError as exc:
            if exc.param == "max_tokens":
                exc.param, exc.message = field, exc.message.replace("max_tokens", field, 1)
            raise
        params = sampling_params(req, limit, self.info.sampling_defaults, req.num_logprobs)
        rid = P.new_id("chatcmpl")
        return rid, ids, params, ChatBuilder(rid, self.info.name, req.num_logprobs is not None, self.info.tokenizer)

    # -- shared -------------------------------------------------------------------------------
    async def _serve(self, request: Request, req, prepare):
        """Admit the request and watch for its client's disconnect from now on, prepare it (tokenize,
        check), run it; a client gone before its request reaches the engine is never submitted."""
        runner, state = self.runner, RunState(arrival=time.monotonic())
        runner.admit()
        handed_over = False  # to a streaming body, which releases the admission when it ends
        try:
            runner.watch(request, state)
            rid, ids, params, builder = await prepare(req)
            await runner.check_connected(state)
            response = await self._respond(request, state, rid, ids, params, req, builder)
            handed_over = isinstance(response, StreamingResponse)
            return response
        finally:
            if not handed_over:
                runner.unwatch(state)
                runner.release()

    def _failure(self, finals: dict, state: RunState) -> APIError | None:
        return next((err for out in finals.values() if (err := self.runner.failure(out, state)) is not None), None)

    async def _choices(self, request: Request, rid: str, ids: list[int], params: SamplingParams, state: RunState):
        """(choice index, CompletionOutput) as the engine produces them; closing it aborts the request."""
        run = self.runner.run(request, rid, ids, params, state)
        try:
            async for out in run:
                for completion in out.outputs:
                    yield completion.index, completion
        finally:
            await run.aclose()

    async def _respond(self, request: Request, state: RunState, rid: str, ids: list[int], params: SamplingParams,
                       req, builder):
        it = self._choices(request, rid, ids, params, state)
        try:
            first = await it.__anext__()  # engine refusals (queue full, bad value) become real 4xx here
        except StopAsyncIteration:
            first = None
        if req.stream and first is not None and self.runner.failure(first[1], state) is None:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(it, first, rid, len(ids), state, builder, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = {}
        try:
            if first is not None:
                finals[first[0]] = first[1]
                if self._failure(finals, state) is None:
                    async for i, out in it:
                        finals[i] = out
        finally:
            await it.aclose()  # a failed choice ends the others
        err = self._failure(finals, state)
        if err is not None:
            raise err
        if len(finals) < params.n or not all(out.finished() for out in finals.values()):
            raise APIError(500, "engine ended the request without output", type="server_error")
        return builder.full(len(ids), [finals[i] for i in range(params.n)])

    async def _stream(self, it, first, rid, prompt_tokens: int, state, builder,
                      include_usage: bool) -> AsyncIterator[str]:
        """SSE body from a started run; an error after the headers went out is sent as an event."""
        runner, finals, ended = self.runner, {}, False
        # as OpenAI: chunks carry "usage" (null but on the last one) only when include_usage asked for it
        exclude = None if include_usage else {"usage"}
        try:
            item = first
            while item is not None:
                i, out = item
                for chunk in builder.chunks(i, out, i not in finals):
                    yield sse(chunk, exclude)
                finals[i] = out
                item = await anext(it, None)
            err = self._failure(finals, state)
            if err is not None:
                yield sse(error_body(err.message, err.type, err.param, err.code))
            elif include_usage and finals:
                yield sse({"id": rid, "object": builder.chunk_object, "created": int(time.time()),
                           "model": self.info.name, "choices": [],
                           "usage": usage(prompt_tokens, [finals[i] for i in sorted(finals)]).model_dump()})
            yield "data: [DONE]\n\n"
            ended = True
        except APIError as err:
            yield sse(error_body(err.message, err.type, err.param, err.code))
            yield "data: [DONE]\n\n"
            ended = True
        finally:
            if not ended:  # closed by Starlette: the client went away
                runner.stream_closed_early(state)
            await it.aclose()  # aborts the engine requests still live (client gone)
            runner.unwatch(state)
            runner.release()
