"""Online learning of the prefetch predictor on a worker thread, off the decode path.

An adaptive predictor (`adapts`, e.g. mlp_online) learns from the routing the server has already
seen: every `learn_every` tokens, a few optimizer steps (`online_steps`, ~36 ms each on one CPU core
for the default mlp_online). Run inside the decode step, that is a hiccup of tens to hundreds of
milliseconds every `learn_every` tokens, paid by every request in the batch. `BackgroundLearner`
takes `observe` calls instead: it queues the rows, a worker thread trains a private copy of the
predictor on them, and after each round it hands the new weights to the predictor the cache policy
predicts with (`adopt`: one assignment, never a half-updated net).

What changes: predictions use weights that lag by the round in flight (the trace replay models that
with `TracePredictions(..., learn_lag=1)`). What does not: the order and content of what is learned.
Rows queued while the worker is busy are learned together in its next round, so after `flush()` the
weights equal those of calling `observe` on the same rows inline (one call per round); with one
round per chunk, exactly those of inline learning. Prediction only steers copies, so none of this
changes what the model computes.
"""
from __future__ import annotations

import copy
import logging
import threading

import torch

log = logging.getLogger(__name__)


class BackgroundLearner:
    """Learns for `predictor` (which must have `observe` and `adopt`) on a daemon worker thread.

    `observe(*tensors)` queues rows ([N, ...] each, as the predictor's own `observe` takes them) and
    returns at once. `flush()` waits until everything queued is learned and adopted; `close()` stops the
    worker (rows still queued are dropped: nobody will predict with what they would teach)."""

    def __init__(self, predictor):
        if not (hasattr(predictor, "observe") and hasattr(predictor, "adopt")):
            raise TypeError(f"BackgroundLearner: {type(predictor).__name__} cannot learn online (no observe/adopt)")
        self.serving = predictor
        self.trainer = copy.deepcopy(predictor)  # its weights, optimizer and replay buffer: the worker's alone
        self._queue: list[tuple[torch.Tensor, ...]] = []
        self._cond = threading.Condition()
        self._busy = self._closed = False
        self.rounds = self.rows_learned = 0  # rounds adopted, rows learned in them
        self.failed: str | None = None  # why learning stopped, if it did
        self._thread: threading.Thread | None = None

    def observe(self, *tensors: torch.Tensor) -> None:
        with self._cond:
            if self._closed or self.failed:
                return
            self._queue.append(tuple(t.detach().clone() for t in tensors))  # the caller may reuse its buffers
            if self._thread is None:  # started on first use: a predictor that never learns costs no thread
                self._thread = threading.Thread(target=self._work, name="moe-serve-predictor-learner", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                chunks, self._queue, self._busy = self._queue, [], True
            try:
                rows = [torch.cat(parts) if len(chunks) > 1 else parts[0] for parts in zip(*chunks)]
                self.trainer.observe(*rows)
                self.serving.adopt(copy.deepcopy(self.trainer.net))
                self.rounds += 1
                self.rows_learned += rows[0].shape[0]
            except Exception as exc:  # prediction only steers copies: a failing learner must not fail serving
                log.warning("expert cache: the predictor stopped learning online (%s: %s)", type(exc).__name__, exc)
                self.failed = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if self.failed:
                    self._queue.clear()
                    return

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued row is learned and its weights adopted; False if `timeout` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._queue or self._busy) or self._closed, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
