"""Expert cache benchmark: (a) policies in trace replay, (b) end to end decode with offloaded experts.

    python benches/expert_cache.py [--part sim|e2e|all] [--tokens N] [--jobs 2]

(a) `moe-serve cache-sim`'s code on the DeepSeek-V2-Lite traces (../shared/traces), both domain
directions: every policy at 12.5%, 25% and 50% of experts resident; whatever a policy learns before
the replay (static hot set, the predicted policy's next-token prior (given, weighted 0 by default),
the cross-layer predictor from `predictors`, mlp_online by default (it also adapts to the replayed
trace, prequentially, its learning one 64-token chunk behind as the runtime's background learner),
lookahead 2 layers) is fitted on the OTHER domain. Cost model: DeepSeek-V2-Lite bf16
experts (17.3 MB), 25 GB/s host-to-device, 0.25 ms per MoE layer (H100-class batch-1 estimate).
Two oracles (replay only): belady (the demand hit-rate bound) and belady-prefetch (Belady's eviction
plus a prefetch of the experts the next 4 layer steps really use: the reference for ready in time).

(b) A routing-replayed Mixtral-architecture model of about 1.1 GB (random bf16 weights, 8 layers x
64 experts top-6 so the DeepSeek-V2-Lite routing replays unchanged; model layer l replays trace
layer l), decoded through `LLM` with `replay_trace`, computed in float32 on this CPU (no bf16
arithmetic here). Side by side in one process: all experts resident (reference); the no-cache
baseline (`OnDemandExpertStore`: every step copies each expert it needs into a device-side buffer,
synchronously, then computes: accelerate / vLLM cpu_offload behaviour, restricted to the routed
experts); the previous baseline (a 6-slot LRU offloading store); the offloading store with 25% of
experts resident (LRU, predicted, predicted-prefetch) with cpu-experts off (real copies: on CPU a
demand copy runs in the compute thread, prefetches in the copy thread; misses whose expert was not
used in the last token stream through a staging buffer, see moe_serve/experts/offload.py; LRU
also with every miss taking a slot, the store without that admission rule), and predicted with
cpu-experts auto (on a CPU-only machine: every miss computed where it lies, nothing copied). Each
configuration: a warm-up request, then `--repeat` timed requests of `--new-tokens` (the same trace
sequences for all). Greedy outputs must be identical in all configurations; the 1-minute load
average is recorded before and after each configuration.

`--lookahead N` reruns (a) with the predictor fitted and the policies predicting N MoE layers ahead
(default 2; `--capacities` picks the budgets); its table and JSON key (`results_lookahead<N>`) are
appended.

`--copy-order demand-first --policies lru,predicted-prefetch,belady` reruns (a) with prefetches
queued on the host so demand fetches overtake them, by need time (see moe_serve/experts/replay.py),
and appends that table: what the store's copy thread does on CPU; FIFO is what it does on CUDA.

Results: tables on stdout, JSON in benches/results/expert_cache.json (and expert_cache_sim.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = (ROOT / ".." / "shared").resolve()
RESULTS = ROOT / "benches" / "results"
DOMAINS = ("intent", "summary")
CAPACITIES = (0.125, 0.25, 0.5)
LOOKAHEAD = 2  # MoE layers ahead the predicted policies prefetch for


def sim_direction(replayed: str, fitted: str, tokens: int | None, policies=None, cost=None,
                  predictor_name: str = "mlp_online", lookahead: int = LOOKAHEAD, capacities=CAPACITIES,
                  prefetch_from: int = 1, predictor_params=None, learn_lag: int = 1) -> dict:
    """`cost`: CostModel fields other than their defaults (copy_order, bandwidth_gbps, prefetch_when).
    `prefetch_from`: the nearest layer ahead the predicted policies prefetch for.
    `predictor_params`: the predictor's own parameters (as `moe-serve predict fit --param`)."""
    from predictors.registry import make_predictor
    from predictors.traces import load_trace
    from moe_serve.experts.policies import POLICY_NAMES
    from moe_serve.experts.replay import CostModel
    from moe_serve.experts.simulate import simulate

    trace = load_trace(SHARED / "traces" / f"dsv2lite_{replayed}.npz")
    fit = load_trace(SHARED / "traces" / f"dsv2lite_{fitted}.npz")
    if tokens:
        trace = trace.select_sequences(range(int(np.searchsorted(trace.seq_offsets, tokens, side="right"))))
    torch.set_num_threads(1)
    # mlp_online adapts to the replayed trace as it goes (prequentially, see TracePredictions)
    predictor = make_predictor(predictor_name, fit.num_layers, fit.num_experts, fit.top_k, lookahead=lookahead,
                               **(predictor_params or {}))
    predictor.fit([fit])
    return simulate(trace, list(policies or POLICY_NAMES), capacities, CostModel(**(cost or {})),
                    predictor=predictor, fit_traces=[fit], lookahead=lookahead,
                    prefetch_from=prefetch_from, learn_lag=learn_lag,
                    log=lambda s: print(f"{replayed}<-{fitted}: {s}", flush=True))


