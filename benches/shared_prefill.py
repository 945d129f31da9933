"""A request's n completions prefilled once (shared) vs once each (as before), on the default model.

n=4 completions of a ~1,000-token prompt, 16 output tokens each, seeded: the same process runs both
ways (the scheduler's share_prefill switched off gives the old path, each completion prefilling the
prompt itself), alternating, and counts the completions equal to their own n=1 request (seed
completion_seed(seed, i)) run alone, greedy and sampled. In bf16 a batch's shape changes the rounding,
so a sampled completion may part from its lone run after some tokens either way (the sampler's note).
Prints a table; --out writes JSON.

    .venv/bin/python benches/shared_prefill.py [--repeats 3] [--prompt-tokens 1000] [--n 4] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace

from moe_serve import LLM, SamplingParams
from moe_serve.engine.sampling_params import completion_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with LLM() as llm:
        text = " ".join(["The experts of a mixture route every token to a few of them, and the cache keeps"] * 200)
        prompt = llm.tokenizer.encode(text)[:args.prompt_tokens]
        params = SamplingParams(n=args.n, temperature=1.0, seed=1, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompt[:64], params)  # warm-up
        times: dict[str, list[float]] = {"separate": [], "shared": []}
        for _ in range(args.repeats):
            for way in times:
                llm.engine.scheduler.share_prefill = way == "shared"
                t0 = time.perf_counter()
                llm.generate(prompt, params)
                times[way].append(time.perf_counter() - t0)
        greedy = SamplingParams(n=args.n, temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        same = {}
        for kind, p in (("sampled", params), ("greedy", greedy)):
            alone = [llm.generate(prompt, replace(p, n=1, seed=completion_seed(1, i)))[0].outputs[0].token_ids
                     for i in range(args.n)]
            for way in times:
                llm.engine.scheduler.share_prefill = way == "shared"
                outs = llm.generate(prompt, p)[0].outputs
                same[f"{way} {kind}"] = sum(c.token_ids == a for c, a in zip(outs, alone))
        llm.engine.scheduler.share_prefill = True
        med = {w: statistics.median(t) for w, t in times.items()}
        print(f"n={args.n}, prompt {len(prompt)} tokens, {args.max_tokens} output tokens each, "
              f"{os.cpu_count()} CPUs, median of {args.repeats}")
        print(f"{'prefill':<10} {'seconds':>8} {'= alone (greedy)':>17} {'= alone (sampled)':>18}")
        for way in times:
            print(f"{way:<10} {med[way]:>8.3f} {same[way + ' greedy']:>15}/{args.n} {same[way + ' sampled']:>16}/{args.n}")
        print(f"speed-up {med['separate'] / med['shared']:.2f}x")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "machine": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "seconds": times, "equal_to_alone": same}, f, indent=1)


if __name__ == "__main__":
    main()
