"""One HTTP request's life in the engine: admission, prompt checks, timeout, disconnect, abort, metrics.

Every path out of `RequestRunner.run` (finished, client gone, timed out, cancelled, engine error)
passes through one `finally` that aborts the engine request if it is still live, so its KV-cache
slot is freed at once and the server keeps serving. Timeouts and disconnects both work by aborting
the engine request: the engine then ends the stream itself with finish_reason "abort", and the
runner reports why.
"""
from __future__ import annotations

import asyncio
import inspect
import re
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from moe_serve.server.errors import APIError

_PARAM_IN_ERROR = re.compile(r"(?:SamplingParams|sampling|model|scheduler)\.(\w+)")


@dataclass
class RunState:
    """One HTTP request's run (its n choices are one engine request's completions): why it ended early
    (both False for a normal finish), its engine request ids, and the arrival time for the metrics."""

    disconnected: bool = False
    timed_out: bool = False
    failure_counted: bool = False  # its error status is in the metrics already (count it once)
    arrival: float = 0.0
    request_ids: list[str] = field(default_factory=list)  # the engine requests this HTTP request runs
    watcher: asyncio.Task | None = None  # the disconnect watcher, from admission to the response's end


def engine_error(exc: Exception, counted: bool = False) -> APIError:
    """The engine's ValueError ("SamplingParams.top_k must be ...") -> 400 naming the field."""
    msg = str(exc)
    m = _PARAM_IN_ERROR.search(msg)
    return APIError(400, msg, param=m.group(1) if m else None, counted=counted)