def part_sim(tokens: int | None, jobs: int, policies=None, cost=None,
             predictor_name: str = "mlp_online", lookahead: int = LOOKAHEAD, capacities=CAPACITIES,
             prefetch_from: int = 1, prefetch_label: str = "1", predictor_params=None,
             learn_lag: int = 1) -> tuple[dict, str]:
    """Both directions: (results {trace: {capacity: {policy: metrics}}}, the header naming the variant)."""
    pairs = [(DOMAINS[0], DOMAINS[1]), (DOMAINS[1], DOMAINS[0])]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        outs = list(pool.map(sim_direction, [a for a, _ in pairs], [b for _, b in pairs], [tokens] * 2,
                             [policies] * 2, [cost] * 2, [predictor_name] * 2, [lookahead] * 2,
                             [tuple(capacities)] * 2, [prefetch_from] * 2, [predictor_params] * 2, [learn_lag] * 2))
    results = {f"{a} (fit on {b})": o for (a, b), o in zip(pairs, outs)}
    from moe_serve.experts.replay import CostModel

    model = CostModel(**(cost or {}))
    head = (f"copy order: {model.copy_order}, predictor: {predictor_name} (fitted on the other domain), "
            f"lookahead {lookahead} MoE layers")
    if {"bandwidth_gbps", "prefetch_when"} & set(cost or {}):
        head += f", {model.bandwidth_gbps:g} GB/s host-to-device, prefetch when {model.prefetch_when}"
    if prefetch_label != "1":
        head += f", prefetching from {prefetch_from} layers ahead ({prefetch_label})"
    if learn_lag != 1:
        head += f", online learning {learn_lag} chunks behind" if learn_lag else ", online learning inline"
    if predictor_params:
        head += ", predictor " + ", ".join(f"{k}={v}" for k, v in predictor_params.items())
    return results, head


def merge_capacities(old: dict | None, new: dict) -> dict:
    """A rerun of some budgets and policies replaces those and keeps the others:
    {trace: {capacity: {policy: metrics}}}."""
    merged = {t: {c: dict(row) for c, row in caps.items()} for t, caps in (old or {}).items()}
    for t, caps in new.items():
        for c, row in caps.items():
            merged.setdefault(t, {}).setdefault(c, {}).update(row)
    return {t: dict(sorted(caps.items(), key=lambda kv: float(kv[0]))) for t, caps in merged.items()}


def write_section(txt: Path, head: str, table: str, first: bool) -> None:
    """Put `table` under `head` in the text results: replacing the section with that head (the first
    section for the default run), else appended."""
    sections = [s for s in txt.read_text().strip("\n").split("\n\n") if s] if txt.exists() else []
    new = head + "\n" + table
    at = 0 if first and sections else next((i for i, s in enumerate(sections) if s.splitlines()[0] == head), None)
    if at is None:
        sections.append(new)
    else:
        sections[at] = new
    txt.write_text("\n\n".join(sections) + "\n")


# ---- (b) end to end --------------------------------------------------------------------------
E2E = dict(hidden_size=512, intermediate_size=704, num_hidden_layers=8, num_local_experts=64, num_experts_per_tok=6,
           num_attention_heads=8, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=4096)


