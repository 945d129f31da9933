"""The device budget of the offloading store covers everything it allocates there: the expert slots
and the staging buffers streamed misses go through (cache_admission=reuse, CPU devices)."""
from __future__ import annotations

import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.models import load_model
from tests.experts.test_offload import run

ONE = 3 * 48 * 64 * 4  # bytes of one expert of the tiny Mixtral (float32): gate_up [96, 64], down [64, 48]


@pytest.mark.parametrize("admission, staging", [("reuse", 2), ("always", 0)])
def test_staging_buffers_are_paid_from_the_gib_budget(tiny_checkpoint, admission, staging):
    """--expert-cache-gb for 5 experts with cache_admission=reuse allocated 5 slots *and* 2 staging
    buffers: 7 experts' worth of device memory for a budget of 5. Now the staging buffers come out of
    the budget (3 slots + 2 buffers), metrics() says so, and the tokens and logits are still the
    resident store's, bit for bit."""
    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts
    (ref_toks, ref_logits), _ = run(path, n=6)
    budget = 5 * ONE
    cfg = ExpertCacheConfig(expert_cache_gb=budget / 2**30, cache_policy="lru", cpu_experts="off",
                            cache_admission=admission)
    (toks, logits), store = run(path, expert_store_factory(cfg), n=6)
    m = store.metrics()
    assert (m["capacity"], m["staging_buffers"]) == (5 - staging, staging)
    assert m["slot_bytes"] == (5 - staging) * ONE and m["staging_bytes"] == staging * ONE
    assert store.nbytes() == m["slot_bytes"] + m["staging_bytes"] == budget
    if staging:
        assert m["streamed"] > 0  # the staging buffers were really used
    assert toks == ref_toks
    assert torch.equal(logits, ref_logits)
    store.close()


def test_slot_budget_reports_its_staging_buffers_apart(tiny_checkpoint):
    """A budget in slots is a number of slots: the staging buffers come on top, and metrics() says how many bytes."""
    cfg = ExpertCacheConfig(expert_cache_slots=4, cache_policy="lru", cpu_experts="off", cache_admission="reuse")
    store = load_model(tiny_checkpoint("mixtral"), dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
    m = store.metrics()
    assert (m["capacity"], m["slot_bytes"], m["staging_bytes"]) == (4, 4 * ONE, 2 * ONE)
    store.close()


@pytest.mark.parametrize("experts, per_layer, says", [
    (2.5, False, r"expert_cache.expert_cache_gb=.* holds 2 experts .*: 2 staging buffers \(cache_admission=reuse\) "
                 r"and >= 1 slot need >= 3 experts \(0.000103 GiB\)"),
    (4.5, True, r"expert_cache.expert_cache_gb=.* holds 4 experts .*: 2 staging buffers \(cache_admission=reuse\) "
                r"and >= 3 slots \(expert_cache.cache_per_layer: one per MoE layer\) need >= 5 experts \(0.0001717 GiB\)"),
])
def test_a_gib_budget_too_small_for_the_staging_buffers_names_the_field_and_the_minimum(
        tiny_checkpoint, experts, per_layer, says):
    """A budget that the staging buffers leave no slot (or fewer than one per layer) is refused with
    the field, what it holds and the minimum; one expert more is served."""
    path = tiny_checkpoint("mixtral")
    common = dict(cache_policy="lru", cpu_experts="off", cache_admission="reuse", cache_per_layer=per_layer)
    with pytest.raises(ValueError, match=says):
        load_model(path, dtype="float32",
                   expert_store_factory=expert_store_factory(ExpertCacheConfig(expert_cache_gb=experts * ONE / 2**30,
                                                                               **common)))
    cfg = ExpertCacheConfig(expert_cache_gb=(experts + 1) * ONE / 2**30, **common)
    store = load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
    assert store.nbytes() <= (experts + 1) * ONE and store.ring is not None
    store.close()


@pytest.mark.parametrize("budget", ["slots", "gb"])
def test_a_budget_for_every_expert_allocates_no_staging_buffer(tiny_checkpoint, budget):
    """A budget that holds all 24 experts (as slots, or as exactly 24 experts of GiB) needs no staging
    buffer: every miss finds a free slot, nothing streams. The store allocated 2 all the same (26
    experts of memory for 24 slots; the GiB form kept 22 slots and 2 buffers, and copied evicted
    experts back in). Now: 24 slots, no buffer, every expert copied once; metrics() adds up."""
    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts
    (ref_toks, ref_logits), _ = run(path, n=6)
    size = dict(expert_cache_slots=24) if budget == "slots" else dict(expert_cache_gb=24 * ONE / 2**30)
    cfg = ExpertCacheConfig(**size, cache_policy="lru", cpu_experts="off", cache_admission="reuse")
    (toks, logits), store = run(path, expert_store_factory(cfg), n=6)
    m = store.metrics()
    assert (m["capacity"], m["staging_buffers"], m["staging_bytes"]) == (24, 0, 0) and store.ring is None
    assert store.nbytes() == m["slot_bytes"] == 24 * ONE
    resident = int((store.cache.slot_of >= 0).sum())
    assert m["streamed"] == 0 and m["copies"] == m["misses"] == resident
    assert m["bytes_moved"] == m["copies"] * ONE and m["hits"] + m["misses"] > m["misses"]
    assert toks == ref_toks
    assert torch.equal(logits, ref_logits)
    store.close()


def test_a_slot_budget_below_every_expert_costs_two_more_experts(tiny_checkpoint):
    """expert_cache_slots counts cache slots (cache-sim's capacity); with cache_admission reuse the
    store's device memory is those slots plus 2 staging buffers, all of it in metrics()."""
    cfg = ExpertCacheConfig(expert_cache_slots=23, cache_policy="lru", cpu_experts="off", cache_admission="reuse")
    store = load_model(tiny_checkpoint("mixtral"), dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
    m = store.metrics()
    assert (m["capacity"], m["staging_buffers"]) == (23, 2)
    assert store.nbytes() == m["slot_bytes"] + m["staging_bytes"] == 25 * ONE
    store.close()
