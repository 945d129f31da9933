"""Expert offload on one GPU: a Mixtral-8x7B-shaped bf16 model that does not fit, routing replayed.

    python benches/expert_offload_gpu.py [--tokens 32] [--hf-tokens 4] [--small] [--only lru,idle]

The model: Mixtral-8x7B's shape (32 layers, 8 experts top-2, hidden 4096, expert width 14336, 32 query
and 8 KV heads, vocab 32000) in bf16 with random weights: 256 experts of 352 MB (90.2 GB) and 3.3 GB
of the rest, 93.5 GB, more than an H100's 80 GB. The experts are made on the GPU and kept in pinned
host memory (one copy, page-locked with cudaHostRegister, shared by every configuration below: this
machine's disk could not hold a 93 GB checkpoint); the other weights are a real checkpoint directory
(config.json + safetensors) that moe-serve's loader and transformers both read. Routing: the
DeepSeek-V2-Lite summary trace replayed (`fit_routing`: ids mod 8, the two heaviest of six, model layer
l reads trace layer l mod 26); a warm-up request replays trace sequence 0, the timed one sequence 1.

Side by side in this process:
  * accelerate: transformers' MixtralForCausalLM over the same weights (its fused expert tensors are
    the very host tensors), dispatched with a device_map that puts every `mlp.experts` on "cpu":
    accelerate's offload, which copies a layer's experts module to the GPU in each forward (what
    `device_map="auto"` falls back to when a model does not fit). Its routers replay the same trace
    (`HFReplay`), though what it copies does not depend on routing (the whole module, every step).
  * on-demand: moe-serve's model with `OnDemandExpertStore`: each step copies only the experts it
    routes to, synchronously, keeps nothing (the no-cache baseline of benches/expert_cache.py).
  * the offloading store (`OffloadExpertStore`, StreamCopier) with 25%, 50% and as many experts
    resident as fit, per policy; `predicted*` use a transition predictor fitted on the OTHER domain
    (intent), lookahead 1 layer; and predicted-prefetch with `prefetch_when="idle"` (a prefetch starts
    only while no copy is in flight or queued, so it never delays a demand copy).
  * the PCIe bound of each: bytes it copied per token / the measured pinned host-to-device bandwidth.
moe-serve's configurations must all produce the on-demand run's tokens (the offloading store may not
change what the model computes). Before timing, transformers and moe-serve run one prefill on the same
weights, routed from the same trace, and their logits must agree within bf16 rounding: the two engines
hold the same model. (`expert_offload_gpu_session5.*` is the first H100 run, before the fixes its
`notes` list and before the host-overhead and attention changes of docs/expert_cache.md.)

`--only` runs the moe-serve rows whose names contain one of its comma-separated strings (and the
on-demand row, which the others are measured against); `--hf-tokens 0` leaves transformers out.
Results: a table on stdout, JSON in benches/results/expert_offload_gpu.json (the rows so far in
`.partial.json` after each row, in case a run is cut short). `--small` runs a tiny
shape (on the CPU when there is no GPU) to check the script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = (ROOT / ".." / "shared").resolve()
RESULTS = ROOT / "benches" / "results"

from moe_serve.timing import synchronize  # noqa: E402
from moe_serve.tracing.replay import TraceReplay  # noqa: E402

MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_local_experts=8,
                    num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                    max_position_embeddings=4096, rope_theta=1e6)
SMALL = dict(MIXTRAL_8X7B, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024)
STD = 0.02  # transformers' initializer_range
PROMPT = [1, 415, 330, 302, 272, 926, 349, 556]  # ids below the small shape's vocab too


# ---- the weights ------------------------------------------------------------------------------
def host_experts(shape: dict, device: torch.device, seed: int = 0):
    """Random bf16 experts stacked per layer in host memory: gate_up [E, 2I, H], down [E, H, I] per
    layer, page-locked when there is a GPU (cudaHostRegister: exact sizes, where pin_memory=True
    would round each tensor up to a power of two). Generated on the compute device, copied down."""
    L, E, H, I = (shape[k] for k in ("num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size"))
    gen = torch.Generator(device).manual_seed(seed)
    gate_up, down = [], []
    for _ in range(L):
        for dst_shape, out in (((E, 2 * I, H), gate_up), ((E, H, I), down)):
            t = torch.empty(dst_shape, dtype=torch.bfloat16)
            if device.type == "cuda":
                err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister failed ({err}) for {t.numel() * 2 / 1e9:.1f} GB")
            t.copy_(torch.randn(dst_shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(STD))
            out.append(t)
    return gate_up, down


def write_dense_checkpoint(path: Path, shape: dict, device: torch.device, seed: int = 1) -> Path:
    """config.json + model.safetensors with every weight but the experts (random bf16, norms 1)."""
    from safetensors.torch import save_file
    import transformers

    from moe_serve.models.checkpoint import read_config
    from moe_serve.models.families import parse_spec
    from moe_serve.models.model import MoEModel

    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.MixtralConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(path)
    family, spec = parse_spec(read_config(path))
    with torch.device("meta"):
        model = MoEModel(spec)
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(tuple(p.shape), generator=gen, device=device, dtype=torch.bfloat16).mul_(STD).cpu()
        tensors[family.checkpoint_key(name)] = t
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def fitted_trace(name: str, layers: int, experts: int, top_k: int):
    """A shared trace mapped to the model's shape the way replay maps it (ids mod E, layers mod L)."""
    from moe_serve.tracing.replay import fit_routing
    from predictors.traces import RoutingTrace, load_trace

    tr = load_trace(SHARED / "traces" / f"dsv2lite_{name}.npz")
    ids, w = fit_routing(tr.experts, tr.weights, experts, top_k)
    pick = [l % tr.num_layers for l in range(layers)]
    return RoutingTrace(experts=ids[:, pick].astype(np.int16), weights=w[:, pick].astype(np.float16),
                        seq_offsets=tr.seq_offsets, num_experts=experts)