def build_checkpoint(path: Path, shape: dict) -> Path:
    if (path / "config.json").exists():
        return path
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**shape, initializer_range=0.05, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2)
    model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def e2e_predictor(path: Path, fitted: str, layers: int) -> Path:
    """Transition predictor fitted on the other domain's first `layers` MoE layers, saved."""
    from predictors.baselines import TransitionPredictor
    from predictors.traces import RoutingTrace, load_trace

    fit = load_trace(SHARED / "traces" / f"dsv2lite_{fitted}.npz")
    cut = RoutingTrace(experts=fit.experts[:, :layers], weights=fit.weights[:, :layers], seq_offsets=fit.seq_offsets,
                       num_experts=fit.num_experts)
    TransitionPredictor(layers, fit.num_experts, fit.top_k, lookahead=1).fit([cut]).save(path)
    return path


def on_demand(resident):
    """The no-cache baseline over the resident store's tensors as the host tier (same bytes)."""
    from moe_serve.experts.ondemand import OnDemandExpertStore

    return OnDemandExpertStore(resident.gate_up, resident.down, resident.device)


def decode(model_dir: Path, trace: Path, new_tokens: int, repeat: int = 1, swap=None, **options) -> dict:
    """Warm-up on trace sequence 0, then `repeat` timed requests (trace sequences 1..repeat, the same
    for every configuration; the cache stays warm between them). tok/s = all timed tokens / their time."""
    from moe_serve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), replay_trace=str(trace), dtype="float32", kv_cache_gb=0.05, max_num_seqs=1,
              **options)
    if swap is not None:
        llm.engine.model.store = swap(llm.engine.model.store)
    load_s = time.perf_counter() - t0
    store = llm.engine.model.store
    load_before = os.getloadavg()
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompt = [1, 5, 9, 13]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up: trace seq 0
    if hasattr(store, "reset_metrics"):
        store.reset_metrics()
    walls, token_ids = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()  # each timed request replays the next trace sequence
        out = llm.generate([prompt], sp)[0]
        walls.append(time.perf_counter() - t0)
        token_ids.append(list(out.token_ids))
    metrics = store.metrics() if hasattr(store, "metrics") else {}
    if hasattr(store, "close"):
        store.close()
    wall = sum(walls)
    return dict(tokens_per_s=new_tokens * repeat / wall, seconds=wall, per_request_tok_s=[new_tokens / w for w in walls],
                load_s=load_s, token_ids=token_ids, loadavg_before=load_before, loadavg_after=os.getloadavg(),
                store=type(store).__name__, admit=getattr(store, "admit", None),
                **{k: metrics.get(k) for k in ("hit_rate", "copies", "streamed", "cpu_computed", "cpu_overflow",
                                               "stall_s", "capacity", "prefetch_precision", "prefetch_recall")})