class RequestRunner:
    """Admits requests up to `max_pending_requests`, runs them through the engine, records metrics."""

    def __init__(self, engine, metrics, max_pending_requests: int, request_timeout_s: float,
                 queue_full_errors: tuple[type[Exception], ...] = (), dead_errors: tuple[type[Exception], ...] = ()):
        self.engine, self.metrics = engine, metrics
        self.max_pending = max_pending_requests
        self.timeout_s = request_timeout_s
        self.queue_full_errors, self.dead_errors = queue_full_errors, dead_errors
        self.in_flight = 0

    # -- admission ---------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or refuse it with 429 while the server already holds its limit."""
        if self.in_flight >= self.max_pending:
            self.metrics.observe_error(429)
            raise APIError(429, f"server busy: {self.in_flight} requests in flight, the limit is "
                                f"max_pending_requests={self.max_pending}; retry later",
                           type="rate_limit_error", code="queue_full", counted=True)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    # -- the engine stream -------------------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        """Abort without suspending, so it also completes inside a cancelled task or scope."""
        try:
            result = self.engine.abort(request_id)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:  # the request may already be gone; aborting twice is harmless
            pass

    async def _watch_disconnect(self, request: Request, state: RunState) -> None:
        """Wait for the client to go away (ASGI `http.disconnect`), then abort its engine requests."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                state.disconnected = True
                for rid in state.request_ids:
                    self._abort(rid)
                return

    def watch(self, request: Request | None, state: RunState) -> None:
        """Watch for the client's disconnect from now on (call it at admission, before the prompt is
        tokenized): a client gone before its request reaches the engine is never submitted."""
        if request is not None and state.watcher is None:
            state.watcher = asyncio.create_task(self._watch_disconnect(request, state))

    def unwatch(self, state: RunState) -> None:
        if state.watcher is not None:
            state.watcher.cancel()
            state.watcher = None

    async def check_connected(self, state: RunState, rounds: int = 4) -> None:
        """Raise the 499 for a client already gone, counted once (before any engine work).

        The event loop runs `rounds` rounds first: a FIN that is already in the socket takes one to be
        read (eof), one for the transport's connection_lost, one for the watcher to wake; without them a
        request whose client hung up at once could still be submitted and start its prefill."""
        for _ in range(rounds):
            if state.disconnected:
                break
            await asyncio.sleep(0)
        if state.disconnected:
            if not state.failure_counted:
                state.failure_counted = True
                self.metrics.observe_error(499)
            raise APIError(499, "client disconnected", code="client_closed", counted=True)

    async def _watch_timeout(self, request_id: str, state: RunState) -> None:
        await asyncio.sleep(self.timeout_s)
        state.timed_out = True
        self._abort(request_id)

    async def run(self, request: Request | None, request_id: str, prompt, params, state: RunState) -> AsyncIterator:
        """The engine's outputs for one request (all its n completions); raises APIError for a refused or
        failed request.

        The client's `http.disconnect` (see `watch`, started by the handler at admission; started here
        if it was not) aborts the request at once, even while it waits in the queue; a client already
        gone is answered 499 and its request never submitted. A streaming response is also cancelled by
        Starlette, which closes this generator: the `finally` aborts then. Each completion that finishes
        normally is recorded in the metrics as a request (as when every choice was an engine request).
        """
        state.arrival = state.arrival or time.monotonic()
        self.watch(request, state)
        await self.check_connected(state, rounds=0)
        state.request_ids.append(request_id)
        watchers = [asyncio.create_task(self._watch_timeout(request_id, state))]
        finished, stream = False, None
        first_token: dict[int, float] = {}  # completion index -> when its first token came
        last_token: dict[int, float] = {}
        try:
            try:
                stream = self.engine.generate(prompt, params, request_id)
                async for out in stream:
                    now = time.monotonic()
                    for c in out.outputs:
                        if c.delta_token_ids:
                            if c.index in last_token:
                                self.metrics.observe_itl(now - last_token[c.index])
                            first_token.setdefault(c.index, now)
                            last_token[c.index] = now
                        if c.finished() and c.finish_reason not in ("abort", "error"):
                            self._record(c, len(out.prompt_token_ids), state, first_token.get(c.index))
                    finished = out.finished
                    yield out
            except self.queue_full_errors as exc:
                self.metrics.observe_error(429)
                raise APIError(429, f"server busy: {exc}", type="rate_limit_error", code="queue_full", counted=True) from exc
            except self.dead_errors as exc:
                self.metrics.observe_error(503)
                raise APIError(503, f"engine unavailable: {exc}", type="service_unavailable", counted=True) from exc
            except ValueError as exc:
                self.metrics.observe_error(400)
                raise engine_error(exc, counted=True) from exc
        finally:
            for w in watchers:
                w.cancel()
            if not finished:
                self._abort(request_id)
            if stream is not None:
                await stream.aclose()  # the engine's own cleanup (its stream table) runs now, not at GC

    def stream_closed_early(self, state: RunState) -> None:
        """A streaming body closed before its end: Starlette cancels it when the client goes away,
        which may come before this runner's own disconnect watcher (and `failure`) sees it."""
        if not state.failure_counted:
            state.failure_counted = True
            self.metrics.observe_error(499)

    def _record(self, out, prompt_tokens: int, state: RunState, first_token: float | None) -> None:
        """One finished completion (a CompletionOutput) into the request metrics."""
        m = out.metrics
        ttft = m.time_to_first_token if m.time_to_first_token is not None else (
            None if first_token is None else first_token - state.arrival)
        self.metrics.observe_request(
            prompt_tokens=prompt_tokens, output_tokens=len(out.token_ids),
            e2e_s=time.monotonic() - state.arrival, ttft_s=ttft, tpot_s=m.time_per_output_token,
            finish_reason=out.finish_reason)

    def failure(self, out, state: RunState) -> APIError | None:
        """The error a finished-early completion (CompletionOutput) means (None for a normal finish); its
        status enters the metrics once per request, however often it is asked."""
        if out is None or out.finish_reason not in ("abort", "error"):
            return None
        if state.timed_out:
            err = APIError(504, f"request exceeded request_timeout_s={self.timeout_s}", type="timeout_error",
                           code="timeout", counted=True)
        elif state.disconnected:
            err = APIError(499, "client disconnected", code="client_closed", counted=True)
        elif out.finish_reason == "error":
            err = APIError(500, f"engine error: {out.error}", type="server_error", counted=True)
        else:
            err = APIError(503, "request aborted by the engine (shutting down?)", type="service_unavailable",
                           counted=True)
        if not state.failure_counted:
            state.failure_counted = True
            self.metrics.observe_error(err.status)
        return err
