"""Why on-demand copying can beat a resident model on a CPU: one expert's batch-1 forward reading its
weights straight from DRAM, against copying them into a cache-hot buffer first (what
`OnDemandExpertStore` does) and computing from there. Same experts, same order, one torch thread.

    python benches/cpu_expert_read.py [--out benches/results/cpu_expert_read.json]

Shape: benches/expert_cache.py's end-to-end model (8 MoE layers x 64 experts, hidden 512,
intermediate 704, top-6, fp32: 4.3 MB an expert, 48 experts a token, 208 MB a token), so the stacked
experts (1.1 GB) never fit in the last-level cache. Prints ms per token for both, best of `--repeats`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

L, E, H, I, K = 8, 64, 512, 704, 6


def forward(x, gate_up, down):
    """x [1, H], gate_up [2I, H], down [H, I] -> [1, H] (SwiGLU expert, gate rows first)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    gate_up = [torch.randn(E, 2 * I, H, generator=gen) for _ in range(L)]  # [E, 2I, H] per layer
    down = [torch.randn(E, H, I, generator=gen) for _ in range(L)]  # [E, H, I]
    routes = [torch.randperm(E, generator=gen)[:K].tolist() for _ in range(L * args.tokens)]
    x = torch.randn(1, H, generator=gen)
    buf_gu, buf_dn = torch.empty(2 * I, H), torch.empty(H, I)

    def direct():
        out = []
        for step, experts in enumerate(routes):
            out += [forward(x, gate_up[step % L][e], down[step % L][e]) for e in experts]
        return out

    def copy_then_compute():
        out = []
        for step, experts in enumerate(routes):
            for e in experts:
                buf_gu.copy_(gate_up[step % L][e])
                buf_dn.copy_(down[step % L][e])
                out.append(forward(x, buf_gu, buf_dn))
        return out

    for a, b in zip(direct(), copy_then_compute()):  # the same numbers, whichever way the weights are read
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    best = {}
    for _ in range(args.repeats):
        for fn in (direct, copy_then_compute):
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) / args.tokens * 1e3
            best[fn.__name__] = min(best.get(fn.__name__, ms), ms)
    expert_mb = (2 * I * H + H * I) * 4 / 1e6
    print(f"expert {expert_mb:.1f} MB fp32, {L * K} experts a token, 1 thread")
    for name, ms in best.items():
        print(f"{name:18s} {ms:7.2f} ms/token  ({L * K * expert_mb / ms:.1f} GB/s of weights)")
    print(f"copy_then_compute / direct time: {best['copy_then_compute'] / best['direct']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=dict(platform=platform.platform(), processor=_cpu_name(), cpus=os.cpu_count(),
                                        torch=torch.__version__, load_average=os.getloadavg()),
                           shape=dict(layers=L, experts=E, hidden=H, intermediate=I, top_k=K, expert_mb=expert_mb),
                           tokens=args.tokens, repeats=args.repeats, ms_per_token=best), f, indent=1)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