def part_e2e(new_tokens: int, small: bool = False, repeat: int = 3) -> dict:
    # one compute thread: on this shared 2-core machine OpenMP's second thread makes a batch-1 expert
    # 1000x slower (spin-waits against other processes); the copier thread may use the other core
    torch.set_num_threads(1)
    tmp = Path(os.environ.get("MOE_BENCH_DIR", "/tmp/moe_serve_expert_cache_bench"))
    tmp.mkdir(parents=True, exist_ok=True)
    shape = dict(E2E, hidden_size=128, intermediate_size=176) if small else E2E
    model_dir = build_checkpoint(tmp / ("mixtral_small" if small else "mixtral_1g"), shape)
    trace = SHARED / "traces" / "dsv2lite_summary.npz"  # sequence 1 (timed): 1402 tokens
    pred = e2e_predictor(tmp / "transition_intent_8l.safetensors", "intent", E2E["num_hidden_layers"])
    total = E2E["num_hidden_layers"] * E2E["num_local_experts"]
    quarter = total // 4
    runs = {
        "resident (all experts in RAM)": {},
        "on-demand copy, no cache": dict(swap=on_demand),
        "6-slot LRU store": dict(expert_cache_slots=E2E["num_experts_per_tok"], cache_policy="lru",
                                              cpu_experts="off"),
        "offload 25% LRU, every miss takes a slot": dict(expert_cache_slots=quarter, cache_policy="lru",
                                                         cpu_experts="off", cache_admission="always"),
        "offload 25% LRU": dict(expert_cache_slots=quarter, cache_policy="lru", cpu_experts="off"),
        "offload 25% predicted": dict(expert_cache_slots=quarter, cache_policy="predicted", predictor=str(pred),
                                      cpu_experts="off"),
        "offload 25% predicted-prefetch": dict(expert_cache_slots=quarter, cache_policy="predicted-prefetch",
                                               predictor=str(pred), cpu_experts="off"),
        "offload 25% predicted, prefetch when idle": dict(expert_cache_slots=quarter, cache_policy="predicted",
                                                          predictor=str(pred), cpu_experts="off", prefetch_when="idle"),
        "offload 25% predicted-prefetch, when idle": dict(expert_cache_slots=quarter,
                                                          cache_policy="predicted-prefetch", predictor=str(pred),
                                                          cpu_experts="off", prefetch_when="idle"),
        "offload 25% predicted, cpu-experts auto": dict(expert_cache_slots=quarter, cache_policy="predicted",
                                                        predictor=str(pred), cpu_experts="auto"),
    }
    results = {}
    for name, opts in runs.items():
        results[name] = decode(model_dir, trace, new_tokens, repeat, **opts)
        r = results[name]
        print(f"{name:44s} {r['tokens_per_s']:7.2f} tok/s  hit {r['hit_rate'] if r['hit_rate'] is None else round(r['hit_rate'], 3)}"
              f"  copies {r['copies']}  stall {r['stall_s'] if r['stall_s'] is None else round(r['stall_s'], 2)} s", flush=True)
    lines = [f"{'configuration':44s} {'tok/s':>7s} {'x on-demand':>11s} {'hit':>6s} {'copies':>7s} {'streamed':>8s} "
             f"{'stall s':>8s} {'same tokens':>11s} {'load avg (1 min)':>16s}"]
    ref = results["resident (all experts in RAM)"]["token_ids"]
    base = results["on-demand copy, no cache"]["tokens_per_s"]
    for r in results.values():
        r["same_tokens_as_resident"] = r["token_ids"] == ref
        r["speedup_vs_on_demand"] = r["tokens_per_s"] / base
    for name, r in results.items():
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        stall = "-" if r["stall_s"] is None else f"{r['stall_s']:.2f}"
        lines.append(f"{name:44s} {r['tokens_per_s']:7.2f} {r['speedup_vs_on_demand']:11.2f} {hit:>6s} "
                     f"{str(r['copies'] if r['copies'] is not None else '-'):>7s} "
                     f"{str(r['streamed'] if r['streamed'] is not None else '-'):>8s} {stall:>8s} "
                     f"{str(r['same_tokens_as_resident']):>11s} "
                     f"{r['loadavg_before'][0]:7.2f} ->{r['loadavg_after'][0]:5.2f}")
    print("\n".join(lines))
    if not small:
        (RESULTS / "expert_cache_e2e.txt").write_text("\n".join(lines) + "\n")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return dict(checkpoint_bytes=size, config=shape, torch_threads=torch.get_num_threads(), new_tokens=new_tokens,
                repeat=repeat, slots_25pct=quarter, runs=results)


