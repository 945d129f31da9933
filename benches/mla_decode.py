"""DeepSeek decode step: attention in the latent space (absorbed) against expanding the cache (transformers' way).

    python benches/mla_decode.py [--contexts 128,512,2048] [--threads 1]

A random checkpoint with DeepSeek-V2-Lite's attention shapes (hidden 2048, 16 heads, kv_lora_rank
512, rope dim 64, nope/v dims 128) and a small MoE (2 layers, the first dense), saved and loaded by
moe-serve twice: `mla_decode="absorbed"` (default) and `"expanded"`. For each context length, a
batch of 4 sequences is prefilled to it, then decode steps are timed side by side (best of 5), and
the two forms' logits compared. Results: a table, JSON in benches/results/mla_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_serve.models import ForwardBatch, load_model  # noqa: E402


def build_checkpoint(out: Path, max_pos: int) -> Path:
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    cfg = DeepseekV2Config(vocab_size=4096, hidden_size=2048, intermediate_size=1024, moe_intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=512,
                           q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                           topk_method="greedy", routed_scaling_factor=1.0, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def decode_step_s(model, batch_size: int, ctx: int, repeats: int = 5) -> tuple[float, torch.Tensor]:
    """Best seconds of one decode step of `batch_size` sequences with `ctx` cached tokens, and its logits."""
    best, logits = float("inf"), None
    for _ in range(repeats):
        b = ForwardBatch(token_ids=torch.full((batch_size,), 7), positions=torch.full((batch_size,), ctx),
                         slot_ids=list(range(batch_size)), query_lens=[1] * batch_size,
                         context_lens=[ctx] * batch_size, seq_ids=list(range(batch_size)))
        t = time.perf_counter()
        logits = model(b)
        best = min(best, time.perf_counter() - t)
    return best, logits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "mla_decode.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = build_checkpoint(Path(tmp), max_pos=max(contexts) + 8)
        models = {mode: load_model(d, dtype="float32", mla_decode=mode) for mode in ("absorbed", "expanded")}
        for ctx in contexts:
            g = torch.Generator().manual_seed(ctx)
            prompts = [torch.randint(3, 4096, (ctx,), generator=g).tolist() for _ in range(args.batch)]
            res = {}
            for mode, m in models.items():
                m.allocate_kv_cache(args.batch, ctx + 8)
                for slot, p in enumerate(prompts):
                    m(ForwardBatch.single(p, slot=slot))
                res[mode] = decode_step_s(m, args.batch, ctx)
            (ta, la), (te, le) = res["absorbed"], res["expanded"]
            err = float((la - le).abs().max() / le.abs().max())
            rows.append(dict(context=ctx, batch=args.batch, absorbed_ms=ta * 1e3, expanded_ms=te * 1e3,
                             speedup=te / ta, logits_rel_err=err))
            print(f"context {ctx:5d} x {args.batch}: absorbed {ta * 1e3:8.2f} ms  expanded {te * 1e3:8.2f} ms  "
                  f"{te / ta:5.1f}x  logits rel. diff {err:.1e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(threads=args.threads, load_average=os.getloadavg(), rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
