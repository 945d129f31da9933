"""The engine's view of a distributed model: `DistributedModel` quacks like MoEModel.

The engine (scheduler, sampler, detokenizer) stays in the frontend process and calls
`kv_bytes_per_token()`, `allocate_kv_cache(num_slots, max_len)` and `forward(batch) -> logits`
exactly as on a local model. `allocate_kv_cache` starts the worker ranks (they need the KV size);
`forward` sends the step plan to every rank and gathers the logits from the output ranks. When a
rank dies or fails, `forward` raises WorkerFailure at once (the engine fails the requests in flight
with its text), the workers are stopped, and every later call raises the same error: it never hangs.
"""
from __future__ import annotations

import atexit
import os
import threading

import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed import messages as m
from moe_serve.distributed.comm import shm_files
from moe_serve.distributed.endpoints import free_tcp_port
from moe_serve.distributed.groups import ParallelLayout
from moe_serve.distributed.launcher import WorkerFailure, WorkerGroup
from moe_serve.distributed.sizes import check_rank_devices, check_shardable, threads_per_rank, usable_cores
from moe_serve.distributed.worker import WorkerSpec
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import NO_HOOKS


# Largest all-reduce sent through DeepSpeed's shm kernel; bigger ones go through gloo. From
# benches/allreduce.py on the 2-core CPU: shm 7-18 us vs gloo 190-400 us for 4-64 KB when both ranks
# are scheduled, but slower at 1 MB (decode: hidden 2048 x 16 tokens x bf16 = 64 KB).
SHM_MAX_BYTES = 64 << 10
# Seconds the surviving ranks get to stop on their own after one failed (then SIGTERM, then SIGKILL).
FAILED_GROUP_GRACE_S = 0.5


def shm_allreduce_built() -> bool:
    """Whether DeepSpeed's CPU shm all-reduce is installed and already compiled (no 40 s build at startup)."""
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        from torch.utils.cpp_extension import _get_build_directory

        b = ShareMemCommBuilder()
        return os.path.isdir(_get_build_directory(b.name, verbose=False)) and any(
            f.endswith(".so") for f in os.listdir(_get_build_directory(b.name, verbose=False)))
    except Exception:
        return False


def resolve_allreduce(pc: ParallelConfig, device: str) -> str:
    """auto: DeepSpeed shm on CPU when it is built (benches/allreduce.py: faster on decode sizes), else gloo."""
    if pc.allreduce != "auto":
        return pc.allreduce
    return "deepspeed" if device == "cpu" and pc.tp > 1 and shm_allreduce_built() else "gloo"


