"""How far is moe-serve's batch-1 decode from what eager PyTorch can do at all, on the default model?

    python benches/decode_floor.py [--threads 2] [--tokens 64]

Side by side in this process, greedy, the same prompt, the default checkpoint in float32:
  * floor: the smallest eager-PyTorch decode we could write for this one model shape (Qwen3-MoE,
    batch 1, one fixed cache, no engine, hooks, stores or module calls; the weights are the loaded
    model's). A measuring stick, not a product path: it knows one shape and one request;
  * moe-serve: `model.forward` on one-token batches (the engine's decode step without the engine),
    and `LLM.generate` end to end; both again with the compiled decode step (`model.compile_decode`:
    one torch.compile graph per step, timed after it compiled);
  * transformers: `generate` end to end.
All must produce the same tokens. The floor shows what an eager decode step costs in PyTorch's
per-op overhead alone on this CPU; the compiled step is how moe-serve gets below it.
Results: a table, and JSON in benches/results/decode_floor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_serve import LLM, SamplingParams  # noqa: E402
from moe_serve.config import DEFAULT_MODEL  # noqa: E402
from moe_serve.models.batch import ForwardBatch  # noqa: E402


class FloorDecoder:
    """Qwen3-MoE batch-1 greedy decode in as few eager ops as we could manage (same math as the model)."""

    def __init__(self, model, max_len: int):
        s = model.spec
        self.nh, self.nkv, self.hd, self.k, self.eps = s.num_heads, s.num_kv_heads, s.head_dim, s.top_k, s.rms_norm_eps
        self.emb, self.final_norm = model.embed_tokens.weight, model.norm.weight
        self.inv_freq, self.scale = model.rotary.inv_freq, model.layers[0].self_attn.scale
        self.layers = []
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            qkv, _, qk_norm = a.fused_weights()  # [(Hq+2Hkv)*D, H], per-head norm weight [Hq+Hkv, D]
            self.layers.append(dict(
                n1=layer.input_layernorm.weight, qkv=qkv, qk_norm=qk_norm, o=a.o_proj.weight,
                n2=layer.post_attention_layernorm.weight, router=layer.mlp.gate.weight,
                experts=[model.store.get(i, e) for e in range(s.num_experts)],
                k_cache=torch.zeros(1, max_len, self.nkv, self.hd), v_cache=torch.zeros(1, max_len, self.nkv, self.hd)))

    def _rms(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * w

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> int:
        nh, nkv, hd, half = self.nh, self.nkv, self.hd, self.hd // 2
        h = self.emb[token][None]  # [1, H]
        f = pos * self.inv_freq
        e = torch.cat((f, f))
        cos, sin = e.cos(), e.sin()
        for p in self.layers:
            qkv = F.linear(self._rms(h, p["n1"]), p["qkv"])  # [1, (Hq+2Hkv)*D]
            qk = self._rms(qkv[0, :(nh + nkv) * hd].view(nh + nkv, hd), p["qk_norm"])  # [Hq+Hkv, D]
            qk = qk * cos + torch.cat((-qk[:, half:], qk[:, :half]), -1) * sin
            p["k_cache"][0, pos] = qk[nh:]
            p["v_cache"][0, pos] = qkv[0, (nh + nkv) * hd:].view(nkv, hd)
            o = F.scaled_dot_product_attention(qk[:nh].view(1, nkv, nh // nkv, hd), p["k_cache"][:, :pos + 1].transpose(1, 2),
                                               p["v_cache"][:, :pos + 1].transpose(1, 2), scale=self.scale)
            h = h + F.linear(o.reshape(1, nh * hd), p["o"])
            x = self._rms(h, p["n2"])
            w, ids = F.linear(x, p["router"]).softmax(-1, dtype=torch.float32).topk(self.k)
            w = w / w.sum(-1, keepdim=True)
            ys = []
            for eid in ids[0].tolist():
                gate_up, down = p["experts"][eid]
                g, u = F.linear(x, gate_up).chunk(2, -1)
                ys.append(F.linear(F.silu(g) * u, down))
            h = h + (torch.cat(ys) * w.reshape(-1, 1)).sum(0, keepdim=True)
        return int(F.linear(self._rms(h, self.final_norm), self.emb).argmax(-1))

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """(greedy tokens, seconds spent in the n decode steps); the prompt is fed one token at a time."""
        for pos, tok in enumerate(prompt[:-1]):
            self.step(tok, pos)
        out, tok, t = [], prompt[-1], time.perf_counter()
        for i in range(n):
            tok = self.step(tok, len(prompt) - 1 + i)
            out.append(tok)
        return out, time.perf_counter() - t


def best_of(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "decode_floor.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    n = args.tokens
    llm = LLM(model=DEFAULT_MODEL, dtype="float32", max_model_len=256, expert_load_stats=False)
    prompt = llm.tokenizer.encode("The Python interpreter reads a source file, compiles it to bytecode and")
    model = llm.engine.model
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    t_llm, outs = best_of(lambda: llm.generate([prompt], params), args.repeats)
    ours = outs[0].token_ids

    def forward_steps():  # the model's own decode steps, batch 1, after one prefill: seconds per step
        tok, t = int(model.forward(ForwardBatch.single(prompt, slot=0)).argmax(-1)), 0.0
        for pos in range(len(prompt), len(prompt) + n - 1):
            b = ForwardBatch(token_ids=torch.tensor([tok]), positions=torch.tensor([pos]), slot_ids=[0],
                             query_lens=[1], context_lens=[pos], seq_ids=[0])
            t0 = time.perf_counter()
            tok = int(model.forward(b).argmax(-1))
            t += time.perf_counter() - t0
        return t / (n - 1)
    t_fwd = min(forward_steps() for _ in range(args.repeats))

    # the same, with the compiled decode step (model.compile_decode); the first runs compile
    model.enable_compiled_decode(max_batch=1)
    forward_steps(), llm.generate([prompt], params)
    t_fwd_c = min(forward_steps() for _ in range(args.repeats))
    t_llm_c, outs_c = best_of(lambda: llm.generate([prompt], params), args.repeats)
    assert model.compiled.failed is None, model.compiled.failed

    floor = FloorDecoder(model, max_len=len(prompt) + n + 1)
    floor_runs = [floor.generate(prompt, n) for _ in range(args.repeats)]
    t_floor = min(r[1] for r in floor_runs) / n

    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    t_hf, y = best_of(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False),
                      args.repeats)
    theirs = y[0, len(prompt):].tolist()
    same = ours == theirs == floor_runs[0][0] == outs_c[0].token_ids

    rows = [("floor (eager minimum), decode step", t_floor * 1e3),
            ("moe-serve model.forward, decode step", t_fwd * 1e3),
            ("moe-serve LLM.generate, per token", t_llm / n * 1e3),
            ("moe-serve compiled, decode step", t_fwd_c * 1e3),
            ("moe-serve compiled LLM.generate, per token", t_llm_c / n * 1e3),
            ("transformers generate, per token", t_hf / n * 1e3)]
    print(f"default model, float32, {args.threads} thread(s), {n} tokens, best of {args.repeats}")
    for name, ms in rows:
        print(f"  {name:<44} {ms:6.3f} ms   ({rows[-1][1] / ms:4.2f}x transformers)")
    print(f"  same tokens in all: {same}")
    result = dict(threads=args.threads, tokens=n, load_average=os.getloadavg(), same_tokens=same,
                  ms={name: ms for name, ms in rows})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
