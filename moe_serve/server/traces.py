"""Routing-trace recording switched on and off on a live server (POST /v1/traces/start|stop|dump).

`LiveTraceHook` sits in the model's hook chain for the server's lifetime and forwards to a
`TraceRecorder` only while recording. The engine steps in its own thread, so a switch takes effect
at the next step boundary: `begin_step` decides, under a lock, whether this whole step is recorded,
and a start or stop in the middle of a step never leaves a recorder with half a step. When off,
`route` returns at once (no tensor is copied).

A dump (POST /v1/traces/dump) is stopped when its client disconnects: the client would never learn
the file's name (the server picks one when the request gives none), so the write stops at its next
piece and the partial file is removed; nothing appears at the path. A download (GET) is written to
an unnamed temporary file and streamed from it, so the server holds the trace's arrays once, not
also the archive's bytes; it too stops building when its client disconnects.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from moe_serve.models.hooks import HookChain, RouterHooks
from moe_serve.server.errors import APIError
from moe_serve.tracing.recorder import TraceRecorder


_NAME_MAX = 255  # bytes in one file name on Linux file systems
CHUNK = 1 << 20  # bytes of a downloaded trace read and sent at a time


class DumpCancelled(Exception):
    """The dump's client went away: the write stopped and its partial file is removed."""


class _StoppableFile:
    """A file whose next write raises DumpCancelled once `stop` is set. np.savez writes an array in
    pieces of at most 16 MiB, so a dump stops within one piece of being told."""

    def __init__(self, f, stop: threading.Event | None):
        self._f, self._stop = f, stop

    def write(self, data):
        if self._stop is not None and self._stop.is_set():
            raise DumpCancelled()
        return self._f.write(data)

    def __getattr__(self, name):  # tell, seek, flush, name: the file's own (zipfile uses them)
        return getattr(self._f, name)


def _plain_npz_name(name: str) -> bool:
    """A file name open() accepts under trace_dir: no directory part, not hidden, no NUL, not too long
    (those last two would fail inside open() as a 500 instead of a 400)."""
    return (Path(name).name == name and not name.startswith(".") and name.endswith(".npz") and "\x00" not in name
            and len(name.encode("utf-8", "surrogatepass")) <= _NAME_MAX)


class LiveTraceHook(RouterHooks):
    active = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, meta: dict):
        self.shape, self.meta = (num_layers, num_experts, top_k), meta
        self.lock = threading.Lock()
        self.recorder: TraceRecorder | None = None  # the current (or last) recording
        self.recording = False
        self._step: TraceRecorder | None = None  # the recorder of the step in progress, if recorded

    @property
    def reads_ids_only(self) -> bool:
        """Idle, or recording ids and weights only: the compiled decode step may run (models/compiled.py)."""
        recorder = self.recorder
        return not self.recording or recorder is None or recorder.reads_ids_only

    def start(self, record_hidden: bool = False) -> None:
        with self.lock:
            self.recorder = TraceRecorder(*self.shape, record_hidden=record_hidden, meta=self.meta)
            self.recording = True

    def stop(self) -> None:
        with self.lock:
            self.recording = False

    def counts(self) -> tuple[int, int]:
        """(sequences, tokens) recorded so far; (0, 0) if recording never started."""
        with self.lock:
            return (0, 0) if self.recorder is None else self.recorder.counts()

    def snapshot(self):
        """The RoutingTrace recorded so far (None if recording never started), built outside the lock."""
        with self.lock:
            recorded = None if self.recorder is None else self.recorder.copy()
        return None if recorded is None else recorded.to_trace()

    def begin_step(self, batch):
        with self.lock:
            self._step = self.recorder if self.recording else None
            if self._step is not None:
                self._step.begin_step(batch)

    def route(self, moe_layer, hidden, expert_ids, weights):
        step = self._step
        if step is not None:
            if hidden is None and step.record_hidden:
                # a compiled step chosen before a start with record_hidden: that fresh recording
                # (no rows yet, so no gap in any sequence) begins at the next step
                self._step = None
                return None
            step.route(moe_layer, hidden, expert_ids, weights)
        return None

    def end_step(self, batch):
        with self.lock:
            if self._step is not None:
                self._step.end_step(batch)
            self._step = None

    def fork(self, parent, children, rows=None):
        with self.lock:
            if self.recording and self.recorder is not None:
                self.recorder.fork(parent, children, rows)


