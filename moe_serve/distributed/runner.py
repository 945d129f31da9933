"""The model on one worker rank: load this rank's shard, run step plans, switch placement plans.

`build(spec, groups)` is the worker's runner factory. `spec.runner_args` carries the model
directory, dtype, device, KV-cache size, dispatch mode, placement plan path and all-reduce choice
(JSON). The model is the ordinary `load_model` model with: an `EPExpertStore` holding only this
rank's physical experts (through load_model's expert_store_factory seam), one dispatcher per MoE
block (each block gets its own MoERuntime), and TP sharding applied in place (`tp.apply_tp`).

Data-parallel attention (tp=1, dp>1): the sequence of slot s lives on DP rank s % dp, in KV row
s // dp of that rank, which holds only its own sequences' rows; a rank with no sequence in a step
still runs one padding token (in a spare KV row) so that it joins every dispatch collective;
padding is never counted and never returned.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from moe_serve.distributed import messages as m
from moe_serve.distributed.comm import AllReduce, load_deepspeed_shm
from moe_serve.distributed.ep import DISPATCHERS, DispatchStats, EPExpertStore
from moe_serve.distributed.groups import Groups
from moe_serve.distributed.kv_copy import apply_kv_copies
from moe_serve.distributed.rebalance import Rebalancer
from moe_serve.distributed.sizes import check_shardable
from moe_serve.distributed.tp import apply_tp
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.hooks import NO_HOOKS
from moe_serve.models.moe import MoEBlock, MoERuntime


def default_plan(num_layers: int, num_experts: int, ep: int, redundant: int, placement: str | None = None):
    """The plan file when given, else contiguous (replicas, if any, of experts by id: no load known yet)."""
    from placement.plan import PlacementPlan

    if placement:
        plan = PlacementPlan.load(placement)
        extra = plan.num_slots - plan.num_experts
        if redundant and redundant != extra:  # 0 (the default) takes the plan's; another number ran ignored
            raise ValueError(f"parallel.redundant_experts={redundant}, but the placement file {placement} has "
                             f"{extra} redundant slots ({plan.num_slots} slots for {plan.num_experts} experts)")
    else:
        from placement.algorithms.simple import contiguous

        if (num_experts + redundant) % ep:
            raise ValueError(f"parallel.redundant_experts={redundant}: experts ({num_experts}) + redundant experts "
                             f"must be divisible by parallel.ep={ep}")
        plan = contiguous(np.ones((num_layers, num_experts)), ep, (num_experts + redundant) // ep)
    if plan.num_layers != num_layers or plan.num_experts != num_experts or plan.num_ranks != ep:
        raise ValueError(f"parallel.placement: plan has {plan.num_layers} layers x {plan.num_experts} experts on "
                         f"{plan.num_ranks} ranks; the model and parallel.ep need {num_layers} x {num_experts} "
                         f"on {ep}")
    return plan


@dataclass
class EPContext:
    """What every dispatcher of this rank reads: the plan in force, the group, this step's sizes."""

    plan: object
    ep_group: object
    ep_rank: int
    stats: DispatchStats
    count: bool = True
    real_tokens: int = 0  # tokens of real sequences on this rank this step (padding excluded)
    tokens_per_rank: list[int] = field(default_factory=list)  # DP attention: tokens each EP rank runs
    ep_global: object = None  # EP rank j -> global rank (point-to-point ops need global ranks)
    preplan: dict = field(default_factory=lambda: dict(count_exchanges=0, count_exchange_s=0.0, skipped=0,
                                                       overflow_blocks=0, padding_rows=0, predictor_skipped=0,
                                                       predictor_overflow_blocks=0, predictor_padding_rows=0,
                                                       predict_s=0.0))
    routing: object = None  # forecast.RoutingLog when the pre-planned dispatch forecasts with a predictor


def plan_batch(plan: m.StepPlan) -> ForwardBatch:
    return ForwardBatch(token_ids=plan.token_ids.to_tensor(), positions=plan.positions.to_tensor(),
                        slot_ids=list(plan.slot_ids), query_lens=list(plan.query_lens),
                        context_lens=list(plan.context_lens), seq_ids=list(plan.seq_ids), all_logits=plan.all_logits)


def sub_batch(b: ForwardBatch, seqs: list[int], kv_row=lambda slot: slot) -> ForwardBatch:
    """The sequences `seqs` of `b`; kv_row maps the engine's slot to the KV row of this rank."""
    starts = np.concatenate([[0], np.cumsum(b.query_lens)])
    rows = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in seqs])
    pick = lambda xs: [xs[i] for i in seqs]  # noqa: E731
    return ForwardBatch(token_ids=b.token_ids[rows], positions=b.positions[rows],
                        slot_ids=[kv_row(b.slot_ids[i]) for i in seqs],
                        query_lens=pick(b.query_lens), context_lens=pick(b.context_lens),
                        seq_ids=pick(b.seq_ids) if b.seq_ids else [], all_logits=b.all_logits)


