"""moe-serve vs transformers `generate`: same checkpoint, same prompts, greedy, identical outputs required.

    python benches/engine_vs_hf.py [--models default,mixtral1g] [--quick]

For each checkpoint (the default model when present; a random Mixtral-shaped bf16 model of about
1 GB, built here and saved in a temp dir) and each workload (1 request; 16 requests of mixed prompt
and output lengths), both engines are timed side by side in this one process:
  * moe-serve: `LLM.generate` with all requests at once (continuous batching);
  * transformers, sequential: one `generate` per request (batch 1) -- the reference outputs;
  * transformers, batched (16 requests only): one `generate` over all prompts with left padding,
    running to the longest requested output, each row then cut to its own length. The speedup at
    16 requests is quoted against the faster of the two transformers runs.
Every moe-serve output must equal transformers' sequential output token for token (mismatches are
listed and make the script exit 1). Both engines compute in `--dtype`, default float32 (the bf16
checkpoints upcast at load by both). Why not bf16 on this CPU: it has no bf16 arithmetic
(no avx512_bf16), so a bf16 matmul of 16 rows costs ~7x one of 1 row and batching buys little; and bf16
results depend on the batch shape (different kernels, different rounding), enough to flip greedy
near-ties: on the 1 GB model transformers' own batched bf16 generate disagrees with its own
sequential one on 7 of the 16 requests. moe-serve's bf16 path matches transformers' op for op at
batch 1 (`--dtype auto` shows it), but no engine's batched bf16 output equals a batch-1 run. EOS is ignored on both sides (`ignore_eos`; transformers with no
eos id), so every request produces exactly its requested length.

Memory-bandwidth bound: the machine's copy bandwidth is measured with a large tensor copy (bytes
read + written per second). For each moe-serve forward step we count the weight bytes it must
read: every non-expert weight (attention, norms, routers, lm_head; one embedding row per token)
plus each MoE layer's *distinct* experts routed to in that step (counted by a router hook). The
bound time is the sum over steps divided by the bandwidth; each engine's fraction of the bound is
bound time / its wall time (transformers needs the same minimum bytes for the same outputs). Weights
count at the compute dtype's width; moe-serve's fraction is also given with them at the checkpoint's
stored width (`stored`), since the compiled step reads bf16 copies of a bf16 checkpoint's experts.
Results: a table on stdout, JSON in benches/results/engine_vs_hf.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_serve import LLM, SamplingParams  # noqa: E402
from moe_serve.config import DEFAULT_MODEL  # noqa: E402
from moe_serve.models.hooks import HookChain, RouterHooks  # noqa: E402


def copy_bandwidth(nbytes: int = 512 * 2**20, reps: int = 10) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of `reps`."""
    x = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)  # touched once: the timed copies fault no pages
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def build_mixtral_1g(out: Path) -> Path:
    """Random Mixtral-shaped bf16 checkpoint, about 1 GB: H=1024, 8 experts of I=3584, top-2, 5 layers.

    transformers' default init (std 0.02), except lm_head scaled x20: the random logits are then peaked
    (fewer greedy near-ties for rounding differences to flip), the layers as tame as a default init.
    """
    from transformers import AutoModelForCausalLM, MixtralConfig

    if (out / "config.json").exists():
        return out
    cfg = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=5,
                        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False,
                        eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


class StepBytes(RouterHooks):
    """Counts forward steps and, per step, the distinct experts each MoE layer is routed to (no host sync)."""

    active = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.steps = 0
        self.tokens = 0
        self.distinct = torch.zeros((), dtype=torch.long)  # summed over steps and layers

    def begin_step(self, batch):
        self.steps += 1
        self.tokens += batch.num_tokens

    def route(self, moe_layer, hidden, expert_ids, weights):
        self.distinct += (torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts) > 0).sum()