class TraceControl:
    """The endpoints' logic: install the hook once, then start / stop / dump."""

    def __init__(self, bridge, trace_dir: str):
        self.trace_dir = Path(trace_dir)
        spec, model = bridge.spec, bridge.model
        # the trace files the engine itself uses: a dump under one's name replaced the replayed trace, or
        # was replaced by the recording the engine writes at shutdown
        tc = getattr(getattr(getattr(bridge, "core", None), "config", None), "trace", None)
        self.engine_files = {Path(p).resolve(): field for field, p in
                             (("trace.replay_trace", getattr(tc, "replay_trace", None)),
                              ("trace.record_trace", getattr(tc, "record_trace", None))) if p}
        self.hook = LiveTraceHook(spec.num_moe_layers, spec.num_experts, spec.top_k,
                                  meta={"family": spec.family, "source": "moe-serve server"})
        # Installed before the server takes requests, so no step is in flight while hooks change.
        # A model without router hooks in this process (e.g. experts on worker ranks) cannot record.
        self.unavailable = None
        if isinstance(getattr(model, "hooks", None), RouterHooks):
            model.hooks = HookChain([model.hooks, self.hook])
        else:
            self.unavailable = f"this engine's model ({type(model).__name__}) has no router hooks in the server process"

    def _check(self) -> None:
        if self.unavailable:
            raise APIError(501, f"routing-trace recording is not available: {self.unavailable}",
                           type="not_implemented", code="traces_unavailable")

    def status(self) -> dict:
        sequences, tokens = self.hook.counts()  # not the whole trace: its lock holds up the engine's steps
        return {"recording": self.hook.recording, "sequences": sequences, "tokens": tokens}

    def start(self, record_hidden: bool = False) -> dict:
        self._check()
        self.hook.start(record_hidden)
        return self.status()

    def stop(self) -> dict:
        self.hook.stop()
        return self.status()

    def _recorded(self):
        trace = self.hook.snapshot()
        if trace is None:
            raise APIError(409, "no routing trace: POST /v1/traces/start first", code="not_recording")
        return trace

    def download(self, stop: threading.Event | None = None):
        """(an unnamed temporary file holding the recorded trace as .npz, at its start; its size). The
        trace's arrays live only while it is written; the file goes when closed (under trace_dir when
        writable, else the system's temporary directory; nothing is left on either disk). Once `stop`
        is set the write ends (DumpCancelled) and the file is closed."""
        self._check()
        trace = self._recorded()
        try:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            f = tempfile.TemporaryFile(dir=self.trace_dir)
        except OSError:
            f = tempfile.TemporaryFile()
        try:
            trace.save(_StoppableFile(f, stop))
            del trace
            size = f.tell()
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f, size

    def dump(self, name: str | None, stop: threading.Event | None = None) -> dict:
        """Write what was recorded to `trace_dir/name` (.npz); name is a plain file name. Once `stop` is
        set the write ends (DumpCancelled) and no file is left, partial or whole."""
        self._check()
        if name is not None and not _plain_npz_name(name):
            raise APIError(400, f"path: must be a plain file name ending in .npz, at most {_NAME_MAX} bytes (written "
                                f"under the server's trace_dir), got {name!r}", param="path")  # whatever the state
        trace = self._recorded()
        if name is None:
            name = time.strftime("trace-%Y%m%d-%H%M%S") + f"-{time.monotonic_ns() % 10**6:06d}.npz"
        path = (self.trace_dir / name).resolve()
        if path.is_dir():
            raise APIError(409, f"path: {name!r} is a directory under the server's trace_dir, not a file",
                           param="path", code="path_is_directory")
        if path in self.engine_files:
            raise APIError(409, f"path: {name!r} under the server's trace_dir is its {self.engine_files[path]} "
                                f"({path}): the dump would replace it; name another file", param="path",
                           code="path_in_use")
        # written beside the target and renamed over it, as RoutingTrace.save does, but through a file
        # that can be stopped: a cut or failed write leaves neither a partial file nor a truncated target
        part = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "xb") as f:
                trace.save(_StoppableFile(f, stop))
            os.replace(part, path)
        except OSError as e:  # the server's trace_dir: a file, not writable, full
            raise APIError(500, f"cannot write {name!r} under server.trace_dir {self.trace_dir}: {e.strerror or e}",
                           type="server_error", code="trace_dir_unwritable") from None
        finally:
            with contextlib.suppress(OSError):  # e.g. trace_dir under a file: the error above says so
                part.unlink(missing_ok=True)
        # the file's counts: the recording goes on (or restarts) while a big trace is written, so the
        # status once written described more, or other, tokens than the file holds
        return {"recording": self.hook.recording, "sequences": trace.num_sequences, "tokens": trace.num_tokens,
                "path": str(path)}


async def until_done_or_disconnected(request, task: asyncio.Future) -> bool:
    """Wait for `task`; True when it finished, False when the client disconnected first (ASGI
    `http.disconnect`, which comes once the request's body has been read)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return task in done


async def _while_connected(request, work, *args, what: str, drop=lambda result: None):
    """`work(*args, stop)` in a worker thread (a big trace takes seconds; the event loop goes on
    serving), stopped if the client disconnects first: then the request is a 499, and a result that
    came anyway (it finished in the instant between the disconnect and the stop) goes to `drop`."""
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(work, *args, stop))
    if await until_done_or_disconnected(request, task):
        return task.result()
    stop.set()
    try:  # the thread stops at its next write
        drop(await task)
    except (DumpCancelled, APIError):  # stopped, or failed on its own meanwhile: the client is gone either way
        pass
    raise APIError(499, f"client disconnected: the trace {what} was stopped", code="client_closed")


async def dump_while_connected(traces: TraceControl, request, name: str | None) -> dict:
    """The dump endpoint: a cut dump removes its partial file (a whole one, finished as the client
    left, is kept)."""
    return await _while_connected(request, traces.dump, name, what="dump (its partial file removed)")


async def download_while_connected(traces: TraceControl, request):
    """The download endpoint's (temporary file, size): a cut build closes (so deletes) its file."""
    return await _while_connected(request, traces.download, what="download",
                                  drop=lambda built: built[0].close())


async def stream_file(f, size: int):
    """A downloaded trace's body: CHUNK bytes at a time, read in a worker thread; closing (also when the
    client goes away) closes and so deletes the temporary file."""
    try:
        sent = 0
        while sent < size:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, size - sent))
            if not chunk:
                break
            sent += len(chunk)
            yield chunk
    finally:
        f.close()