# ---- transformers + accelerate ----------------------------------------------------------------
class HFReplay:
    """Routes transformers' Mixtral from `trace` (already fitted to the model's shape) as moe-serve's
    TraceReplay does: after `start(s)`, every router returns the experts and weights of rows 0, 1, ...
    of trace sequence s (its own logits too, which nothing reads). So both engines compute the same
    experts for the same tokens, and their outputs differ by float rounding alone."""

    def __init__(self, model, trace):
        cfg = model.config
        # moe-serve's replay itself: its per-layer ids/weights [T, K] and its non-empty sequences
        self.trace = TraceReplay(trace, cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
        self.start(0)
        for layer, block in enumerate(model.model.layers):
            block.mlp.gate.forward = self._routed(layer, block.mlp.gate.forward)

    def start(self, seq: int) -> None:
        self.offset, self.length = self.trace.seqs[seq % len(self.trace.seqs)]
        self.pos = [0] * len(self.trace.experts)

    def _routed(self, layer: int, router_forward):
        def forward(hidden):
            logits, scores, index = router_forward(hidden)  # [N, E], [N, K], [N, K]
            n = logits.shape[0]
            rows = self.offset + (self.pos[layer] + torch.arange(n)) % self.length
            self.pos[layer] += n
            return (logits, self.trace.weights[rows, layer].to(scores.device, scores.dtype),
                    self.trace.experts[rows, layer].to(index.device, index.dtype))
        return forward


def hf_model(ckpt: Path, gate_up, down, device: torch.device, trace):
    """transformers' Mixtral over the same weights, routed from `trace` (HFReplay, as `.replay`); its
    experts modules offloaded by accelerate."""
    from accelerate import dispatch_model
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    disk = load_file(str(ckpt / "model.safetensors"), device=str(device))
    state = {}
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            layer = int(name.split(".")[2])
            state[name] = gate_up[layer] if name.endswith("gate_up_proj") else down[layer]
        else:
            key = next(k for k in (name, name.replace(".mlp.gate.", ".block_sparse_moe.gate.")) if k in disk)
            state[name] = disk[key]
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"{name}: {tuple(state[name].shape)} != {tuple(p.shape)}")
    model.load_state_dict(state, assign=True, strict=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)  # its buffers were made on meta
    model.eval()
    model.replay = HFReplay(model, trace)
    if device.type != "cuda":
        return model
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    for i in range(cfg.num_hidden_layers):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
            device_map[f"model.layers.{i}.{part}"] = 0
        device_map[f"model.layers.{i}.mlp.experts"] = "cpu"
    return dispatch_model(model, device_map=device_map, main_device=0)


@torch.inference_mode()
def hf_decode(model, device: torch.device, n: int) -> dict:
    """Greedy decode replaying trace sequence 1 (the one moe-serve's timed runs replay)."""
    ids = torch.tensor([PROMPT], device=device)
    model.generation_config.eos_token_id = None  # always n tokens
    model.generation_config.pad_token_id = 0
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
    model.replay.start(0)
    model.generate(ids, max_new_tokens=n + 1, **kw)  # warm-up over the timed lengths (cuDNN's attention
    # builds a plan per new length, ~40 ms each on an H100, which transformers' SDPA call meets)
    synchronize(device)
    model.replay.start(1)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    synchronize(device)
    model.replay.start(1)
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n + 1, **kw)
    synchronize(device)
    t2 = time.perf_counter()
    per_token = (t2 - t1 - (t1 - t0)) / n  # the n decode steps: the run of n+1 tokens minus the prefill run
    return dict(s_per_token=per_token, tokens_per_s=1 / per_token, prefill_s=t1 - t0,
                token_ids=out[0, len(PROMPT):].tolist())