def main() -> int:
    from moe_serve.experts.replay import CostModel

    base = CostModel()  # the sim's default cost model: other values name a variant of the results
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("sim", "e2e", "all"), default="all")
    ap.add_argument("--tokens", type=int, default=None, help="replay only the first N tokens of each trace")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timed end-to-end request")
    ap.add_argument("--repeat", type=int, default=3, help="timed requests per end-to-end configuration")
    ap.add_argument("--small", action="store_true", help="a tiny e2e model (smoke test of the script)")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the two sim directions")
    ap.add_argument("--copy-order", choices=("fifo", "demand-first"), default=base.copy_order,
                    help="sim copy engine order; demand-first adds results_demand-first to the sim JSON")
    ap.add_argument("--policies", default=None, help="comma-separated sim policies (default: all)")
    ap.add_argument("--sim-predictor", default="mlp_online",
                    help="predictors registry name for the predicted policies (default: mlp_online; was transition)")
    ap.add_argument("--lookahead", type=int, default=LOOKAHEAD,
                    help=f"MoE layers ahead the sim's predicted policies predict and prefetch (default {LOOKAHEAD}); "
                         "another value adds results_lookahead<N> to the sim JSON")
    ap.add_argument("--bandwidth-gbps", type=float, default=base.bandwidth_gbps,
                    help=f"sim host-to-device GB/s (default {base.bandwidth_gbps:g}: PCIe 4.0 x16 in practice; the "
                         "H100 of benches/expert_offload_gpu.py measured 54.8); another value adds results_bw<GB/s>")
    ap.add_argument("--prefetch-when", choices=("always", "idle"), default=base.prefetch_when,
                    help="sim prefetches always, or only while the copy engine is idle (adds results_idle)")
    ap.add_argument("--prefetch-from", default="1",
                    help="the nearest layer ahead the sim's predicted policies prefetch for: N, or auto (copy time "
                         "over layer time, rounded up); another value than 1 adds results_..._from<N|auto>")
    ap.add_argument("--capacities", default=",".join(map(str, CAPACITIES)),
                    help="comma-separated fractions of experts resident for the sim (a rerun of some budgets "
                         "or policies replaces those in the results and keeps the others)")
    ap.add_argument("--learn-lag", type=int, default=1,
                    help="64-token chunks the sim predictor's online learning trails its predictions: 1 as the "
                         "runtime's background learner (default), 0 as inline learning (adds _lag<N>)")
    ap.add_argument("--sim-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter of the sim's predictor (as `moe-serve predict fit --param`), e.g. "
                         "online_steps=4; adds _<key><value> to the variant")
    args = ap.parse_args()
    if not (SHARED / "traces").is_dir():
        print(f"needs the shared traces in {SHARED / 'traces'}", file=sys.stderr)
        return 2
    machine = dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                   torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine}
    if args.part in ("sim", "all"):
        policies = args.policies.split(",") if args.policies else None
        capacities = tuple(float(c) for c in args.capacities.split(","))
        cost = {k: getattr(args, k) for k in ("copy_order", "bandwidth_gbps", "prefetch_when")
                if getattr(args, k) != getattr(base, k)}
        try:
            prefetch_from = CostModel(**cost).prefetch_from(args.prefetch_from)
        except ValueError as exc:
            ap.error(str(exc))
        from moe_serve.cli.flags import key_value_params

        try:
            params = key_value_params(args.sim_param)
        except ValueError as exc:
            ap.error(str(exc).replace("--param", "--sim-param"))
        if args.learn_lag < 0:
            ap.error(f"--learn-lag must be >= 0 chunks, got {args.learn_lag}")
        results, head = part_sim(args.tokens, args.jobs, policies, cost, args.sim_predictor, args.lookahead,
                                 capacities, prefetch_from, args.prefetch_from, params, args.learn_lag)
        path = RESULTS / "expert_cache_sim.json"
        variant = "_".join(v for v in (cost.get("copy_order", ""),
                                       f"lookahead{args.lookahead}" if args.lookahead != LOOKAHEAD else "",
                                       f"bw{args.bandwidth_gbps:g}" if "bandwidth_gbps" in cost else "",
                                       "idle" if "prefetch_when" in cost else "",
                                       f"from{args.prefetch_from}" if args.prefetch_from != "1" else "",
                                       *(f"{k}{v}" for k, v in params.items()),
                                       f"lag{args.learn_lag}" if args.learn_lag != 1 else "") if v)
        key = f"results_{variant}" if variant else "results"
        data = json.loads(path.read_text()) if path.exists() else {}
        if not variant:
            data.update(machine=machine, tokens=args.tokens, predictor=args.sim_predictor)
        data[key] = out["sim"] = merge_capacities(data.get(key), results)
        path.write_text(json.dumps(data, indent=1, default=float))
        from moe_serve.experts.simulate import format_table

        table = format_table(out["sim"])
        print(table)
        write_section(RESULTS / "expert_cache_sim.txt", head, table, first=not variant)
    if args.part in ("e2e", "all"):
        out["e2e"] = part_e2e(args.new_tokens, args.small, args.repeat)
        if args.small:
            return 0
        (RESULTS / "expert_cache.json").write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