def weight_bytes(model) -> tuple[int, int, int]:
    """(non-expert bytes read every step, bytes of one expert, embedding row bytes)."""
    spec = model.spec
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    emb = model.embed_tokens.weight
    row = emb.shape[1] * emb.element_size()
    if spec.tie_word_embeddings:
        dense += emb.numel() * emb.element_size()
    store = model.store
    expert = (store.gate_up[0][0].numel() + store.down[0][0].numel()) * store.gate_up[0].element_size()
    return dense, expert, row


def workloads(vocab: int, tokenizer, quick: bool) -> dict[str, list[tuple[list[int], int]]]:
    """name -> [(prompt ids, output length)]; prompts from real text when a tokenizer exists."""
    rng = np.random.default_rng(0)
    corpus = ROOT / ".." / "shared" / "corpus" / "wikipedia_sample.txt"
    lines = []
    if tokenizer is not None and tokenizer.available and corpus.exists():
        lines = [ln for ln in corpus.read_text(errors="ignore").splitlines() if len(ln) > 400][:64]

    def prompt(n: int, i: int) -> list[int]:
        if lines:
            return tokenizer.encode(lines[i % len(lines)])[:n]
        return rng.integers(3, vocab, size=n).tolist()

    n_multi = 16
    out_single = 32 if quick else 64
    lens = [(int(rng.integers(8, 97)), int(rng.integers(8 if quick else 16, 33 if quick else 65))) for _ in range(n_multi)]
    return {
        "1 request": [(prompt(32, 0), out_single)],
        f"{n_multi} requests": [(prompt(p, i + 1), o) for i, (p, o) in enumerate(lens)],
    }


def run_moe_serve(llm: LLM, work):
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    llm.generate([p for p, _ in work][:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params)
    return time.perf_counter() - t, [o.token_ids for o in outs]


def count_step_bytes(llm: LLM, work, counter: StepBytes) -> None:
    """One more, untimed run with the byte counter hooked in (the timed runs carry no bench hook;
    the schedule is deterministic, so the steps and routed experts are those of the timed runs)."""
    model = llm.engine.model
    plain = model.hooks
    counter.steps, counter.tokens = 0, 0
    counter.distinct.zero_()
    model.hooks = HookChain([plain, counter])
    try:
        llm.generate([p for p, _ in work], [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work])
    finally:
        model.hooks = plain


def run_hf_sequential(hf, work):
    hf.generate(torch.tensor([work[0][0]]), max_new_tokens=2, do_sample=False)  # warm-up
    outs, t = [], time.perf_counter()
    for ids, n in work:
        y = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=n, do_sample=False)
        outs.append(y[0, len(ids):].tolist())
    return time.perf_counter() - t, outs


def run_hf_batched(hf, work, pad_id: int):
    longest = max(len(p) for p, _ in work)
    ids = torch.full((len(work), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(work):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    t = time.perf_counter()
    y = hf.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in work), do_sample=False)
    elapsed = time.perf_counter() - t
    return elapsed, [y[i, longest:longest + n].tolist() for i, (_, n) in enumerate(work)]


