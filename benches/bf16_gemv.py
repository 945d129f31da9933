"""The AVX-512 bf16 kernel (moe_serve/models/bf16_gemv.py) against inductor's fused widen-and-reduce
loop, which the compiled decode step uses without it, side by side in one process.

    python benches/bf16_gemv.py [--steps 100] [--rounds 3]

1. Alone: y = w[ids] @ x for the 1 GB Mixtral's weights (engine_vs_hf.py's: 2 of 8 experts' gate_up
   [7168, 1024] and down [1024, 3584], the head [32000, 1024]) and a 512 MB matrix (past every
   cache), against the same product compiled by torch.compile, and the machine's read bandwidth
   (an fp32 sum over 512 MB).
2. In place: the 1 GB model's compiled batch-1 decode step with the kernel and without it,
   alternating `--rounds` times (the checkpoint is built in --work-dir if missing).
Results: a table, JSON in benches/results/bf16_gemv.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_serve.models import ForwardBatch, bf16_gemv, load_model  # noqa: E402


def seconds(fn, n: int) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def alone() -> dict:
    loop = torch.compile(lambda w, ids, x: (w[ids].float() * x[:, None, :]).sum(-1), dynamic=False)
    big = torch.randn(128 * 2**20)
    out = {"read bandwidth (fp32 sum, 512 MB)": dict(gb_per_s=big.numel() * 4 / seconds(big.sum, 5) / 1e9)}
    for name, (e, o, i, r) in {"experts gate_up [7168, 1024] x2": (8, 7168, 1024, 2),
                               "experts down [1024, 3584] x2": (8, 1024, 3584, 2),
                               "head [32000, 1024]": (1, 32000, 1024, 1),
                               "512 MB [131072, 2048]": (1, 131072, 2048, 1)}.items():
        w, ids, x = torch.randn(e, o, i).bfloat16(), torch.arange(r) % e, torch.randn(r, i)  # ids ascending
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(ids, minlength=e).cumsum(0)])
        torch.testing.assert_close(bf16_gemv.grouped_gemm(w, x, offsets), loop(w, ids, x), rtol=1e-4, atol=1e-4)
        gb = r * o * i * 2 / 1e9
        n = 5 if o * i > 2**26 else 50
        k, c = seconds(lambda: bf16_gemv.grouped_gemm(w, x, offsets), n), seconds(lambda: loop(w, ids, x), n)
        out[name] = dict(kernel_ms=k * 1e3, inductor_ms=c * 1e3, kernel_gb_per_s=gb / k, inductor_gb_per_s=gb / c)
    # batch 16, top-2 of 8 experts: 32 rows grouped by expert (each expert's weights read once), against
    # what the eager step does there (fp32 F.linear per expert, MKL's small-row kernels)
    counts = torch.tensor([4, 3, 5, 4, 2, 6, 3, 5])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    for name, (o, i) in {"grouped gate_up, 32 rows": (7168, 1024), "grouped down, 32 rows": (1024, 3584)}.items():
        w, x = torch.randn(8, o, i).bfloat16(), torch.randn(int(counts.sum()), i)
        wf, parts = w.float(), list(x.split(counts.tolist()))
        torch.testing.assert_close(bf16_gemv.grouped_gemm(w, x, offsets),
                                   torch.cat([torch.nn.functional.linear(p, wf[e]) for e, p in enumerate(parts)]),
                                   rtol=1e-4, atol=1e-4)
        k = seconds(lambda: bf16_gemv.grouped_gemm(w, x, offsets), 10)
        f = seconds(lambda: [torch.nn.functional.linear(p, wf[e]) for e, p in enumerate(parts)], 10)
        out[name] = dict(kernel_ms=k * 1e3, fp32_linear_ms=f * 1e3, kernel_gb_per_s=8 * o * i * 2 / k / 1e9)
    return out


def in_place(ckpt: Path, steps: int, rounds: int) -> dict:
    times: dict[str, list[float]] = {"kernel": [], "inductor loop": []}
    for _ in range(rounds):
        for name in times:
            model = load_model(ckpt, dtype="float32")
            model.allocate_kv_cache(1, 256)
            model.enable_compiled_decode(max_batch=1)
            model.compiled.kernel = name == "kernel"
            model(ForwardBatch.single(list(range(3, 40)), slot=0))
            step = ForwardBatch(token_ids=torch.tensor([5]), positions=torch.tensor([37]), slot_ids=[0],
                                query_lens=[1], context_lens=[37])
            times[name].append(seconds(lambda: model(step), steps) * 1e3)
            assert model.compiled.failed is None and model.compiled.steps > steps
            torch._dynamo.reset()
    return {name: dict(step_ms=t, best_ms=min(t)) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the step with and without the kernel")
    ap.add_argument("--work-dir", default="/tmp/moe_serve_bf16_gemv", help="where the 1 GB checkpoint is kept")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "bf16_gemv.json"))
    args = ap.parse_args()
    if not bf16_gemv.available():
        print(f"the kernel is unavailable here: {bf16_gemv._state['error']}", file=sys.stderr)
        return 2
    from benches.engine_vs_hf import build_mixtral_1g

    ckpt = build_mixtral_1g(Path(args.work_dir) / "mixtral_1g")
    res = dict(threads=torch.get_num_threads(), load_average=os.getloadavg(), alone=alone(),
               in_place=in_place(ckpt, args.steps, args.rounds))
    for name, r in res["alone"].items():
        if "fp32_linear_ms" in r:
            print(f"{name:36s} kernel {r['kernel_ms']:.3f} ms ({r['kernel_gb_per_s']:.1f} GB/s), "
                  f"fp32 F.linear per expert {r['fp32_linear_ms']:.3f} ms")
        elif "kernel_ms" in r:
            print(f"{name:36s} kernel {r['kernel_ms']:.3f} ms ({r['kernel_gb_per_s']:.1f} GB/s), "
                  f"inductor {r['inductor_ms']:.3f} ms ({r['inductor_gb_per_s']:.1f} GB/s)")
        else:
            print(f"{name:36s} {r['gb_per_s']:.1f} GB/s")
    k, c = res["in_place"]["kernel"]["best_ms"], res["in_place"]["inductor loop"]["best_ms"]
    print(f"1 GB Mixtral compiled batch-1 step: kernel {res['in_place']['kernel']['step_ms']} ms, inductor loop "
          f"{res['in_place']['inductor loop']['step_ms']} ms; best {k:.2f} vs {c:.2f} ms ({c / k:.2f}x)")
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
