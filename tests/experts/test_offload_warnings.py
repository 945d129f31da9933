"""Predictor options the offloading store cannot honour as asked: refused naming the field, or served
with a warning naming both values. (Split out of test_offload_edges.py.)"""
from __future__ import annotations

import pytest

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory


def test_predicted_prefetch_without_a_predictor_names_the_field(tiny_checkpoint):
    """predicted-prefetch fetches the predictor's forecast: without expert_cache.predictor it
    served as plain predicted and prefetched nothing, silently (static names the field it needs)."""
    from moe_serve.models import load_model

    cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="predicted-prefetch", cpu_experts="off")
    with pytest.raises(ValueError, match="expert_cache.cache_policy=predicted-prefetch needs expert_cache.predictor"):
        load_model(tiny_checkpoint("mixtral"), dtype="float32", expert_store_factory=expert_store_factory(cfg))


def test_a_prefetch_lookahead_past_the_predictors_is_served_with_a_warning(tiny_checkpoint, tmp_path, caplog):
    """--prefetch-lookahead 3 with a predictor fitted for 2 prefetched 2 layers ahead without a word;
    it still serves (clamped, as vLLM caps a setting), and the warning names both values."""
    import logging

    from moe_serve.models import load_model
    from tests.experts.sources import fitted_predictor

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2, lookahead=2)
    for asked, policy, warned in ((3, "predicted-prefetch", True), (2, "predicted-prefetch", False), (3, "lru", False)):
        cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy=policy, predictor=pred, cpu_experts="off",
                                prefetch_lookahead=asked)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moe_serve.experts.factory"):
            store = load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
        if policy != "lru":
            assert store.policy.lookahead == 2
        store.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "moe_serve.experts.factory"]
        assert lines == ([f"expert_cache.prefetch_lookahead=3 exceeds the lookahead 2 that expert_cache.predictor {pred} "
                          "was fitted for; prefetching 2 MoE layer(s) ahead"] if warned else []), (asked, policy, lines)
    # a next-token predictor (lookahead 0) prefetches no later layer at all: the warning says so
    nt = fitted_predictor(tmp_path / "nt.safetensors", 3, 8, 2, lookahead=0)
    cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="predicted", predictor=nt, cpu_experts="off")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_serve.experts.factory"):
        load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store.close()
    assert any("prefetch_lookahead=1 exceeds the lookahead 0" in r.getMessage() and "nothing is prefetched" in r.getMessage()
               for r in caplog.records)


def test_a_prefetch_from_past_the_lookahead_is_served_with_a_warning(tiny_checkpoint, tmp_path, caplog):
    """--prefetch-from 3 with 2 layers predicted ahead prefetched no predicted layer, silently."""
    import logging

    from moe_serve.models import load_model
    from tests.experts.sources import fitted_predictor

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts, top-2
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2, lookahead=2)
    for prefetch_from, warned in ((3, True), (2, False)):
        cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="predicted-prefetch", predictor=pred,
                                cpu_experts="off", prefetch_lookahead=2, prefetch_from=prefetch_from)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moe_serve.experts.factory"):
            load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "moe_serve.experts.factory"]
        assert lines == (["expert_cache.prefetch_from=3 is beyond the 2 MoE layer(s) predicted ahead: no predicted "
                          "layer is prefetched for (the forecast still steers eviction)"] if warned else [])
