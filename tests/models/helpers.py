"""Test helpers: a transformers model and its moe-serve twin, greedy loops on both, router capture."""
from __future__ import annotations

from pathlib import Path

import torch

from moe_serve.models import ForwardBatch, load_model
from moe_serve.models.hooks import RouterHooks
from tests.models.tiny_checkpoints import build_hf_model


def hf_and_ours(family: str, path: Path, dtype=torch.float32, **overrides):
    hf = build_hf_model(family, dtype=dtype, **overrides)
    hf.save_pretrained(path)
    ours = load_model(path)
    ours.allocate_kv_cache(4, 160)
    return hf, ours


class RecordRoutes(RouterHooks):
    """Keeps each MoE layer's expert ids (sorted per token) of the last steps."""

    active = True

    def __init__(self):
        self.ids: dict[int, list[torch.Tensor]] = {}

    def route(self, moe_layer, hidden, expert_ids, weights):
        self.ids.setdefault(moe_layer, []).append(expert_ids.sort(dim=-1).values.clone())
        return None


def hf_router_ids(hf, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Sorted expert ids [N, K] per MoE layer from transformers' routers (forward hooks)."""
    got = []
    handles = [m.register_forward_hook(lambda mod, inp, out: got.append(out[2].sort(dim=-1).values))
               for name, m in hf.named_modules() if type(m).__name__.lower().endswith("topkrouter")]
    try:
        with torch.no_grad():
            hf(input_ids[None])
    finally:
        for h in handles:
            h.remove()
    return got


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers greedy decoding with its KV cache (no eos stop: exactly n tokens)."""
    toks = []
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            nxt = out.logits[0, -1].argmax()
            toks.append(int(nxt))
            out = hf(nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return toks


def our_greedy(model, prompt: list[int], n: int, slot: int = 0) -> list[int]:
    logits, ctx, toks = model(ForwardBatch.single(prompt, slot=slot)), len(prompt), []
    for _ in range(n):
        t = int(logits[0].argmax())
        toks.append(t)
        logits = model(ForwardBatch.single([t], slot=slot, context_len=ctx))
        ctx += 1
    return toks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
