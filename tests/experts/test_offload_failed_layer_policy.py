"""A layer that fails partway (here a real host=mmap read of a checkpoint file that looks rewritten)
is retried by the engine; the cache policy must count its accesses once, as if it had not failed:
LFU's use counts and the predicted policy's use statistics equal those of a store that ran the same
steps without the failure."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.models import load_model

H = 64  # the tiny Mixtral's hidden size
# (MoE layer, rows per expert [E=8]): a prefill-like step then a decode step (the latter fails once)
STEPS = [(0, [2, 1, 0, 0, 0, 0, 0, 0]), (1, [0, 0, 2, 0, 1, 0, 0, 0]), (2, [1, 0, 0, 0, 0, 0, 2, 0]),
         (0, [0, 0, 0, 3, 0, 0, 0, 0]), (1, [0, 0, 0, 0, 0, 1, 0, 2])]
FAILING = 4  # the step whose expert reads fail once


def _store(path, policy: str):
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy=policy, cpu_experts="off", host_memory="mmap",
                            cache_admission="always")
    return load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store


def _policy_counts(policy) -> dict:
    if hasattr(policy, "count"):  # LFU
        return dict(count=policy.count.copy())
    return dict(trials=policy.trials.copy(), uses=policy.uses.copy(), last_tok=policy.last_tok.copy(),
                tokens=policy.tokens.copy(), token=policy.token, layer=policy.layer)


@pytest.mark.parametrize("policy", ["lfu", "predicted"])
def test_a_failed_layer_is_counted_once_by_the_policy(policy, tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "ckpt")
    weights = next(path.glob("*.safetensors"))
    clean, failing = _store(path, policy), _store(path, policy)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(0))
    mtime = os.stat(weights).st_mtime_ns
    for i, (layer, rows) in enumerate(STEPS):
        xs = x[: sum(rows)]
        want = clean.run(layer, xs, rows)
        if i == FAILING:
            os.utime(weights, ns=(mtime, mtime + 10**9))  # looks rewritten: the store's checked reads fail
            with pytest.raises(Exception, match="rewritten in place"):  # CopyError or CheckpointError
                failing.run(layer, xs, rows)
            os.utime(weights, ns=(mtime, mtime))
        torch.testing.assert_close(failing.run(layer, xs, rows), want)  # the retry (or a plain step)
    got, ref = _policy_counts(failing.policy), _policy_counts(clean.policy)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    clean.close()
    failing.close()


def test_a_copy_left_queued_by_a_failed_step_is_not_counted_when_its_expert_is_evicted():
    """A step fails at its first expert's copy; the second expert's demand copy is still queued
    (the worker held). The next step evicts that expert: its copy never runs (the slot's new copy
    supersedes it), so `copies` and `bytes_moved` must not count it (they did: 5 copies for 4)."""
    from moe_serve.experts.copier import CopyError
    from tests.experts.sources import BrokenSource
    from tests.experts.test_offload import _store_with

    src = BrokenSource()  # expert (1, 2)'s copy fails
    store = _store_with("thread", src)  # 3 slots, admission always
    with store.copier._cv:  # the worker starts nothing: a copy runs when this thread waits for it
        with pytest.raises(CopyError, match="expert copy failed"):
            store.run(1, torch.randn(2, 8), [0, 0, 1, 1])  # (1, 2) first: fails; (1, 3)'s copy left queued
        assert store.cache.resident(1 * 4 + 3) and not store.copier.ready(int(store.ticket[store.cache.slot_of[7]]),
                                                                           int(store.cache.slot_of[7]))
        y = store.run(0, torch.randn(3, 8), [1, 1, 1, 0])  # two free slots, then (1, 3) evicted
    assert not store.cache.resident(1 * 4 + 3) and y.shape == (3, 8)
    m = store.metrics()
    assert m["copies"] == 4 and m["bytes_moved"] == 4 * store.expert_bytes  # (1, 2) tried, (0, 0..2) landed
    store.close()
