"""EP dispatch on 2 CPU ranks with routing replayed from real traces: contiguous vs EPLB vs affinity.

Plans are fitted on one trace (default: dsv2lite_intent) and replayed on the other (summary):
DeepSeek-V2-Lite routing, 26 MoE layers x 64 experts, top-6, `--redundant` extra slots in all.
Each step replays one batch of `--batch` tokens (placement.score.batch_ids: the batches the
placement scorer uses) through all 26 layers of the runtime's own EP stages
(moe_serve.distributed.ep: EPExpertStore + dispatcher) with small synthetic experts
(`--hidden`, `--inter`), in both dispatch modes:
- replicated (TP attention: every rank holds the batch; partial sums all-reduced),
- alltoall (DP attention: the batch split between the ranks, rows exchanged by all_to_all_single),
- preplan (alltoall with buffers sized from the previous step: the count exchange skipped),
- preplan_predictor (the same, layer l+1's buffers sized from a `predictors` predictor's forecast made
  after layer l's router; fitted on the --fit trace with --predictor, saved and loaded with
  predictors.load_predictor; the previous token's routing comes from the replayed trace).
Reported per plan and mode: tokens/s, dispatch copies per token-layer counted by the runtime, the
fan-out `placement` predicts for the same batches (must be equal), remote bytes per step (at the
bench's hidden size and scaled to DeepSeek-V2-Lite's 2048 x bf16). Baseline in the same run:
DeepSpeed's MoE layer (deepspeed.moe.layer.MoE, same experts, ep_size=2, no token dropping) on
the same batch size, with its own gate (it cannot replay routing).

    python benches/ep_dispatch.py [--steps 24] [--batch 32] [--predictor transition] [--out ...json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "traces"
WARMUP_STEPS = 2  # timed, not counted: the first steps build plans and warm caches
PLANS = ("contiguous", "eplb", "affinity")
MODES = ("replicated", "alltoall", "preplan", "preplan_predictor")


def replay_batches(T: int, batch: int, steps: int) -> list[np.ndarray]:
    from placement.score import batch_ids

    b = batch_ids(T, batch, seed=0)
    return [np.flatnonzero(b == i) for i in range(min(steps, T // batch))]


def predicted_fanout(plan, experts: np.ndarray, batches: list[np.ndarray], world: int, split: bool) -> float:
    """Mean distinct ranks per token-layer as placement scores it; split: each rank's half is its own batch."""
    from placement.score import assign_ranks, touched_ranks

    rows = np.concatenate(batches)
    bid = np.concatenate([np.full(len(b), i) for i, b in enumerate(batches)])
    if split:  # the runtime's alltoall mode: rank r runs rows[r::world] of the batch, choosing replicas alone
        bid = np.concatenate([(np.arange(len(b)) % world) + i * world for i, b in enumerate(batches)])
        rows = np.concatenate([np.concatenate([b[r::world] for r in range(world)]) for b in batches])
        bid = np.concatenate([np.concatenate([np.full(len(b[r::world]), i * world + r) for r in range(world)])
                              for i, b in enumerate(batches)])
    ranks = assign_ranks(plan, experts[rows], bid)
    return float(touched_ranks(ranks, plan.num_ranks).sum(-1).mean())


class SyntheticExperts:
    """Deterministic random expert weights (gate_up [2I, H], down [H, I]) for any (layer, expert)."""

    def __init__(self, L: int, E: int, H: int, I: int):
        import torch

        self.num_moe_layers, self.num_experts, self.H, self.I = L, E, H, I
        g = torch.Generator().manual_seed(0)
        self.base = [(torch.randn(2 * I, H, generator=g) * 0.05, torch.randn(H, I, generator=g) * 0.05) for _ in range(E)]

    def get(self, l: int, e: int):
        gu, dn = self.base[e]
        return gu * (1 + 0.01 * l), dn


