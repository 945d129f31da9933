"""AsyncEngine: the LLMEngine stepped by a background thread, streamed to asyncio consumers.

`generate` is an async iterator of incremental RequestOutputs (the HTTP server's entry point). The
step thread is the only one that touches the scheduler and the model; requests and aborts reach it
through the engine's locked inbox, outputs come back through each request's asyncio.Queue via
`call_soon_threadsafe`. A request of n completions streams one output per change of one of them
(`out.outputs[0].index` says which; `finished` once all are), as vLLM streams n > 1. A consumer
that stops iterating (client gone, task cancelled) aborts its request, all its completions, which
frees their KV slots at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import traceback
import uuid
from typing import AsyncIterator

from moe_serve.config import EngineConfig
from moe_serve.engine.llm_engine import LLMEngine, Prompt
from moe_serve.engine.sampling_params import SamplingParams
from moe_serve.engine.sequence import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine's step loop has stopped (shutdown, or a failure it could not isolate)."""


class _Unsubmitted:
    """One generate call's request on its way to the engine: whether an abort came for it meanwhile."""

    __slots__ = ("aborted",)

    def __init__(self):
        self.aborted = False


class _Stream:
    """Where the step thread sends one generate call's outputs (guarded by the engine's _streams_lock)."""

    __slots__ = ("loop", "queue", "ended", "abandoned")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self.ended = False  # its last item (the finished output, or an error) has been sent
        # its consumer left before the end and the request is being aborted: the stream keeps the id
        # (outputs dropped) until the request's last output, so no new request of the id gets them
        self.abandoned = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        # request id -> its generate calls that have not submitted it yet (guarded by _streams_lock): an
        # abort then (the client gone while its prompt is tokenized) names an id the engine does not know
        # yet, so it is noted here and applied once the request is submitted
        self._unsubmitted: dict[str, list[_Unsubmitted]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self.dead: str | None = None  # why the step loop stopped, once it has
        self._thread = threading.Thread(target=self._loop, name="moe-serve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come, each carrying the completion that changed; the last
        one has `finished=True` (every completion has finished).

        Raises ValueError (bad input), QueueFullError (queue at scheduler.max_queue) or EngineDeadError.
        """
        if self.dead is not None:
            raise EngineDeadError(f"engine is not running: {self.dead}")
        rid = request_id if request_id is not None else uuid.uuid4().hex
        pending = _Unsubmitted()
        with self._streams_lock:
            self._unsubmitted.setdefault(rid, []).append(pending)
        try:
            if isinstance(prompt, str):  # tokenizing a long text takes seconds: off the event loop (it releases the GIL)
                seqs = await asyncio.to_thread(self.engine.make_request, prompt, params, rid)
            else:
                seqs = self.engine.make_request(prompt, params, rid)
            stream, rounds = _Stream(asyncio.get_running_loop(), asyncio.Queue()), 0
            while not self._register(rid, stream, busy_ok=rounds < 2):
                rounds += 1
                await asyncio.sleep(0 if rounds <= 2 else 0.002)
        except BaseException:
            self._submitted(rid, pending)
            raise
        finished = submitted = False
        try:
            try:
                self.engine.submit(seqs)
                submitted = True
            except BaseException as exc:
                self._submitted(rid, pending)
                if isinstance(exc, Exception) and self.dead is not None:  # shut down meanwhile: the engine is closed
                    raise EngineDeadError(f"engine is not running: {self.dead}") from exc
                raise
            if self._submitted(rid, pending):
                self.engine.abort(rid)  # aborted on its way: now that the engine knows it, its output says so
            self._wake.set()
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._streams_lock:
                if finished or stream.ended or not submitted:
                    del self._streams[rid]
                else:  # its last output is still to come: until then the id stays taken (see _Stream)
                    stream.abandoned = True
            if submitted and not finished:  # this call's request only: not a retry of its id on its way
                self.engine.abort(rid)
                self._wake.set()

    def _register(self, rid: str, stream: _Stream, busy_ok: bool) -> bool:
        """Take `rid` for `stream`; False (try again shortly) while an abandoned request still holds it, which
        it does until the next step, or, with busy_ok, a live stream does: one whose consumer has just left
        it (`break`) is closed by the event loop's next round (asyncio finalizes dropped generators)."""
        with self._streams_lock:
            held = self._streams.get(rid)
            if held is not None and not held.abandoned and not busy_ok:
                raise ValueError(f"request_id {rid!r} is already in use by a running request")
            if self.dead is not None:  # it stopped while the prompt was tokenized: nobody would end this stream
                raise EngineDeadError(f"engine is not running: {self.dead}")
            if held is None:
                self._streams[rid] = stream
            return held is None

    def abort(self, request_id: str) -> None:
        """Stop the request with this id: a live one at the next step, one whose generate has not submitted
        it yet (its prompt being tokenized) as soon as it is submitted; its stream ends with finish_reason
        "abort". Unknown or finished ids are ignored."""
        with self._streams_lock:
            for call in self._unsubmitted.get(request_id, ()):
                call.aborted = True
        self.engine.abort(request_id)
        self._wake.set()

    def _submitted(self, rid: str, pending: _Unsubmitted) -> bool:
        """Stop noting aborts for this generate call of `rid` (submitted, or failed); whether one came."""
        with self._streams_lock:
            calls = self._unsubmitted[rid]
            calls[:] = [c for c in calls if c is not pending]
            if not calls:
                del self._unsubmitted[rid]
        return pending.aborted

    def expert_load(self):
        return self.engine.expert_load()

    def _deliver(self, rid: str, item) -> None:
        last = isinstance(item, BaseException) or item.finished
        with self._streams_lock:
            stream = self._streams.get(rid)
            if stream is None:
                return
            stream.ended = stream.ended or last
            if stream.abandoned:
                if last:  # the abandoned request is gone: its id is free again
                    del self._streams[rid]
                return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            with self._streams_lock:
                if self._streams.get(rid) is stream:
                    if stream.ended:
                        del self._streams[rid]
                    else:
                        stream.abandoned = True
            self.engine.abort(rid)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except Exception as exc:  # noqa: BLE001 - a failure step() could not pin on one request
            self.dead = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            err = EngineDeadError(f"engine step failed: {self.dead}")
            with self._streams_lock:
                rids = list(self._streams)
            for rid in rids:
                self._deliver(rid, err)

    def shutdown(self) -> None:
        """Stop the step loop, end the open streams with an abort, and release the model. With worker ranks a step
        in flight gets parallel.shutdown_grace_s to finish; then the ranks are stopped, which fails it."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        grace = getattr(self.engine.model, "shutdown_grace_s", None)  # worker ranks: parallel.shutdown_grace_s
        self._thread.join(grace)
        if self._thread.is_alive():  # its step waits on a hung rank (for heartbeat_timeout_s, or step_timeout_s)
            self.engine.model.interrupt(f"the engine shut down while a step was in flight (parallel.shutdown_grace_s"
                                        f"={grace:g} s)")
            self._thread.join()
        self.dead = self.dead or "shut down"
        with self._streams_lock:
            rids = list(self._streams)
        for rid in rids:
            self._deliver(rid, EngineDeadError("engine shut down"))
        self.engine.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.shutdown()