class ModelRunner:
    def __init__(self, spec, groups: Groups):
        from moe_serve.models import load_model
        from moe_serve.models.checkpoint import read_config
        from moe_serve.models.families import parse_spec

        a, lay = spec.runner_args, groups.layout
        self.layout, self.groups, self.args = lay, groups, a
        _, mspec = parse_spec(read_config(a["model"]))
        check_shardable(mspec, lay)  # what the frontend checked: the same error if a rank gets here on its own
        self.plan = default_plan(mspec.num_moe_layers, mspec.num_experts, lay.ep, a.get("redundant_experts", 0),
                                 a.get("placement"))
        backend, level = a.get("allreduce_backend", "gloo"), 0
        if backend == "deepspeed" and lay.tp > 1:
            level = load_deepspeed_shm(lay.world_size, lay.rank)
        self.allreduce = AllReduce(groups.world if lay.tp > 1 else None, backend, a.get("shm_max_bytes", 1 << 20), level)
        mode = "replicated" if lay.dp == 1 else a.get("dispatch", "alltoall")
        self.mode = "alltoall" if mode == "auto" else mode
        stats = DispatchStats(lay.ep, mspec.num_moe_layers, mspec.num_experts)
        self.ctx = EPContext(self.plan, groups.ep, lay.ep_rank, stats,
                             ep_global=lambda j: lay.moe_tp_rank + j * lay.moe_tp)
        dispatchers = dict(DISPATCHERS)
        if a.get("preplan"):
            from moe_serve.distributed.preplan import PrePlannedAllToAllDispatcher

            dispatchers["alltoall"] = PrePlannedAllToAllDispatcher
            if a.get("preplan_predictor"):
                from moe_serve.distributed.forecast import RoutingLog, load_forecaster

                pred = load_forecaster(a["preplan_predictor"], mspec.num_moe_layers, mspec.num_experts, mspec.top_k)
                self.ctx.routing = RoutingLog(pred, mspec.num_moe_layers, mspec.top_k)
        self.slot_routing: dict = {}  # slot -> its last token's routing (the predictor's previous token)

        def store_factory(sp, source, dtype, device):
            return EPExpertStore(source, self.plan, lay.ep_rank, lay.moe_tp, lay.moe_tp_rank, dtype, device)

        model = load_model(a["model"], dtype=a.get("dtype", "auto"), device=spec.device,
                           expert_store_factory=store_factory, mla_decode=a.get("mla_decode", "absorbed"))
        for layer in model.layers:  # each MoE block its own runtime: its dispatcher knows its layer
            if isinstance(layer.mlp, MoEBlock):
                b = layer.mlp
                b.rt = MoERuntime(store=model.store, hooks=NO_HOOKS,
                                  dispatcher=dispatchers[self.mode](b.moe_index, self.ctx))
        if lay.tp > 1:
            apply_tp(model, lay.tp, lay.tp_rank, self.allreduce)
        self.num_slots = int(a["num_slots"])
        # DP attention: the sequence of slot s lives on DP rank s % dp, in its KV row s // dp. Each rank holds the rows
        # of its own sequences only (+1: a padding row); it held all num_slots, (dp - 1) / dp of them never used
        self.local_slots = len(range(lay.dp_rank, self.num_slots, lay.dp)) + 1 if lay.dp > 1 else self.num_slots
        self.last_step = -1  # the last StepPlan run (every rank sees the same messages in the same order)
        model.allocate_kv_cache(self.local_slots, int(a["max_len"]))
        self.kv_cache_bytes = sum(t.numel() * t.element_size() for layer in model.kv_cache for t in layer)
        self.model = model
        self.rebalancer = Rebalancer(self, a.get("rebalance_every", 0) if lay.ep > 1 else 0,
                                     a.get("rebalance_window", 64), a.get("rebalance_algorithm", "eplb"))

    # ---- steps --------------------------------------------------------------------------------
    def step(self, plan: m.StepPlan):
        self.last_step = plan.step
        if plan.kv_copies:  # completions sharing a prefill that ended last step (kv_copy.py)
            apply_kv_copies(self.model, self.layout, self.groups.world, plan.kv_copies, self.slot_routing)
        self.rebalancer.before_step(plan.step)
        out = self._forward(plan)
        self.rebalancer.after_step(plan.step)
        if out is None:
            return None
        seq_index, logits, stats = out
        pp = self.ctx.preplan
        saved = pp["skipped"] * pp["count_exchange_s"] / max(pp["count_exchanges"], 1)  # skips x measured latency
        saved_pred = pp["predictor_skipped"] * pp["count_exchange_s"] / max(pp["count_exchanges"], 1)
        stats = {**stats, **self.rebalancer.stats(), **{f"preplan_{k}": float(v) for k, v in pp.items()},
                 "preplan_saved_s": saved, "preplan_predictor_saved_s": saved_pred,
                 "kv_cache_bytes": float(self.kv_cache_bytes)}
        return seq_index, logits, stats, torch.from_numpy(self.ctx.stats.load)

    def _forward(self, plan: m.StepPlan):
        lay, batch = self.layout, plan_batch(plan)
        self.ctx.stats.reset_step()
        if lay.dp == 1:
            self.ctx.real_tokens = batch.num_tokens
            logits = self.model.forward(batch)
            if lay.rank not in lay.output_ranks():
                return None
            return list(range(batch.num_seqs)), logits, self.ctx.stats.step_dict()
        owner = [s % lay.dp for s in batch.slot_ids]
        mine = [i for i, d in enumerate(owner) if d == lay.dp_rank]
        per_rank = [sum(q for q, d in zip(batch.query_lens, owner) if d == r) or 1 for r in range(lay.dp)]
        self.ctx.tokens_per_rank = per_rank
        if mine:
            sub = sub_batch(batch, mine, lambda s: s // lay.dp)  # this rank's KV row of each of its sequences
            self.ctx.real_tokens = sub.num_tokens
        else:  # padding: one token in the spare row (the last), so this rank joins every collective
            sub = ForwardBatch.single([0], slot=self.local_slots - 1, all_logits=batch.all_logits)
            self.ctx.real_tokens = 0
        log = self.ctx.routing
        if log is not None:
            from moe_serve.distributed.forecast import prev_routing, remember

            prev_routing(log, self.slot_routing, sub.slot_ids, sub.query_lens, sub.context_lens)
        logits = self.model.forward(sub)
        if log is not None and mine:
            remember(log, self.slot_routing, sub.slot_ids, sub.query_lens)
        if not mine:
            logits = logits[:0]
        return mine, logits, self.ctx.stats.step_dict()

    # ---- commands -----------------------------------------------------------------------------
    def command(self, msg) -> int | None:
        """Take a command; a PlacementCommand returns the step it switches before."""
        if isinstance(msg, m.PlacementCommand):  # switch before step `at_step`, on every rank
            # -1: the next step. The frontend cannot name it: a step's plan may go out between its choice and the
            # command (it was refused then), but every rank resolves it alike, after the same messages
            at = self.last_step + 1 if msg.at_step == -1 else msg.at_step
            try:
                if at <= self.last_step:  # kept, it would wait for a step that never comes again
                    raise ValueError(f"placement command for step {msg.at_step} refused: at_step={msg.at_step} is "
                                     f"not after the last step run ({self.last_step})")
                new = plan_from_command(msgspec.structs.replace(msg, at_step=at), self.plan)
            except ValueError:  # a bad plan must not take the rank down: the worker reports it, serving goes on
                self.rebalancer.refused += 1
                raise
            self.rebalancer.pending[at] = new
            return at
        raise ValueError(f"model runner: command {type(msg).__name__} is not supported")


def plan_from_command(msg: m.PlacementCommand, running):
    """The placement.PlacementPlan a PlacementCommand carries, checked as the frontend checks it before
    sending one (`PlacementPlan.validate()`, and the running plan's layers, experts, ranks and slots), or
    a ValueError naming the field and the limit. Every rank decides alike: it depends on the message and
    the running plan only, which all ranks share, so either all switch at `at_step` or none does."""
    from placement.plan import PlacementPlan, int_array

    def bad(what: str):
        return ValueError(f"placement command for step {msg.at_step} refused: {what}")

    try:
        doc = json.loads(msg.plan_json)
    except ValueError as exc:
        raise bad(f"plan_json is not JSON ({exc})") from None
    if not isinstance(doc, dict) or "phy2log" not in doc or "num_ranks" not in doc:
        raise bad("plan_json must be an object with phy2log and num_ranks")
    ranks, meta = doc["num_ranks"], doc.get("meta", {})
    if isinstance(ranks, bool) or not isinstance(ranks, int):
        raise bad(f"num_ranks must be an integer, got {ranks!r}")
    try:
        new = PlacementPlan.from_phy2log(int_array("phy2log", doc["phy2log"], 2), running.num_experts, ranks,
                                         meta if isinstance(meta, dict) else {})
        if (new.num_layers, new.num_ranks, new.slots_per_rank) != (running.num_layers, running.num_ranks,
                                                                  running.slots_per_rank):
            raise ValueError(f"plan has {new.num_layers} layers on {new.num_ranks} ranks x {new.slots_per_rank} "
                             f"slots, the running one {running.num_layers} on {running.num_ranks} x "
                             f"{running.slots_per_rank}")
        return new.validate()  # e.g. an expert in no slot: its tokens went to slot -1, failing every rank
    except ValueError as exc:
        raise bad(str(exc)) from None


def build(spec, groups: Groups) -> ModelRunner:
    return ModelRunner(spec, groups)