def run_ours(rank, world, args, plan, mode, experts, weights, batches, pred=None, prev=None):
    import torch
    import torch.distributed as dist

    from moe_serve.distributed.ep import DISPATCHERS, DispatchStats, EPExpertStore
    from moe_serve.distributed.runner import EPContext

    L, E = plan.num_layers, plan.num_experts
    store = EPExpertStore(SyntheticExperts(L, E, args.hidden, args.inter), plan, rank, 1, 0, torch.float32, "cpu")
    ctx = EPContext(plan, dist.group.WORLD, rank, DispatchStats(world, L, E), ep_global=lambda j: j)
    if mode.startswith("preplan"):
        from moe_serve.distributed.preplan import PrePlannedAllToAllDispatcher as cls
        if mode == "preplan_predictor":
            from moe_serve.distributed.forecast import RoutingLog

            ctx.routing = RoutingLog(pred, L, experts.shape[-1])
    else:
        cls = DISPATCHERS[mode]
    disp = [cls(l, ctx) for l in range(L)]
    g = torch.Generator().manual_seed(1)
    times, tokens, copies, tl, remote = [], 0, 0, 0, 0
    for i, rows in enumerate(batches):
        if mode != "replicated":
            rows = rows[rank::world]
        if ctx.routing is not None:  # the previous token of each row's sequence, as the trace recorded it
            ctx.routing.prev_experts, ctx.routing.prev_weights = prev[0][rows], prev[1][rows]
        ids = torch.from_numpy(experts[rows].astype(np.int64))  # [n, L, K]
        w = torch.from_numpy(weights[rows].astype(np.float32))
        x = torch.randn(len(rows), args.hidden, generator=g)
        ctx.stats.reset_step()
        ctx.real_tokens = len(rows)
        dist.barrier()
        t = time.perf_counter()
        for l in range(L):
            xs, counts, state = disp[l].dispatch(x, ids[:, l], w[:, l], E)
            y = disp[l].combine(store.run(l, xs, counts), state, x.dtype)
            if mode == "replicated":
                dist.all_reduce(y)
            x = torch.nn.functional.normalize(x + y, dim=-1)
        times.append(time.perf_counter() - t)
        if i >= WARMUP_STEPS:  # warm-up steps are timed but not counted
            tokens += len(rows)
        copies += ctx.stats.copies
        tl += ctx.stats.tokens
        remote += ctx.stats.remote_rows
    out = torch.tensor([float(sum(times[WARMUP_STEPS:])), float(tokens), float(copies), float(tl), float(remote)],
                       dtype=torch.float64)
    t_max = out[:1].clone()
    dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
    dist.all_reduce(out)
    return dict(step_s_median=float(np.median(times[WARMUP_STEPS:])), tokens_per_s=float(out[1] / t_max[0]),
                copies_per_token_layer=float(out[2] / out[3]), remote_rows_per_step=float(out[4] / len(batches)),
                remote_bytes_per_step=float(out[4] / len(batches) * args.hidden * 4),
                remote_bytes_per_step_dsv2lite_bf16=float(out[4] / len(batches) * 2048 * 2),
                tokens_per_step=float(out[3] / len(batches) / L),
                preplan={k: float(v) for k, v in ctx.preplan.items()} if mode.startswith("preplan") else None,
                # TP attention combines by an all-reduce of every token's row per layer (each rank sends
                # about (W-1)/W of it twice in a ring); alltoall combines by the reverse all-to-all
                allreduce_bytes_per_step=float(out[3] / len(batches) * args.hidden * 4 * 2 * (world - 1) / world)
                if mode == "replicated" else 0.0)