class DistributedModel:
    def __init__(self, mc: ModelConfig, pc: ParallelConfig, faults: dict[int, str] | None = None, engine_hooks=None):
        from moe_serve.models.checkpoint import read_config
        from moe_serve.models.families import parse_spec
        from moe_serve.models.loader import resolve_dtype

        from moe_serve.distributed.runner import default_plan

        self.mc, self.pc, self.faults, self.engine_hooks = mc, pc, faults, engine_hooks
        _, self.spec = parse_spec(read_config(mc.model))
        self.layout = ParallelLayout(pc.tp, pc.ep)
        # before any rank starts: more ranks or threads than cores was accepted and ran, each step slowed down
        # by ranks taking turns on a core inside every collective (ranks started by torchrun are not ours to count)
        if pc.worker_endpoint:
            self.threads = pc.threads_per_rank or max(1, usable_cores() // self.layout.world_size)
        else:
            self.threads = threads_per_rank(pc.tp, pc.ep, pc.threads_per_rank, mc.device)
            check_rank_devices(mc.device, pc.tp, pc.ep, torch.cuda.device_count())  # ranks started here: a GPU each
        # the ranks run the same checks: sizes the layout cannot split (heads, KV heads, intermediate sizes),
        # a bad placement file or redundant_experts fail here, before any rank starts
        check_shardable(self.spec, self.layout)
        self.plan = default_plan(self.spec.num_moe_layers, self.spec.num_experts, pc.ep, pc.redundant_experts,
                                 pc.placement)
        self.plan_since_step = 0  # the step from which self.plan is in force (switch_placement moves both)
        if pc.preplan_predictor:  # each rank loads it too: a bad file failed every rank's start-up, a traceback each
            from moe_serve.distributed.forecast import load_forecaster

            load_forecaster(pc.preplan_predictor, self.spec.num_moe_layers, self.spec.num_experts, self.spec.top_k)
        self.dtype = resolve_dtype(mc.dtype, self.spec)
        self.device = torch.device("cpu")  # logits arrive on the host
        self.group: WorkerGroup | None = None
        self.error: WorkerFailure | None = None
        self.step_id = 0
        self.num_slots = self.max_len = 0  # set by allocate_kv_cache
        self.kv_copies: list[m.KVCopy] = []  # queued by copy_kv_prefix, sent with the next step's plan
        self.hooks = NO_HOOKS  # the engine's fork() tells these; routing (and the load counter) is on the ranks
        self.last_stats: list[dict] = []
        self.expert_load: torch.Tensor | None = None
        self.allreduce = resolve_allreduce(pc, mc.device)
        self._shm_port = None
        # close() from another thread while allocate_kv_cache waits for the ranks (a server stopped during its
        # start-up) used to find no group yet and do nothing: the ranks came up afterwards and kept running
        self._closed = threading.Event()  # also tells the starting WorkerGroup to stop its ranks
        self._lock = threading.Lock()  # the group is either handed to close() or never kept
        self._started = threading.Event()  # no start-up in progress
        self._started.set()
        self.shutdown_grace_s = pc.shutdown_grace_s  # how long AsyncEngine.shutdown waits for a step in flight
        atexit.register(self.close)

    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)

    def allocate_kv_cache(self, num_slots: int, max_len: int) -> None:
        """Start the ranks: each loads its shard and allocates its KV cache of `num_slots` x `max_len`."""
        if self._closed.is_set():
            raise RuntimeError("the distributed model is closed")
        if num_slots < 1 or max_len < 1:  # as MoEModel: else every rank failed its start-up, a traceback each
            raise ValueError(f"allocate_kv_cache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        if self.group is not None or not self._started.is_set():  # a second group: the first's ranks ran on, unowned
            raise RuntimeError(f"allocate_kv_cache: the worker ranks are running already ({self.num_slots} slots x "
                               f"{self.max_len}); close() this model and build a new one for other sizes")
        pc, mc, w = self.pc, self.mc, self.layout.world_size
        args = dict(model=str(mc.model), dtype=mc.dtype, mla_decode=mc.mla_decode, num_slots=num_slots, max_len=max_len,
                    dispatch=pc.dispatch, placement=pc.placement, redundant_experts=pc.redundant_experts,
                    allreduce_backend=self.allreduce, rebalance_every=pc.rebalance_every,
                    shm_max_bytes=SHM_MAX_BYTES, preplan=pc.preplan, preplan_predictor=pc.preplan_predictor,
                    rebalance_window=pc.rebalance_window)
        base = WorkerSpec(rank=0, tp=pc.tp, ep=pc.ep, up="", down="", dist_init="",
                          runner="moe_serve.distributed.runner:build", runner_args=args, device=mc.device,
                          heartbeat_s=pc.heartbeat_interval_s, dist_timeout_s=min(pc.step_timeout_s, 300),
                          threads=self.threads)
        env = {}
        if self.allreduce == "deepspeed":  # names of DeepSpeed's /dev/shm files; LOCAL_SIZE must be the world
            self._shm_port = str(free_tcp_port())
            env = dict(LOCAL_SIZE=str(w), MASTER_ADDR="127.0.0.1", MASTER_PORT=self._shm_port, DS_ACCELERATOR="cpu")
        self._starter = threading.current_thread()
        self._started.clear()
        try:
            group = WorkerGroup(base, w, pc.startup_timeout_s, pc.heartbeat_timeout_s, pc.control_transport,
                                self.faults, env, external=pc.worker_endpoint, cancel=self._closed)
            with self._lock:
                if not self._closed.is_set():
                    self.group = group
            if self.group is not group:  # closed between the last rank's Ready and here
                group.shutdown(grace_s=FAILED_GROUP_GRACE_S)
                raise WorkerFailure("closed while the ranks were starting")
        except BaseException:
            self._release()  # the shm files of ranks that failed at start-up
            raise
        finally:
            self._started.set()
        self.num_slots, self.max_len = num_slots, max_len

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """logits fp32 [S, V] (or [N, V] with all_logits), assembled from the output ranks."""
        if self.error is not None:
            raise self.error
        if self.group is None:
            raise RuntimeError("the distributed model is closed" if self._closed.is_set()
                               else "call allocate_kv_cache(num_slots, max_len) before forward")
        step, self.step_id = self.step_id, self.step_id + 1
        plan = m.StepPlan(step=step, token_ids=m.TensorBlob.from_tensor(batch.token_ids),
                          positions=m.TensorBlob.from_tensor(batch.positions), slot_ids=list(batch.slot_ids),
                          query_lens=list(batch.query_lens), context_lens=list(batch.context_lens),
                          seq_ids=list(batch.seq_ids), all_logits=batch.all_logits, kv_copies=self.kv_copies)
        self.kv_copies = []  # handed over: a retry of this step must not copy again from a slot it rewrote
        try:
            self.group.broadcast(plan)
            outs = self.group.collect(step, len(self.layout.output_ranks()), self.pc.step_timeout_s)
            logits = self._assemble(step, batch, outs)  # ranks that disagree fail the group as a dead rank does
        except WorkerFailure as exc:
            self.error = exc
            # the other ranks are most likely stuck in a collective with the failed one: they would not
            # act on a graceful Shutdown, and its 5 s grace would only delay the requests' error replies
            self.close(grace_s=FAILED_GROUP_GRACE_S)
            raise
        self.last_stats = [o.stats for o in outs]
        loads = [o.expert_load.to_tensor() for o in outs if o.expert_load is not None]
        if loads:
            self.expert_load = torch.stack(loads).sum(0)  # int64 [L, E] routing choices so far
            counter = getattr(self.engine_hooks, "counter", None)
            if counter is not None:  # the engine's ExpertLoadCounter (CLI table, /metrics) shows the ranks' sum
                counter.counts.copy_(self.expert_load)
        return logits

    def copy_kv_prefix(self, src_slot: int, dst_slots: list[int], n: int) -> None:
        """Have every rank copy positions [0, n) of slot `src_slot`'s KV into each of `dst_slots` (a request's
        completions share one prefill: the engine runs the prompt once). Checked here as MoEModel checks it;
        the copy rides the next step's plan and the ranks do it before that step's forward (kv_copy.py)."""
        if not 0 < n <= self.max_len or not all(0 <= s < self.num_slots for s in [src_slot, *dst_slots]):
            raise ValueError(f"copy_kv_prefix: slots {src_slot} -> {dst_slots} (of {self.num_slots}) and "
                             f"n={n} (max_len {self.max_len}) out of range")
        self.kv_copies.append(m.KVCopy(int(src_slot), [int(s) for s in dst_slots], int(n)))

    def _assemble(self, step: int, batch: ForwardBatch, outs: list[m.StepOutput]) -> torch.Tensor:
        if len(outs) == 1 and outs[0].seq_index == list(range(batch.num_seqs)):
            return outs[0].logits.to_tensor()
        owners: dict[int, list[int]] = {}  # sequence -> the ranks that returned it: exactly one each
        for o in outs:
            for i in o.seq_index:
                owners.setdefault(i, []).append(o.rank)
        wrong = {i: owners.get(i, []) for i in range(batch.num_seqs) if len(owners.get(i, [])) != 1}
        wrong.update({i: r for i, r in owners.items() if not 0 <= i < batch.num_seqs})
        if wrong:  # a rank out of step with the others (its own idea of the batch): nothing it computes is sure
            said = "; ".join(f"rank {o.rank} returned {o.seq_index}" for o in sorted(outs, key=lambda o: o.rank))
            raise WorkerFailure(f"step {step}: the ranks disagree on which of the {batch.num_seqs} sequences each "
                                f"returns (data-parallel split by slot % {self.layout.dp}, slots {batch.slot_ids}): "
                                f"sequence -> ranks returning it {dict(sorted(wrong.items()))}; {said}")
        rows: dict[int, torch.Tensor] = {}
        for o in outs:
            t = o.logits.to_tensor()
            if batch.all_logits:  # rows are the tokens of its sequences, in their order
                t = t.split([batch.query_lens[i] for i in o.seq_index])
            for i, r in zip(o.seq_index, t):
                rows[i] = r if batch.all_logits else r[None]
        return torch.cat([rows[i] for i in range(batch.num_seqs)])

    def switch_placement(self, plan, at_step: int | None = None) -> int:
        """Have every rank switch to `plan` (a placement.PlacementPlan) before step `at_step` (default: the next
        step boundary, the first step the ranks run after taking the command, even if a step's plan went out
        meanwhile); returns that step once every rank has taken the plan (a ValueError with their reason when
        they refuse it: serving goes on with the running plan). Weights move between ranks; outputs do not change."""
        import json

        if self.group is None:  # failed: why (a bare 'not running' hid which rank died and how)
            raise self.error or RuntimeError("the worker ranks are not running")
        at = -1 if at_step is None else at_step  # -1: the ranks take the next step they run (runner.command)
        if at_step is not None and at < self.step_id:  # the ranks switch before it: one already run never comes
            raise ValueError(f"switch_placement: at_step must be >= the next step {self.step_id}, got {at}")
        shape = lambda p: (p.num_layers, p.num_experts, p.num_ranks, p.slots_per_rank)  # noqa: E731
        if shape(plan) != shape(self.plan):  # a rank would fail on it, and every rank with it
            raise ValueError("switch_placement: plan has {} layers x {} experts on {} ranks x {} slots; the running "
                             "one {} x {} on {} x {}".format(*shape(plan), *shape(self.plan)))
        plan.validate()  # an expert in no slot was routed to slot -1 on the ranks, failing them all
        doc = dict(num_ranks=plan.num_ranks, phy2log=plan.phy2log.tolist(), meta=plan.meta)
        done = self.group.command(m.PlacementCommand(at_step=at, plan_json=json.dumps(doc)), self.pc.step_timeout_s)
        # every rank took it: the plan in force from that step (the ranks' own rebalance_every switches unseen here)
        self.plan, self.plan_since_step = plan, done[0].at_step
        return done[0].at_step

    def dispatch_stats(self) -> dict[str, float]:
        """This step's dispatch counters summed over the output ranks."""
        out: dict[str, float] = {}
        for s in self.last_stats:
            for k, v in s.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def failure(self) -> str | None:
        """Why the ranks can serve no more (one died or failed: every later request fails at once), else None.
        Seen by the monitor between steps too, so the server's /health tells it before a request comes."""
        if self.error is not None:
            return str(self.error)
        g = self.group
        if g is not None and g.error is not None and not g._stop.is_set():  # not a shutdown of ours
            return str(g.error)
        return None

    def interrupt(self, reason: str) -> None:
        """From another thread: fail the step in flight now (WorkerFailure(reason) in forward, whose thread then
        closes the group: 0.5 s for the ranks, then SIGTERM, SIGKILL) instead of waiting on a hung rank."""
        g = self.group
        if g is not None:
            g.abort(reason)

    def close(self, grace_s: float | None = None) -> None:
        """Stop the ranks (`grace_s`, default parallel.shutdown_grace_s, to finish on their own before SIGTERM) and
        remove shm files. Safe to call twice, and from another thread while allocate_kv_cache starts the ranks: it
        then waits for them to stop."""
        grace_s = self.shutdown_grace_s if grace_s is None else grace_s
        atexit.unregister(self.close)  # the registry's reference kept every closed model (and its plan) alive
        with self._lock:
            self._closed.set()
            g, self.group = self.group, None
        if g is not None:
            g.shutdown(grace_s)
        if getattr(self, "_starter", None) is not threading.current_thread():
            self._started.wait(timeout=grace_s + 10)  # a start-up in another thread stops its ranks (0.2 s poll)
        self._release()

    def _release(self) -> None:
        port, self._shm_port = self._shm_port, None
        if port is not None:
            for f in shm_files("127.0.0.1", port):
                try:
                    os.remove(f)
                except OSError:
                    pass


def distributed_engine_model(mc: ModelConfig, pc: ParallelConfig, hooks, expert_cache) -> DistributedModel:
    """The engine's model when parallel.tp * ep > 1 (moe_serve.engine.model_setup calls this)."""
    tc = hooks.trace_config
    if tc.record_trace or tc.replay_trace:
        raise ValueError("trace.record_trace and trace.replay_trace are not supported with "
                         f"parallel.tp={pc.tp}, parallel.ep={pc.ep} yet (routing happens on the worker ranks)")
    if expert_cache is not None and (expert_cache.expert_cache_gb is not None
                                     or expert_cache.expert_cache_slots is not None):
        raise ValueError("expert_cache.expert_cache_gb/expert_cache_slots (offloading) are not supported with "
                         f"parallel.tp={pc.tp}, parallel.ep={pc.ep} yet: every rank keeps its experts resident")
    return DistributedModel(mc, pc, engine_hooks=hooks)