# ---- moe-serve --------------------------------------------------------------------------------
def load_ours(ckpt: Path, factory, device: torch.device, trace=None):
    from moe_serve.models import load_model
    from moe_serve.models.hooks import NO_HOOKS

    hooks = NO_HOOKS
    if trace is not None:
        from moe_serve.models.checkpoint import read_config
        from moe_serve.models.families import parse_spec

        _, spec = parse_spec(read_config(ckpt))
        hooks = TraceReplay(trace, spec.num_moe_layers, spec.num_experts, spec.top_k)
    # load_model chains a predicting store's routing hook after the replay; the experts come from host
    # memory (the factory), not from the checkpoint, which holds the other weights only
    model = load_model(ckpt, dtype="bfloat16", device=device, hooks=hooks, expert_store_factory=factory,
                       check_experts=False)
    model.allocate_kv_cache(1, 512)
    return model


def greedy(model, seq_id: int, n: int, device: torch.device, store=None) -> tuple[list[int], float, torch.Tensor]:
    """Prefill PROMPT as engine sequence `seq_id` (replay: its trace sequence), then n greedy decode
    steps: (tokens, seconds of the decode steps, first logits). `store`'s metrics are reset after the
    prefill, so they count the timed decode steps alone."""
    from moe_serve.models import ForwardBatch

    def batch(tokens, ctx):
        return ForwardBatch(token_ids=torch.tensor(tokens), positions=torch.arange(ctx, ctx + len(tokens)),
                            slot_ids=[0], query_lens=[len(tokens)], context_lens=[ctx], seq_ids=[seq_id])

    logits = model(batch(PROMPT, 0))
    first, ctx, toks = logits[0].float().cpu(), len(PROMPT), []
    if store is not None and hasattr(store, "reset_metrics"):
        store.reset_metrics()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        toks.append(int(logits[0].argmax()))  # a host sync per step, as an engine's sampler has
        logits = model(batch([toks[-1]], ctx))
        ctx += 1
    synchronize(device)
    return toks, time.perf_counter() - t0, first


def run_ours(name, ckpt, factory, device, trace, n_warm, n, bandwidth) -> dict:
    model = load_ours(ckpt, factory, device, trace)
    store = model.store
    greedy(model, 0, n_warm, device)  # warm-up: trace sequence 0 fills the cache
    toks, secs, _ = greedy(model, 1, n, device, store)
    m = store.metrics()
    moved = m["bytes_moved"] / n
    r = dict(tokens_per_s=n / secs, s_per_token=secs / n, token_ids=toks, bytes_per_token=moved,
             pcie_bound_s_per_token=moved / bandwidth, hit_rate=m["hit_rate"], copies=m["copies"],
             capacity=m.get("capacity"), stall_s=m.get("stall_s"), cpu_computed=m.get("cpu_computed"),
             cpu_overflow=m.get("cpu_overflow"),  # misses run on the host for want of a free slot (not by choice)
             prefetch_precision=m.get("prefetch_precision"), prefetch_recall=m.get("prefetch_recall"),
             device_bytes=store.nbytes())
    r["fraction_of_pcie_bound"] = r["pcie_bound_s_per_token"] / r["s_per_token"]
    print(f"{name:56s} {r['tokens_per_s']:7.2f} tok/s  hit {r['hit_rate']:.3f}  {moved / 1e9:6.2f} GB/token  "
          f"{r['fraction_of_pcie_bound']:.2f} of the PCIe bound", flush=True)
    if hasattr(store, "close"):
        store.close()
    del model, store
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def transformers_side(ckpt, gate_up, down, device, replayed, hf_tokens: int) -> tuple[dict, dict]:
    """The same model in both engines (one prefill routed from the same trace: logits within bf16
    rounding, the engines' kernels differ), then transformers + accelerate's timed decode."""
    from moe_serve.experts.ondemand import OnDemandExpertStore

    hf = hf_model(ckpt, gate_up, down, device, replayed)
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([PROMPT], device=device)).logits[0, -1].float().cpu()
    ours = load_ours(ckpt, lambda spec, source, dtype, dev: OnDemandExpertStore(gate_up, down, dev), device, replayed)
    _, _, our_logits = greedy(ours, 0, 0, device)
    del ours
    scale = float(hf_logits.abs().max())
    diff = float((hf_logits - our_logits).abs().max())
    same_model = dict(same_next_token=int(hf_logits.argmax()) == int(our_logits.argmax()), max_abs_logit_diff=diff,
                      logit_scale=scale, within_rounding=diff <= 0.05 * scale)
    print(f"same weights in both engines: {same_model}", flush=True)
    row = hf_decode(hf, device, hf_tokens)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return same_model, row


