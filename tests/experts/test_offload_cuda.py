"""The offloading store on a real GPU (skipped without one): copies from pinned host memory on a side
CUDA stream with events (`StreamCopier`), prefetches queued on the host, cold experts computed on the
CPU; every family gives the resident store's tokens and logits on that GPU, and so does the engine."""
from __future__ import annotations

import pytest
import torch

from moe_serve import LLM, SamplingParams
from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.copier import StreamCopier
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.models import load_model
from tests.experts.sources import fitted_predictor
from tests.experts.test_offload import run
from tests.models.tiny_checkpoints import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_run(path, factory=None, dtype="float32"):
    """(greedy tokens, their logits on the host, the store) of 8 steps on the GPU."""
    (toks, logits), store = run(path, factory, n=8, device="cuda", dtype=dtype)
    return toks, logits, store


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_on_cuda_matches_resident(family, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(family)
    ref_toks, ref_logits, ref_store = cuda_run(path)
    assert ref_store.device.type == "cuda"
    L, E = ref_store.num_moe_layers, ref_store.num_experts
    top_k = load_model(path).spec.top_k
    pred = fitted_predictor(tmp_path / "pred.safetensors", L, E, top_k)
    configs = {
        "lru": ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off"),
        "predicted-prefetch": ExpertCacheConfig(expert_cache_slots=top_k + 1, cache_policy="predicted-prefetch",
                                                predictor=pred, cpu_experts="off"),
        "cold experts on the CPU": ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="on"),
    }
    for name, cfg in configs.items():
        toks, logits, store = cuda_run(path, expert_store_factory(cfg))
        assert isinstance(store, OffloadExpertStore) and isinstance(store.copier, StreamCopier), name
        assert store.host_gu[0].is_pinned() and store.slot_gu.device.type == "cuda", name
        m = store.metrics()
        assert toks == ref_toks, (family, name)
        # experts computed on the CPU (cpu_experts on, or a prefill step that needs more experts than
        # there are slots) use its own kernels: float rounding apart, the same logits
        tol = 1e-4 if m["cpu_computed"] or m["cpu_overflow"] else 1e-5
        torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol, msg=f"{family} {name}")
        assert m["misses"] > 0, name
        if cfg.cpu_experts == "on":
            assert m["cpu_computed"] > 0 and m["copies"] == 0, (name, m)
        else:
            assert m["copies"] > 0 and m["bytes_moved"] == m["copies"] * store.expert_bytes, (name, m)
        if cfg.cache_policy == "predicted-prefetch":
            assert m["prefetch_issued"] > 0, m
        store.close()


def test_bf16_on_cuda_matches_resident_grouped_mm(tiny_checkpoint):
    """bf16: the resident store runs torch's grouped_mm over stacked experts, the offloading store one
    matmul per expert from its slots; the same tokens, logits within bf16 rounding."""
    path = tiny_checkpoint("mixtral")
    ref_toks, ref_logits, _ = cuda_run(path, dtype="bfloat16")
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", cpu_experts="off")
    toks, logits, store = cuda_run(path, expert_store_factory(cfg), dtype="bfloat16")
    assert store.slot_gu.dtype == torch.bfloat16 and store.metrics()["copies"] > 0
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    store.close()


def test_engine_on_cuda_with_expert_cache_matches_resident(tiny_checkpoint, tmp_path):
    path = str(tiny_checkpoint("mixtral"))  # 3 MoE layers x 8 experts, top-2
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 17, 3, 99, 42], [7, 64, 12], [9, 9, 31, 2, 77, 101]]
    with LLM(model=path, dtype="float32", device="cuda", kv_cache_gb=0.01) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2)
    with LLM(model=path, dtype="float32", device="cuda", kv_cache_gb=0.01, expert_cache_slots=5,
             cache_policy="predicted-prefetch", predictor=pred, cpu_experts="off") as llm:
        assert [o.token_ids for o in llm.generate(prompts, params)] == ref
        m = llm.engine.model.store.metrics()
        assert m["copies"] > 0 and m["prefetch_issued"] > 0
