"""Routing replay: drive every MoE router of a model from a recorded trace instead of its gate.

Engine sequences are matched to trace sequences in the order the replay first sees them (the first
sequence served replays trace sequence 0, the next one sequence 1, ..., cycling), and a token at
position p of its sequence takes row `p mod len(trace sequence)` of its trace sequence. So a
recorded run, replayed with the same prompts, sees exactly the recorded routing, and any workload
can be pushed through real routing. What the replay holds per sequence lives only while the sequence
holds its KV slot (a server replays for its whole uptime).

Fitting a trace to a model of another shape (`fit_routing`), the rule:
  * layers: model MoE layer l reads trace layer `l mod L_trace`;
  * expert ids: `id mod num_experts`;
  * top-k: the trace's highest-weight `top_k` are kept when it has more; when it has fewer, slot j
    is filled with `(first id + j) mod num_experts` and the smallest kept weight;
  * duplicates (from the modulo or the padding) move to the next free id, `(id + 1) mod num_experts`;
  * each row's weights are rescaled to the trace row's total gate weight, so the mass the experts
    contribute is the recorded one.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import RouterHooks
from predictors.traces import RoutingTrace

log = logging.getLogger(__name__)


def fit_routing(experts: np.ndarray, weights: np.ndarray, num_experts: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, L, K] ids and weights -> [T, L, top_k] distinct ids in [0, num_experts) and rescaled weights."""
    if top_k > num_experts:
        raise ValueError(f"replay: top_k={top_k} must be <= num_experts={num_experts}")
    w = weights.astype(np.float32)
    order = np.argsort(-w, axis=-1, kind="stable")  # highest weight first (other producers' rows may not be)
    ids = np.take_along_axis(experts.astype(np.int64) % num_experts, order, -1)
    w = np.take_along_axis(w, order, -1)
    total = w.sum(axis=-1, keepdims=True)  # [T, L, 1]
    K = ids.shape[-1]
    if K >= top_k:
        ids, w = ids[..., :top_k].copy(), w[..., :top_k].copy()
    else:
        extra = (ids[..., :1] + np.arange(1, top_k - K + 1)) % num_experts
        ids = np.concatenate([ids, extra], axis=-1)
        w = np.concatenate([w, np.repeat(w.min(axis=-1, keepdims=True), top_k - K, axis=-1)], axis=-1)
    for k in range(1, top_k):
        for _ in range(top_k):  # at most k ids are taken, so k + 1 tries always find a free one
            dup = (ids[..., k:k + 1] == ids[..., :k]).any(axis=-1)
            if not dup.any():
                break
            ids[..., k] = np.where(dup, (ids[..., k] + 1) % num_experts, ids[..., k])
    s = w.sum(axis=-1, keepdims=True)
    w = np.where(s > 0, w * total / np.where(s > 0, s, 1.0), w)
    return ids, w


def load_replay(path, num_layers: int, num_experts: int, top_k: int) -> TraceReplay:
    """`trace.replay_trace` read and fitted to a model of that shape (from its config.json: the engine
    calls this before any weight is read); every error names the field and the file."""
    from predictors.traces import load_trace

    try:
        trace = load_trace(path, keys=())  # ids and weights drive the routers: the hidden states stay on disk
    except FileNotFoundError as e:
        raise FileNotFoundError(f"trace.replay_trace: {e}") from None
    except ValueError as e:  # "trace PATH: what is wrong"
        raise ValueError(f"trace.replay_trace {path}: {str(e).removeprefix(f'trace {path}: ')}") from None
    try:
        replay = TraceReplay(trace, num_layers, num_experts, top_k)
    except ValueError as e:  # the replay's own checks (a trace with no tokens)
        raise ValueError(f"trace.replay_trace {path}: {str(e).removeprefix('replay: ')}") from None
    if (trace.num_layers, trace.num_experts, trace.top_k) != (num_layers, num_experts, top_k):
        log.info("trace.replay_trace %s: %d MoE layers, %d experts, top-%d, fitted to the model's %d, %d, top-%d "
                 "(moe_serve/tracing/replay.py's rule)", path, trace.num_layers, trace.num_experts, trace.top_k,
                 num_layers, num_experts, top_k)
    return replay


class TraceReplay(RouterHooks):
    active = True

    def __init__(self, trace: RoutingTrace, num_layers: int, num_experts: int, top_k: int):
        ids, w = fit_routing(trace.experts, trace.weights, num_experts, top_k)  # [T, L_trace, K]
        layers = [l % trace.num_layers for l in range(num_layers)]
        # int16 as in the file: int64 held 4x the file for a server's uptime; the step's rows become
        # the router's dtype as they move to the device in `route`
        narrow = np.int16 if num_experts <= 2**15 else np.int32
        self.experts = torch.from_numpy(ids[:, layers].astype(narrow))  # int16 [T, L, K]
        self.weights = torch.from_numpy(np.ascontiguousarray(w[:, layers]))  # [T, L, K]
        lens = np.diff(trace.seq_offsets)
        self.seqs = [(int(trace.seq_offsets[s]), int(lens[s])) for s in range(trace.num_sequences) if lens[s] > 0]
        if not self.seqs:
            raise ValueError("replay: the trace has no tokens")
        # KV slot -> (engine seq id, index into self.seqs) of the sequence in it: a sequence holds its
        # slot from admission to its end, so a new id in a slot is a new sequence and what the slot held
        # is dropped (keyed by seq id, one entry per request ever served stayed for the server's uptime)
        self.assigned: dict[int, tuple[int, int]] = {}
        self._next = 0  # sequences seen so far: the next one replays trace sequence _next mod S
        self.rows = torch.zeros(0, dtype=torch.long)
        self._step: dict = {}  # device -> this step's (ids [N, L, K], weights [N, L, K]) there

    def begin_step(self, batch: ForwardBatch) -> None:
        ids = batch.seq_ids or batch.slot_ids
        pos = batch.positions.cpu()
        starts, lens = [], []
        for slot, sid, n in zip(batch.slot_ids, ids, batch.query_lens):
            held = self.assigned.get(slot)
            if held is None or held[0] != sid:
                held = self.assigned[slot] = (sid, self._next % len(self.seqs))
                self._next += 1
            off, length = self.seqs[held[1]]
            starts += [off] * n
            lens += [length] * n
        self.rows = torch.tensor(starts) + pos % torch.tensor(lens)  # [N] trace row of each token
        self._step.clear()

    def route(self, moe_layer, hidden, expert_ids, weights):
        # every layer's rows of the step move to the device at its first router, in two copies (not
        # two small host-to-device copies per layer: each costs ~30 us of host time on a GPU machine)
        step = self._step.get(expert_ids.device)
        if step is None:
            step = self._step[expert_ids.device] = (self.experts[self.rows].to(expert_ids.device, expert_ids.dtype),
                                                    self.weights[self.rows].to(weights.device, weights.dtype))
        return step[0][:, moe_layer], step[1][:, moe_layer]  # [N, K] each
