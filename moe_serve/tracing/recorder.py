"""Routing-trace recorder: a RouterHooks that keeps, per sequence, what every MoE router chose.

Each forward step holds the tokens of many sequences, flattened (prefill chunks and decodes mixed).
The recorder copies each layer's choice to host memory during the step and, at the end of the step,
splits the rows by sequence, so every sequence's rows come out in token order (prompt, then the
generated tokens that were fed back) whatever batches they were computed in. A sequence's final
sampled token never enters the model, so it has no row. Sequences are recorded whole, from position
0: one already running when the recording starts (a live server's POST /v1/traces/start) is left
out, since the format has no positions and every consumer takes a sequence's first row for position
0. When recording is off the engine does not create a recorder at all (the model gets NO_HOOKS or a
chain without it): no cost.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import RouterHooks
from predictors.traces import RoutingTrace, compact_floats


class TraceRecorder(RouterHooks):
    active = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, record_hidden: bool = False,
                 meta: dict | None = None):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.record_hidden = record_hidden
        self.reads_ids_only = not record_hidden  # ids and weights only: the compiled decode step reports them
        self.meta = dict(meta or {})
        self.chunks: dict[int, list[tuple]] = {}  # seq id -> [(token_ids [n], experts [n,L,K], weights, hidden)]
        self.num_tokens = 0  # rows in self.chunks, kept as chunks are added: counts() never walks them
        self._step: list[tuple | None] = []

    def begin_step(self, batch: ForwardBatch) -> None:
        self._step = [None] * self.num_layers

    def route(self, moe_layer, hidden, expert_ids, weights):
        # copied in the model's dtype and made float16 at the end of the step only where it fits:
        # a float16 copy turned activations past 65504 (a bf16/fp32 model has them) into inf
        h = hidden.detach().to("cpu", copy=True) if self.record_hidden else None
        self._step[moe_layer] = (
            expert_ids.detach().to("cpu", torch.int16, copy=True),  # [N, K]
            weights.detach().to("cpu", torch.float32, copy=True),  # [N, K]
            h,  # [N, H] or None
        )
        return None

    def end_step(self, batch: ForwardBatch) -> None:
        if any(s is None for s in self._step):
            return  # the forward did not reach every layer (it failed): nothing of it is kept
        experts = torch.stack([s[0] for s in self._step], dim=1).numpy()  # [N, L, K]
        weights = torch.stack([s[1] for s in self._step], dim=1).numpy()  # float32 [N, L, K]
        hidden = None
        if self.record_hidden:  # float16 where it fits, float32 otherwise (the file format's rule)
            hidden = compact_floats(torch.stack([s[2] for s in self._step], dim=1).float().numpy())
        # highest weight first, as the format says: a biased router (noaux_tc) orders by score + bias
        order = np.argsort(-weights, axis=-1, kind="stable")
        experts = np.take_along_axis(experts, order, -1)
        weights = compact_floats(np.take_along_axis(weights, order, -1))
        tokens = batch.token_ids.detach().cpu().numpy()
        ids = batch.seq_ids or batch.slot_ids
        start = 0
        for sid, n, context in zip(ids, batch.query_lens, batch.context_lens):
            rows = slice(start, start + n)
            start += n
            if sid not in self.chunks and context > 0:
                continue  # began before the recording: its rows would not start at position 0
            chunk = (tokens[rows], experts[rows], weights[rows], None if hidden is None else hidden[rows])
            self.chunks.setdefault(sid, []).append(chunk)
            self.num_tokens += len(chunk[0])
        self._step = []

    def fork(self, parent: int, children: list[int], rows: int | None = None) -> None:
        """Each child's sequence begins with the parent's rows so far, or its first `rows` (the prompt the
        model ran once for them all), so every completion of an n > 1 request is a whole trace sequence
        from position 0, as when each prefilled alone. The rows are shared, never written again."""
        if parent not in self.chunks:
            return  # began before the recording: its children are left out with it
        kept, left = [], sum(len(c[0]) for c in self.chunks[parent]) if rows is None else rows
        for chunk in self.chunks[parent]:
            if left <= 0:
                break
            kept.append(chunk if len(chunk[0]) <= left else tuple(None if a is None else a[:left] for a in chunk))
            left -= len(kept[-1][0])
        for child in children:
            self.chunks[child] = list(kept)
            self.num_tokens += sum(len(c[0]) for c in kept)

    def copy(self) -> "TraceRecorder":
        """What was recorded so far, apart (the rows are shared: they are never written again)."""
        other = TraceRecorder(self.num_layers, self.num_experts, self.top_k, self.record_hidden, self.meta)
        other.chunks = {sid: list(chunks) for sid, chunks in self.chunks.items()}
        other.num_tokens = self.num_tokens
        return other

    def counts(self) -> tuple[int, int]:
        """(sequences, tokens) recorded so far, without building the trace or walking the chunks: O(1),
        however long the recording (a live server's GET /v1/traces asks it under the lock every step takes)."""
        return len(self.chunks), self.num_tokens

    def to_trace(self) -> RoutingTrace:
        """Everything recorded so far, one trace sequence per engine sequence, in sequence-id order."""
        order = sorted(self.chunks)
        cat = lambda i: [c[i] for s in order for c in self.chunks[s]]  # noqa: E731
        lens = [sum(len(c[0]) for c in self.chunks[s]) for s in order]
        L, K = self.num_layers, self.top_k
        experts = np.concatenate(cat(1)) if order else np.zeros((0, L, K), np.int16)
        weights = np.concatenate(cat(2)) if order else np.zeros((0, L, K), np.float16)
        return RoutingTrace(
            experts=experts,
            weights=weights,
            seq_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
            num_experts=self.num_experts,
            token_ids=np.concatenate(cat(0)).astype(np.int64) if order else np.zeros(0, np.int64),
            hidden=np.concatenate(cat(3)) if (self.record_hidden and order) else None,
            meta=dict(self.meta, sequences=len(order)),
        )

    def save(self, path: str | Path) -> RoutingTrace:
        trace = self.to_trace()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        trace.save(path)
        return trace
