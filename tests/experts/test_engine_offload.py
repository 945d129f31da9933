"""The engine builds the offloading store from its config, and the predictor prefetches through it."""
from __future__ import annotations

import numpy as np
import pytest

from moe_serve import LLM, SamplingParams
from moe_serve.experts.offload import OffloadExpertStore
from predictors.baselines import TransitionPredictor
from predictors.traces import RoutingTrace

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 3, 99, 42], [7, 64, 12]]


def tokens(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_llm_with_expert_cache_matches_resident(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    ref = tokens(LLM(model=str(path), dtype="float32", kv_cache_gb=0.01))
    rng = np.random.default_rng(0)
    ex = np.stack([rng.permutation(8)[:2] for _ in range(300 * 3)]).reshape(300, 3, 2).astype(np.int16)
    trace = RoutingTrace(experts=ex, weights=np.ones_like(ex, dtype=np.float16), seq_offsets=np.array([0, 300]),
                         num_experts=8)
    pred_path = tmp_path / "transition.safetensors"
    TransitionPredictor(3, 8, 2, lookahead=1).fit([trace]).save(pred_path)
    llm = LLM(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=5,
              cache_policy="predicted-prefetch", predictor=str(pred_path), cpu_experts="off")
    store = llm.engine.model.store
    assert isinstance(store, OffloadExpertStore) and store.routing_hook is not None
    assert tokens(llm) == ref
    m = store.metrics()
    assert m["prefetch_issued"] > 0 and m["misses"] > 0 and m["capacity"] == 5


def test_bad_expert_cache_options_name_the_field(tiny_checkpoint):
    path = str(tiny_checkpoint("mixtral"))
    with pytest.raises(ValueError, match="expert_cache.cpu_experts"):
        LLM(model=path, expert_cache_slots=4, cpu_experts="sometimes")
    with pytest.raises(ValueError, match="needs expert_cache.predictor"):
        LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_slots=4, cache_policy="static")
    with pytest.raises(ValueError, match="holds no expert"):
        LLM(model=path, dtype="float32", kv_cache_gb=0.01, expert_cache_gb=1e-9)
