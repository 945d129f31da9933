"""Routing-trace recording switched on and off on a live server (POST /v1/traces/start|stop|dump).

`LiveTraceHook` sits in the model's hook chain for the server's lifetime and forwards to a
`TraceRecorder` only while recording. The engine steps in its own thread, so a switch takes effect
at the next step boundary: `begin_step` decides, under a lock, whether this whole step is recorded,
and a start or stop in the middle of a step never leaves a recorder with half a step. When off,
`route` returns at once (no tensor is copied).
"""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from moe_serve.models.hooks import HookChain, RouterHooks
from moe_serve.server.errors import APIError
from moe_serve.tracing.recorder import TraceRecorder


_NAME_MAX = 255  # bytes in one file name on Linux file systems


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


class TraceControl:
    """The endpoints' logic: install the hook once, then start / stop / dump."""

    def __init__(self, bridge, trace_dir: str):
        self.trace_dir = Path(trace_dir)
        spec, model = bridge.spec, bridge.model
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

    def download(self) -> bytes:
        """The recorded trace as .npz bytes (nothing is written on the server's disk)."""
        self._check()
        trace = self.hook.snapshot()
        if trace is None:
            raise APIError(409, "no routing trace: POST /v1/traces/start first", code="not_recording")
        buf = io.BytesIO()
        trace.save(buf)
        return buf.getvalue()

    def dump(self, name: str | None) -> dict:
        """Write what was recorded to `trace_dir/name` (.npz); name is a plain file name."""
        self._check()
        if name is not None and not _plain_npz_name(name):
            raise APIError(400, f"path: must be a plain file name ending in .npz, at most {_NAME_MAX} bytes (written "
                                f"under the server's trace_dir), got {name!r}", param="path")  # whatever the state
        trace = self.hook.snapshot()
        if trace is None:
            raise APIError(409, "no routing trace: POST /v1/traces/start first", code="not_recording")
        if name is None:
            name = time.strftime("trace-%Y%m%d-%H%M%S") + f"-{time.monotonic_ns() % 10**6:06d}.npz"
        path = (self.trace_dir / name).resolve()
        if path.is_dir():
            raise APIError(409, f"path: {name!r} is a directory under the server's trace_dir, not a file",
                           param="path", code="path_is_directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            trace.save(str(path))
        except OSError as e:  # the server's trace_dir: a file, not writable, full
            raise APIError(500, f"cannot write {name!r} under server.trace_dir {self.trace_dir}: {e.strerror or e}",
                           type="server_error", code="trace_dir_unwritable") from None
        return dict(self.status(), path=str(path))