def measure_h2d(host: torch.Tensor, device: torch.device, reps: int = 5) -> float:
    """Bytes/s of host-to-device copies of `host` (one expert's gate_up)."""
    dst = torch.empty(host.shape, dtype=host.dtype, device=device)
    dst.copy_(host)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(host, non_blocking=True)
    synchronize(device)
    return host.numel() * host.element_size() * reps / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per moe-serve configuration")
    ap.add_argument("--warm-tokens", type=int, default=16, help="warm-up decode steps (trace sequence 0)")
    ap.add_argument("--hf-tokens", type=int, default=4, help="timed decode steps of transformers + accelerate")
    ap.add_argument("--small", action="store_true", help="a tiny shape, to check the script (CPU without a GPU)")
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers of the full widths (e.g. 2: checks the full shape on a CPU in ~7 GB)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the moe-serve rows naming one")
    ap.add_argument("--workdir", default=os.environ.get("MOE_BENCH_DIR", "/tmp/moe_serve_offload_gpu"))
    ap.add_argument("--out", default=str(RESULTS / "expert_offload_gpu.json"))
    args = ap.parse_args()
    if not (SHARED / "traces").is_dir():
        print(f"needs the shared traces in {SHARED / 'traces'}", file=sys.stderr)
        return 2
    from moe_serve.config import ExpertCacheConfig
    from moe_serve.experts.factory import expert_store_factory
    from moe_serve.experts.ondemand import OnDemandExpertStore
    from moe_serve.experts.store import StackedExperts
    from predictors.baselines import TransitionPredictor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not (args.small or args.layers):
        print("the full shape needs a GPU (use --small or --layers to check the script)", file=sys.stderr)
        return 2
    shape = dict(SMALL if args.small else MIXTRAL_8X7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    L, E, K = shape["num_hidden_layers"], shape["num_local_experts"], shape["num_experts_per_tok"]
    work = Path(args.workdir) / f"{'small' if args.small else 'mixtral_8x7b'}_{L}l"
    t0 = time.perf_counter()
    ckpt = write_dense_checkpoint(work, shape, device)
    gate_up, down = host_experts(shape, device)
    host = StackedExperts(gate_up, down)
    expert_bytes = (gate_up[0][0].numel() + down[0][0].numel()) * 2
    setup_s = time.perf_counter() - t0
    bandwidth = measure_h2d(gate_up[0][0], device)
    total_experts = L * E
    dense_bytes = (ckpt / "model.safetensors").stat().st_size
    import accelerate
    import transformers

    machine = dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                   transformers=transformers.__version__, accelerate=accelerate.__version__,
                   device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                   device_memory=torch.cuda.mem_get_info()[1] if device.type == "cuda" else None)
    print(f"{machine['device']}: experts {total_experts} x {expert_bytes / 1e6:.0f} MB = "
          f"{total_experts * expert_bytes / 1e9:.1f} GB in host memory, the rest {dense_bytes / 1e9:.2f} GB; "
          f"pinned host-to-device {bandwidth / 1e9:.1f} GB/s; setup {setup_s:.0f} s", flush=True)

    replayed = fitted_trace("summary", L, E, K)
    results, same_model = {}, None
    if args.hf_tokens > 0:  # 0: no transformers at all (a run of some moe-serve rows, against on-demand only)
        same_model, row = transformers_side(ckpt, gate_up, down, device, replayed, args.hf_tokens)
        row["bytes_per_token"] = total_experts * expert_bytes  # every experts module, every step
        row["pcie_bound_s_per_token"] = row["bytes_per_token"] / bandwidth
        row["fraction_of_pcie_bound"] = row["pcie_bound_s_per_token"] / row["s_per_token"]
        results["transformers + accelerate offload"] = row
        print(f"{'transformers + accelerate offload':56s} {row['tokens_per_s']:7.2f} tok/s  "
              f"{row['bytes_per_token'] / 1e9:6.2f} GB/token  {row['fraction_of_pcie_bound']:.2f} of the PCIe bound",
              flush=True)

    pred_path = work / "transition_intent.safetensors"
    TransitionPredictor(L, E, K, lookahead=1).fit([fitted_trace("intent", L, E, K)]).save(pred_path)
    runs = {"on-demand copy, no cache": lambda spec, source, dtype, dev: OnDemandExpertStore(gate_up, down, dev)}
    if device.type == "cuda":  # as many slots as fit next to the dense weights, with 6 GB to spare
        free = torch.cuda.mem_get_info()[0] - dense_bytes - 6 * 2**30
        max_slots = min(int(free // expert_bytes), total_experts - 1)
    else:
        max_slots = total_experts * 3 // 4
    budgets = [("25%", total_experts // 4), ("50%", total_experts // 2),
               (f"{max_slots / total_experts:.0%} (all that fit)", max_slots)]
    for label, slots in budgets:
        policies = ("lru", "predicted", "predicted-prefetch") if slots < max_slots or label.startswith("25") \
            else ("lru", "predicted-prefetch")
        for policy in policies:
            cfg = ExpertCacheConfig(expert_cache_slots=slots, cache_policy=policy, cpu_experts="off",
                                    predictor=str(pred_path) if policy != "lru" else None, host_memory="copy")
            runs[f"offload {label} {policy}"] = cfg
        runs[f"offload {label} predicted-prefetch, when idle"] = ExpertCacheConfig(
            expert_cache_slots=slots, cache_policy="predicted-prefetch", cpu_experts="off", predictor=str(pred_path),
            host_memory="copy", prefetch_when="idle")
    runs["offload 25% predicted, cpu-experts auto"] = ExpertCacheConfig(
        expert_cache_slots=total_experts // 4, cache_policy="predicted", predictor=str(pred_path), cpu_experts="auto")
    only = [o for o in args.only.split(",") if o]
    for name, what in runs.items():
        if only and name != "on-demand copy, no cache" and not any(o in name for o in only):
            continue  # the on-demand row always runs: the others are measured against it
        if isinstance(what, ExpertCacheConfig):
            inner = expert_store_factory(what)
            factory = lambda spec, source, dtype, dev, inner=inner: inner(spec, host, dtype, dev)  # noqa: E731
        else:
            factory = what
        results[name] = run_ours(name, ckpt, factory, device, replayed, args.warm_tokens, args.tokens, bandwidth)
        if not args.small:  # the rows so far, in case the run is cut short
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(results, default=float))

    lines = [f"{'configuration':56s} {'tok/s':>7s} {'x accel.':>8s} {'x on-dem.':>9s} {'hit':>6s} {'GB/token':>8s} "
             f"{'PCIe-bound tok/s':>16s} {'of bound':>8s} {'same tokens':>11s}"]
    acc = results.get("transformers + accelerate offload", {}).get("tokens_per_s")
    for name, r in results.items():
        ref = results["on-demand copy, no cache"]
        n = min(len(r["token_ids"]), len(ref["token_ids"]))
        r["same_tokens_as_on_demand"] = r["token_ids"][:n] == ref["token_ids"][:n]
        hit = "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.3f}"
        bound = 1 / r["pcie_bound_s_per_token"] if r["pcie_bound_s_per_token"] else float("inf")
        x_acc = f"{r['tokens_per_s'] / acc:8.1f}" if acc else f"{'-':>8s}"
        lines.append(f"{name:56s} {r['tokens_per_s']:7.2f} {x_acc} {r['tokens_per_s'] / ref['tokens_per_s']:9.2f} "
                     f"{hit:>6s} {r['bytes_per_token'] / 1e9:8.2f} {bound:16.2f} {r['fraction_of_pcie_bound']:8.2f} "
                     f"{str(r['same_tokens_as_on_demand']):>11s}")
    print("\n".join(lines))
    out = dict(machine=machine, shape=shape, expert_bytes=expert_bytes, dense_bytes=dense_bytes,
               h2d_bandwidth_bytes_per_s=bandwidth, setup_s=setup_s, tokens=args.tokens, warm_tokens=args.warm_tokens,
               hf_tokens=args.hf_tokens, same_model_check=same_model, table=lines, results=results)
    if not args.small:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=float))
        (Path(args.out).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    # moe-serve's stores must agree exactly; transformers' tokens are reported (bf16 rounding may flip a near tie)
    ok = (same_model is None or same_model["within_rounding"]) and all(r["same_tokens_as_on_demand"] for name, r in results.items()
                                               if not name.startswith("transformers") and "cpu-experts" not in name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