def bench_model(name: str, model_dir: Path, quick: bool, bw: float, dtype: str, repeats: int = 2,
                compile_decode: bool = False, compile_max_batch: int | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = []
    llm = LLM(model=str(model_dir), dtype=dtype, max_num_seqs=16, max_model_len=256, kv_cache_gb=1.0,
              expert_load_stats=False, compile_decode=compile_decode, compile_max_batch=compile_max_batch)
    model = llm.engine.model
    max_batch = model.compiled.max_batch if model.compiled is not None else 0
    tuned = model.compiled.tuned if model.compiled is not None else {}
    if compile_decode:
        print(f"  {name}: compiled decode up to batch {max_batch}" + (f" (timed: {tuned})" if tuned else ""), flush=True)
    counter = StepBytes(model.spec.num_experts)
    dense, expert, row = weight_bytes(model)
    # A bf16 checkpoint computed in fp32 could be read at half the bytes (the compiled step gathers its
    # experts so): the bound at the stored width is this ratio times the one at the compute width.
    stored = json.loads((model_dir / "config.json").read_text()).get("dtype") or "float32"
    stored_ratio = min(1.0, torch.finfo(getattr(torch, stored)).bits / torch.finfo(model.dtype).bits)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model.dtype).eval()  # the same compute dtype
    hf.generation_config.eos_token_id = None  # ignore EOS, like ignore_eos=True
    hf.generation_config.pad_token_id = 0
    for wname, work in workloads(model.spec.vocab_size, llm.tokenizer, quick).items():
        n_out = sum(n for _, n in work)
        compiled_before = model.compiled.steps if model.compiled is not None else 0
        # moe-serve and transformers-batched alternate, best of `repeats` each (the CPU is shared: this
        # keeps a burst of someone else's load from deciding the ratio); sequential runs once
        t_ms, t_bat = float("inf"), float("inf") if len(work) > 1 else None
        for _ in range(repeats):
            t, ours = run_moe_serve(llm, work)
            t_ms = min(t_ms, t)
            if t_bat is not None:
                with torch.inference_mode():
                    t, bat = run_hf_batched(hf, work, 0)
                t_bat = min(t_bat, t)
        bat = bat if t_bat is not None else None
        count_step_bytes(llm, work, counter)
        steps, distinct = counter.steps, int(counter.distinct)
        bytes_min = steps * dense + distinct * expert + counter.tokens * row
        bound_s = bytes_min / bw  # weights at the compute dtype's width, as both engines hold them
        with torch.inference_mode():  # at 1 request this is the baseline: best of `repeats` too
            t_seq = float("inf")
            for _ in range(repeats if len(work) == 1 else 1):
                t, ref = run_hf_sequential(hf, work)
                t_seq = min(t_seq, t)
        mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
        hf_best = min(t for t in (t_seq, t_bat) if t is not None)
        r = dict(model=name, dtype=str(model.dtype).replace("torch.", ""), workload=wname, requests=len(work),
                 compiled_decode_max_batch=max_batch, compiled_decode_tuned=tuned,
                 compiled_steps=(model.compiled.steps if model.compiled is not None else 0) - compiled_before,
                 output_tokens=n_out,
                 prompt_tokens=sum(len(p) for p, _ in work), moe_serve_s=t_ms, hf_sequential_s=t_seq,
                 hf_batched_s=t_bat, moe_serve_tok_s=n_out / t_ms, hf_sequential_tok_s=n_out / t_seq,
                 hf_batched_tok_s=None if t_bat is None else n_out / t_bat, speedup=hf_best / t_ms,
                 baseline="hf sequential" if hf_best == t_seq else "hf batched (left padding)",
                 steps=steps, weight_bytes_read_min=bytes_min, bound_s=bound_s,
                 moe_serve_bw_fraction=bound_s / t_ms, hf_bw_fraction=bound_s / hf_best,
                 stored_width_bytes_ratio=stored_ratio, moe_serve_bw_fraction_stored=bound_s * stored_ratio / t_ms,
                 identical=not mismatches, mismatched_requests=mismatches,
                 hf_batched_mismatches_vs_sequential=None if bat is None else
                 [i for i, (a, b) in enumerate(zip(bat, ref)) if a != b])
        for i in mismatches:
            a, b = ours[i], ref[i]
            first = next(j for j in range(min(len(a), len(b))) if a[j] != b[j]) if a[:len(b)] != b[:len(a)] else min(len(a), len(b))
            print(f"  MISMATCH {name} {wname} request {i}: first differing output token {first}", file=sys.stderr)
        rows.append(r)
        print(f"  {name:>10} {wname:>12}: moe-serve {r['moe_serve_tok_s']:8.1f} tok/s, hf seq "
              f"{r['hf_sequential_tok_s']:8.1f}, hf batched {r['hf_batched_tok_s'] or float('nan'):8.1f}, "
              f"x{r['speedup']:.2f}, identical={r['identical']}", flush=True)
    llm.close()
    del hf
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,mixtral1g", help="comma list: default, mixtral1g, or a checkpoint dir")
    ap.add_argument("--quick", action="store_true", help="shorter outputs (a smoke run)")
    ap.add_argument("--dtype", default="float32", help="compute dtype of both engines: float32 (default), "
                                                        "auto (the checkpoint's), bfloat16")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "engine_vs_hf.json"))
    ap.add_argument("--work-dir", default=None, help="keep the built 1 GB checkpoint here (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of moe-serve and hf-batched (best counts)")
    ap.add_argument("--compile-decode", action="store_true",
                    help="moe-serve runs decode steps compiled (model.compile_decode); default: eager")
    ap.add_argument("--compile-max-batch", type=int, default=None,
                    help="with --compile-decode: the largest batch that runs compiled (default: timed when "
                         "the engine starts)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both engines (process-wide); default: torch's choice")
    args = ap.parse_args(argv)
    compile_decode = args.compile_decode or args.compile_max_batch is not None
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bw = copy_bandwidth()  # measured again at the end: the higher (less disturbed) figure is the bound
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, copy bandwidth {bw / 1e9:.1f} GB/s (read+write), "
          f"load average {load_before[0]:.1f}")
    rows = []
    if args.work_dir:  # a new directory to keep the checkpoint in failed in mkdtemp, after the bandwidth runs
        os.makedirs(args.work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = args.work_dir or tmp
        for m in args.models.split(","):
            if m == "default":
                if not (Path(DEFAULT_MODEL) / "config.json").exists():
                    print(f"  default model not present at {DEFAULT_MODEL}: skipped")
                    continue
                rows += bench_model("default", Path(DEFAULT_MODEL), args.quick, bw, args.dtype, args.repeats,
                                     compile_decode, args.compile_max_batch)
            elif m == "mixtral1g":
                rows += bench_model("mixtral1g", build_mixtral_1g(Path(tmp) / "mixtral1g"), args.quick, bw, args.dtype,
                                    args.repeats, compile_decode, args.compile_max_batch)
            else:
                rows += bench_model(Path(m).name, Path(m), args.quick, bw, args.dtype, args.repeats,
                                     compile_decode, args.compile_max_batch)
    bw_end = copy_bandwidth()
    if bw_end > bw:  # the bound only gets stricter: recompute the fractions with the higher bandwidth
        for r in rows:
            r["bound_s"] *= bw / bw_end
            r["moe_serve_bw_fraction"] *= bw / bw_end
            r["hf_bw_fraction"] *= bw / bw_end
            r["moe_serve_bw_fraction_stored"] *= bw / bw_end
        bw = bw_end
    print(f"copy bandwidth used for the bound: {bw / 1e9:.1f} GB/s (best of the start and end measurements)")
    hdr = (f"{'model':>10} {'workload':>12} {'out tok':>7} {'moe-serve':>10} {'hf seq':>8} {'hf batch':>8} "
           f"{'speedup':>8} {'BW% ours':>8} {'BW% hf':>7} {'stored':>7} {'same':>5}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['model']:>10} {r['workload']:>12} {r['output_tokens']:>7} {r['moe_serve_tok_s']:>10.1f} "
              f"{r['hf_sequential_tok_s']:>8.1f} {r['hf_batched_tok_s'] or float('nan'):>8.1f} "
              f"{r['speedup']:>7.2f}x {100 * r['moe_serve_bw_fraction']:>7.1f}% {100 * r['hf_bw_fraction']:>6.1f}% "
              f"{100 * r['moe_serve_bw_fraction_stored']:>6.1f}% "
              f"{'yes' if r['identical'] else 'NO':>5}")
    print("(tokens/s = output tokens / wall time incl. prefill; speedup vs the faster transformers run;\n"
          " BW% = the bound's time over the engine's, weights counted at the compute dtype's width, so a\n"
          " compiled step reading bf16 expert copies can pass 100%; stored = ours with weights at the\n"
          " checkpoint's stored width, the least any engine must read)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=dict(processor=platform.processor(), cpus=os.cpu_count(),
                                                torch_threads=torch.get_num_threads(), copy_bandwidth_Bps=bw,
                                                torch=torch.__version__, quick=args.quick,
                                                load_average_before=load_before,
                                                load_average_after=os.getloadavg()),
                                   results=rows), indent=1))
    print(f"wrote {out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
