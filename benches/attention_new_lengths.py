"""What a decode pays for attention at every new context length on a GPU: torch's default SDPA
(cuDNN's kernel first on Hopper) against moe-serve's `attention.sdpa` (cuDNN left out).

    python benches/attention_new_lengths.py [--steps 64] [--start 100]

A decode reaches a new context length at every step. cuDNN's attention builds an execution plan per
shape the first time it sees one; the flash and memory-efficient kernels need none. Side by side in
one process, each on lengths the other never saw (plans are cached per process):
  * decode: `--steps` successive calls with the key length growing by one from `--start`, as a
    batch-1 decode of Mixtral's attention shape makes them (8 KV heads, 4 query rows each, head dim
    128, bf16; the query heads of a KV head as rows, as `gqa_decode` calls it): total and per step;
  * again over the same lengths (plans cached): the steady per-call time.
Results: a table, JSON in benches/results/attention_new_lengths.json. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_serve.models.attention import sdpa  # noqa: E402

HKV, G, D = 8, 4, 128  # Mixtral-8x7B: 32 query heads over 8 KV heads, head dim 128


def decode_calls(attend, lengths: range, device) -> list[float]:
    """Seconds of each call, one per key length (synchronised: what the step waits for)."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, HKV, G, D, generator=g, device=device, dtype=torch.bfloat16)
    cache = torch.randn(2, 1, HKV, lengths.stop, D, generator=g, device=device, dtype=torch.bfloat16)
    out = []
    for t in lengths:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        attend(q, cache[0, :, :, :t], cache[1, :, :, :t], scale=D ** -0.5)
        torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=64, help="decode steps (new key lengths) per variant")
    ap.add_argument("--start", type=int, default=100, help="first key length")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "attention_new_lengths.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    variants = {"torch default SDPA": F.scaled_dot_product_attention, "moe-serve sdpa (no cuDNN)": sdpa}
    decode_calls(sdpa, range(8, 12), device)  # load the kernels once (not timed)
    decode_calls(F.scaled_dot_product_attention, range(8, 12), device)
    results, offset = {}, args.start
    for name, attend in variants.items():
        lengths = range(offset, offset + args.steps)  # lengths no variant has seen
        offset += args.steps + 1
        first = decode_calls(attend, lengths, device)
        again = decode_calls(attend, lengths, device)
        results[name] = dict(lengths=[lengths.start, lengths.stop - 1], first_pass_s=sum(first),
                             first_pass_ms_per_step=1e3 * sum(first) / len(first),
                             cached_ms_per_step=1e3 * sum(again) / len(again),
                             first_pass_median_ms=1e3 * sorted(first)[len(first) // 2],
                             first_pass_max_ms=1e3 * max(first))
    ref = results["torch default SDPA"]["first_pass_s"]
    lines = [f"{'variant':28s} {'new lengths ms/step':>20s} {'median ms':>10s} {'worst ms':>9s} "
             f"{'cached ms/step':>15s} {'x faster':>9s}"]
    for name, r in results.items():
        lines.append(f"{name:28s} {r['first_pass_ms_per_step']:20.3f} {r['first_pass_median_ms']:10.3f} "
                     f"{r['first_pass_max_ms']:9.2f} {r['cached_ms_per_step']:15.3f} {ref / r['first_pass_s']:9.1f}")
    print("\n".join(lines))
    out = dict(machine=dict(platform=platform.platform(), torch=torch.__version__,
                            device=torch.cuda.get_device_name(0)),
               shape=dict(kv_heads=HKV, query_rows_per_kv_head=G, head_dim=D, dtype="bfloat16"),
               steps=args.steps, table=lines, results=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
