"""expert_cache.prefetch_from=auto: the runtime sets the predicted policy's prefetch_from as cache-sim's
auto does (`CostModel.prefetch_from("auto")`, ceil(copy time / layer time)), from its start-up copy
measurement and the layer steps it serves with their experts in place."""
from __future__ import annotations

import math
import statistics
import time

import pytest
import torch

from moe_serve import LLM, SamplingParams
from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.cost import ExpertCosts
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import make_policy
from moe_serve.experts.prefetch_auto import prefetch_from_auto
from moe_serve.experts.replay import CostModel
from predictors.registry import load_predictor
from tests.experts.sources import TinySource, fitted_predictor

LAYER_S = 0.002  # each layer step of the store test takes at least this long


def test_config_takes_auto_or_a_layer_count():
    assert ExpertCacheConfig(prefetch_from="auto").prefetch_from == "auto"
    assert ExpertCacheConfig(prefetch_from="3").prefetch_from == 3  # as the CLI flag gives it
    assert ExpertCacheConfig(prefetch_from=2).prefetch_from == 2
    for bad in (0, "0", "soon", 1.5, True):
        with pytest.raises(ValueError, match="expert_cache.prefetch_from must be an integer >= 1 or auto"):
            ExpertCacheConfig(prefetch_from=bad)


def test_the_replays_rule_on_measured_times():
    costs = ExpertCosts(bytes_per_expert=17_300_000, bandwidth=25e9, device_s=(0.0, 0.0), cpu_s=(0.0, 0.0))
    assert prefetch_from_auto(costs, 0.25e-3) == CostModel().prefetch_from("auto") == 3  # 0.69 ms / 0.25 ms
    assert prefetch_from_auto(costs, 1e-3) == 1


def test_the_store_times_layers_in_place_and_sets_the_policy(tmp_path):
    """8 slots for the 8 experts; the first token's layers miss (not timed), then every step of layer
    0 -> 1 is timed (1 -> 0 crosses a token: not one layer's time). With a copy made to take 0.1 s,
    32 layer times of >= 2 ms give prefetch_from = ceil(0.1 s / median) > 1, set on the policy."""
    src = TinySource()
    predictor = load_predictor(fitted_predictor(tmp_path / "pred.safetensors", 2, 4, 2))
    policy = make_policy("predicted", predictor=predictor, lookahead=1)
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=8, policy=policy, top_k=2, cpu_experts="off",
                               admit="always", prefetch_from_auto=True)
    auto = store._auto_from
    assert auto is not None and store.costs is not None  # measured at start-up though cpu_experts is off
    store.routing_hook = None  # no model records routing here: the policy runs without a forecast (state None)
    auto.costs = ExpertCosts(bytes_per_expert=10**6, bandwidth=10**7, device_s=(0.0, 0.0), cpu_s=(0.0, 0.0))
    x = torch.randn(2, 8)  # one row for each of the 2 experts
    tokens = 0
    while auto.resolved is None:
        assert policy.prefetch_from == 1 and tokens < 40  # the default until measured
        for layer in range(2):
            store.run(layer, x, [0, 1, 1, 0] if layer else [1, 0, 0, 1])
            time.sleep(LAYER_S)
        tokens += 1
    assert len(auto.layer_s) == 32 and tokens >= 33  # at most one per token, from the second (the first missed)
    assert min(auto.layer_s) >= LAYER_S
    median = statistics.median(auto.layer_s)
    assert policy.prefetch_from == auto.resolved == math.ceil(0.1 / median - 1e-9) > 1
    store.close()


def test_the_engine_resolves_auto(tiny_checkpoint, tmp_path):
    """Through LLM(...): the flag reaches the store, which sets prefetch_from from its own measurements."""
    pred = fitted_predictor(tmp_path / "pred.safetensors", 3, 8, 2)
    llm = LLM(model=str(tiny_checkpoint("mixtral")), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=24,
              cache_policy="predicted", predictor=pred, cpu_experts="off", prefetch_from="auto")
    store = llm.engine.model.store
    llm.generate([[5, 17, 3, 99, 42]], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    auto = store._auto_from
    assert auto.resolved is not None and store.policy.prefetch_from == auto.resolved
    assert auto.resolved == prefetch_from_auto(store.costs, statistics.median(auto.layer_s))
    llm.close()
