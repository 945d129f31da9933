"""Typed control messages between the frontend and the worker ranks (ZeroMQ carries them).

Every message is a msgspec Struct tagged by its class name and encoded as msgpack: no pickle, so
a malformed or hostile frame fails to decode instead of running code. Tensors that ride the
control plane (the step's token ids, the returned logits) travel as raw little-endian bytes with
their dtype and shape next to them (`TensorBlob`); big tensors inside the forward pass never do,
they go through torch.distributed.

Directions: frontend -> every rank: StepPlan, PlacementCommand, CacheCommand, Configure, Shutdown.
Every rank -> frontend: Ready, Heartbeat, StepOutput, WorkerError, CommandDone (a rank's answer to a command).
"""
from __future__ import annotations

import msgspec
import numpy as np


class TensorBlob(msgspec.Struct, frozen=True):
    """A CPU tensor as raw bytes (no pickle): dtype name, shape, contiguous little-endian data."""

    dtype: str
    shape: list[int]
    data: bytes

    @staticmethod
    def from_tensor(t) -> "TensorBlob":
        import torch  # lazy: a rank sends heartbeats before torch has finished importing

        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits as int16
            return TensorBlob("bfloat16", list(t.shape), t.view(torch.int16).numpy().tobytes())
        return TensorBlob(str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes())

    def to_tensor(self):
        import torch

        if self.dtype == "bfloat16":
            arr = np.frombuffer(self.data, dtype=np.int16).reshape(self.shape)
            return torch.from_numpy(arr.copy()).view(torch.bfloat16)
        arr = np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)
        return torch.from_numpy(arr.copy())


class Ready(msgspec.Struct, tag=True):
    """A rank finished loading its shard and joined the process groups."""

    rank: int
    pid: int
    host: str
    load_s: float  # seconds from process start to ready


class Heartbeat(msgspec.Struct, tag=True):
    """Sent every heartbeat interval by a side thread of each rank, also while it computes."""

    rank: int
    step: int  # last step the rank finished
    time: float  # the rank's wall clock when sent
    phase: str = "serving"  # starting | rendezvous | loading | serving


class KVCopy(msgspec.Struct, frozen=True):
    """Copy KV positions [0, n) of engine slot `src` into each of `dsts` (a request's completions share
    one prefill of its prompt: `DistributedModel.copy_kv_prefix`)."""

    src: int
    dsts: list[int]
    n: int


class StepPlan(msgspec.Struct, tag=True):
    """One forward step, the same on every rank: the flattened batch (see models.batch.ForwardBatch)."""

    step: int
    token_ids: TensorBlob  # long [N]
    positions: TensorBlob  # long [N]
    slot_ids: list[int]  # [S]
    query_lens: list[int]  # [S]
    context_lens: list[int]  # [S]
    seq_ids: list[int] = []  # [S]
    all_logits: bool = False
    freed_slots: list[int] = []  # KV-cache slots released since the previous step
    kv_copies: list[KVCopy] = []  # done by every rank, in order, before this step's forward


class StepOutput(msgspec.Struct, tag=True):
    """A rank's result of one step: logits of the sequences it answers for."""

    step: int
    rank: int
    seq_index: list[int]  # positions in the StepPlan's sequence list these rows belong to
    logits: TensorBlob  # float [len(seq_index) or tokens, V]
    compute_s: float  # forward time on the rank
    stats: dict[str, float] = {}  # counters of this step (dispatch copies, bytes, ...)
    expert_load: TensorBlob | None = None  # int64 [L, E] cumulative routing choices of this rank's tokens


class WorkerError(msgspec.Struct, tag=True):
    """A rank failed (load or step); the frontend fails requests in flight with this text."""

    rank: int
    step: int
    error: str


class CommandDone(msgspec.Struct, tag=True):
    """A rank's answer to a command: taken (error empty) or refused, and why (the rank serves on as before)."""

    rank: int
    command_id: int
    error: str = ""
    at_step: int = -1  # a PlacementCommand taken: the step it switches before (its at_step, resolved)


class PlacementCommand(msgspec.Struct, tag=True):
    """Switch to a new placement plan at `at_step` (the same step on every rank)."""

    at_step: int  # -1: before the next step (every rank gets the messages in one order: the same step on all)
    plan_json: str  # placement.PlanFile JSON text
    command_id: int = 0  # echoed in each rank's CommandDone (0: nobody waits for the answers)


class CacheCommand(msgspec.Struct, tag=True):
    """Expert-cache control forwarded to every rank's expert store (e.g. prefetch, evict, resize)."""

    op: str
    layer: int = -1
    experts: list[int] = []
    command_id: int = 0


class Configure(msgspec.Struct, tag=True):
    """To a rank started by an external launcher (torchrun): its WorkerSpec as JSON (model, sizes, ...)."""

    spec_json: str


class Shutdown(msgspec.Struct, tag=True):
    """Finish the current step, leave the process groups and exit."""

    reason: str = ""


ToWorker = StepPlan | PlacementCommand | CacheCommand | Configure | Shutdown
FromWorker = Ready | Heartbeat | StepOutput | WorkerError | CommandDone

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(frame: bytes):
    return _to_worker.decode(frame)


def decode_from_worker(frame: bytes):
    return _from_worker.decode(frame)