def run_deepspeed(rank, world, args, E, K, batches):
    import torch
    import torch.distributed as dist

    try:
        import deepspeed
        from deepspeed.moe.layer import MoE

        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.inter), torch.nn.SiLU(),
                                     torch.nn.Linear(args.inter, args.hidden))
        layers = [MoE(hidden_size=args.hidden, expert=expert, num_experts=E, ep_size=world, k=K,
                      drop_tokens=False, use_rts=False).eval() for _ in range(args.ds_layers)]
        times, tokens = [], 0
        with torch.no_grad():
            for i, rows in enumerate(batches):
                x = torch.randn(1, len(rows) // world, args.hidden)  # DS splits tokens over ranks (DP)
                dist.barrier()
                t = time.perf_counter()
                for layer in layers:
                    x = layer(x)[0]
                times.append(time.perf_counter() - t)
                if i >= WARMUP_STEPS:
                    tokens += x.shape[1]
        t = torch.tensor([sum(times[WARMUP_STEPS:])], dtype=torch.float64)
        n = torch.tensor([float(tokens)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        dist.all_reduce(n)
        return dict(k=K, layers=args.ds_layers, step_s_median=float(np.median(times[WARMUP_STEPS:])) * 26 / args.ds_layers,
                    tokens_per_s=float(n[0] / t[0]) * args.ds_layers / 26, note="scaled to 26 layers")
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}"[:2000])


def worker(rank: int, args) -> None:
    import torch
    import torch.distributed as dist

    from placement.plan import PlacementPlan
    from predictors.traces import load_trace

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tr = load_trace(args.eval)
    experts, weights = np.asarray(tr.experts), np.asarray(tr.weights)
    batches = replay_batches(tr.num_tokens, args.batch, args.steps)
    meta = json.loads(Path(args.plans).read_text())
    from moe_serve.distributed.forecast import load_forecaster
    from predictors.base import trace_tensors

    pred = load_forecaster(meta["_predictor"], tr.num_layers, tr.num_experts, tr.top_k)
    prev = trace_tensors(tr)[2:]  # previous token's experts, weights [T, L, K]
    rows = []
    for name in PLANS:
        plan = PlacementPlan.load(meta[name])
        for mode in MODES:
            r = run_ours(rank, world, args, plan, mode, experts, weights, batches, pred, prev)
            r.update(plan=name, mode=mode, predicted_fanout=predicted_fanout(plan, experts, batches, world,
                                                                               mode != "replicated"))
            rows.append(r)
    ds = run_deepspeed(rank, world, args, tr.num_experts, args.ds_k, batches) if not args.no_deepspeed else None
    if rank == 0:
        Path(args.out).write_text(json.dumps(dict(rows=rows, deepspeed_moe=ds), indent=1))
    dist.barrier()
    dist.destroy_process_group()


def build_plans(args, tmp: Path) -> dict:
    from placement.algorithms import get_algorithm
    from placement.stats import RoutingStats
    from predictors.traces import load_trace

    tr = load_trace(args.fit)
    st = RoutingStats.from_experts(tr.experts, tr.num_experts)
    spr = (tr.num_experts + args.redundant) // 2
    out, solve = {}, {}
    for name in PLANS:
        t = time.perf_counter()
        plan = get_algorithm(name)(st.load, 2, spr, coact=st.coact, transitions=st.trans,
                                   tokens=np.asarray(tr.experts))
        solve[name] = time.perf_counter() - t
        out[name] = str(tmp / f"{name}.json")
        plan.save(out[name])
    t = time.perf_counter()  # the dispatch forecaster, fitted on the same (other) trace as the plans
    from predictors import make_predictor

    pred = make_predictor(args.predictor, tr.num_layers, tr.num_experts, tr.top_k, lookahead=1).fit([tr])
    out["_predictor"] = str(tmp / f"{args.predictor}.safetensors")
    pred.save(out["_predictor"])
    solve["predictor_fit"] = time.perf_counter() - t
    return out, solve


def preplan_compare(rows: list[dict], world: int, steps: int) -> list[dict]:
    """Per plan, the two forecast sources side by side. Saved latency = skipped exchanges x the mean
    count-exchange latency measured in both runs of that plan (per rank and step)."""
    out = []
    for name in PLANS:
        runs = {r["mode"]: r for r in rows if r["plan"] == name and r.get("preplan")}
        n = sum(r["preplan"]["count_exchanges"] for r in runs.values())
        lat = sum(r["preplan"]["count_exchange_s"] for r in runs.values()) / max(n, 1)
        for mode, r in runs.items():
            p, per = r["preplan"], world * steps
            out.append(dict(plan=name, forecast="predictor" if mode == "preplan_predictor" else "previous step",
                            tokens_per_s=r["tokens_per_s"], step_s_median=r["step_s_median"],
                            count_exchanges=p["count_exchanges"], skipped=p["skipped"],
                            skipped_on_predictor=p["predictor_skipped"], overflow_blocks=p["overflow_blocks"],
                            overflow_blocks_on_predictor=p["predictor_overflow_blocks"],
                            padding_rows=p["padding_rows"], count_exchange_ms=1e3 * lat,
                            saved_ms_per_step=1e3 * p["skipped"] * lat / per,
                            predict_ms_per_step=1e3 * p["predict_s"] / per))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", default=str(SHARED / "dsv2lite_intent.npz"))
    ap.add_argument("--eval", default=str(SHARED / "dsv2lite_summary.npz"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=64)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--predictor", default="transition", help="predictors name fitted on --fit for preplan_predictor")
    ap.add_argument("--ds-k", type=int, default=6)
    ap.add_argument("--ds-layers", type=int, default=4)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "ep_dispatch.json"))
    ap.add_argument("--plans", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= WARMUP_STEPS:  # else every tok/s is a mean of nothing (nan)
        ap.error(f"--steps must be > {WARMUP_STEPS} (the first {WARMUP_STEPS} are warm-up), got {args.steps}")
    if args.worker is not None:
        worker(args.worker, args)
        return 0
    if not Path(args.eval).exists():
        print(f"ep_dispatch: trace {args.eval} not found (../shared is absent)", file=sys.stderr)
        return 2
    from moe_serve.distributed.endpoints import free_tcp_port

    tmp = Path(tempfile.mkdtemp(prefix="ep-bench-"))
    plans, solve = build_plans(args, tmp)
    (tmp / "plans.json").write_text(json.dumps(plans))
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_tcp_port()),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", LOCAL_SIZE="2")
    cmd = [sys.executable, __file__, "--plans", str(tmp / "plans.json")] + sys.argv[1:]
    procs = [subprocess.Popen(cmd + ["--worker", str(r)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    rc = 0
    try:
        for p in procs:
            rc |= p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rc = 1
        print(f"ep_dispatch: ranks did not finish within --timeout={args.timeout} s", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        from moe_serve.distributed.comm import shm_files

        for f in shm_files("127.0.0.1", env["MASTER_PORT"]):  # deepspeed.init_distributed leaves them
            os.remove(f)
    if rc:
        return 1
    doc = json.loads(Path(args.out).read_text())
    doc.update(solver_seconds=solve, fit=Path(args.fit).name, eval=Path(args.eval).name, batch=args.batch,
               steps=args.steps, hidden=args.hidden, inter=args.inter, redundant_slots=args.redundant,
               predictor=args.predictor, preplan_compare=preplan_compare(doc["rows"], 2, args.steps),
               machine=f"{platform.machine()} {os.cpu_count()} cores, 2 ranks x 1 thread, gloo, shared with other "
                       f"jobs (load average {os.getloadavg()[0]:.1f})")
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"{'plan':>11} {'mode':>10} {'tok/s':>8} {'copies':>7} {'predicted':>9} {'dispatch B/step':>15} "
          f"{'dsv2-lite B/step':>16} {'all-reduce B/step':>17}")
    for r in doc["rows"]:
        print(f"{r['plan']:>11} {r['mode']:>10} {r['tokens_per_s']:>8.0f} {r['copies_per_token_layer']:>7.3f} "
              f"{r['predicted_fanout']:>9.3f} {r['remote_bytes_per_step']:>15.0f} "
              f"{r['remote_bytes_per_step_dsv2lite_bf16']:>16.0f} {r['allreduce_bytes_per_step']:>17.0f}")
    print(f"\npre-planned all-to-all, forecast from the previous step vs the {args.predictor} predictor "
          "(per rank and step: saved = skipped count exchanges x their measured latency)")
    print(f"{'plan':>11} {'forecast':>13} {'tok/s':>6} {'exchanges':>9} {'skipped':>7} {'by pred':>7} "
          f"{'overflow':>8} {'padding':>7} {'exch ms':>7} {'saved ms':>8} {'predict ms':>10}")
    for c in doc["preplan_compare"]:
        print(f"{c['plan']:>11} {c['forecast']:>13} {c['tokens_per_s']:>6.0f} {c['count_exchanges']:>9.0f} "
              f"{c['skipped']:>7.0f} {c['skipped_on_predictor']:>7.0f} {c['overflow_blocks']:>8.0f} "
              f"{c['padding_rows']:>7.0f} {c['count_exchange_ms']:>7.2f} {c['saved_ms_per_step']:>8.2f} "
              f"{c['predict_ms_per_step']:>10.2f}")
    ds = doc["deepspeed_moe"]
    if ds:
        print("deepspeed MoE:", ds.get("error") or f"{ds['tokens_per_s']:.0f} tok/s (k={ds['k']}, {ds['note']})")
    print("written to", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
