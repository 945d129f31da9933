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


def assert_matches_transformers(hf, ours, prompt: list[int], name: str, new_tokens: int = 24) -> None:
    """`ours` against transformers' `hf` on `prompt`: every position's logits within 1e-4 relative,
    the same experts chosen in every MoE layer, and the same greedy continuation of prompt[:16]
    (`new_tokens` tokens, not all alike)."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [N, V]
    got = model_logits(ours, prompt, slot=1)
    assert rel_err(got, ref) < 1e-4, name
    ref_ids, rec = hf_router_ids(hf, ids), RecordRoutes()
    hooks, ours.hooks = ours.hooks, rec
    try:
        ours(ForwardBatch.single(prompt, slot=2))
    finally:
        ours.hooks = hooks
    assert len(ref_ids) == len(rec.ids) == ours.spec.num_moe_layers > 0
    for layer, expert_ids in enumerate(ref_ids):
        assert torch.equal(rec.ids[layer][0], expert_ids), f"{name}: MoE layer {layer} chose other experts"
    expected = hf_greedy(hf, prompt[:16], new_tokens)
    assert our_greedy(ours, prompt[:16], new_tokens, slot=0) == expected, name
    assert len(set(expected)) > 1  # a constant continuation would prove little


def model_logits(model, prompt: list[int], slot: int = 1) -> torch.Tensor:
    """Every position's logits [N, V] of one prefill of `prompt` in `slot`."""
    return model(ForwardBatch.single(prompt, slot=slot, all_logits=True))
