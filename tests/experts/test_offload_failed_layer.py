"""A forward that fails inside an MoE layer (between the store's begin_layer and end_layer) must still
end that layer: its experts no longer pinned (`cache.end_step`), its slots released to the copier (on
CUDA a later copy into one waits for the failed compute), the clock one layer on. The engine retries
the batch's requests one at a time, and their tokens are a clean run's."""
from __future__ import annotations

import os

import pytest
import torch

from moe_serve import LLM, SamplingParams
from moe_serve.experts.copier import CopyError
from moe_serve.experts.store import expert_forward
from moe_serve.models.hooks import RouterHooks
from tests.experts.sources import BrokenSource
from tests.experts.test_offload import _store_with

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 3, 99, 42], [7, 64, 12]]


@pytest.mark.parametrize("copier", ["thread", "stream"])
def test_a_layer_whose_copy_fails_is_still_ended(copier):
    src = BrokenSource()  # expert (1, 2)'s copy fails
    store = _store_with(copier, src)
    x = torch.randn(3, 8)  # rows 0-1 for expert 0, row 2 for expert 2 (sorted by expert, as dispatch does)
    with pytest.raises(CopyError, match="expert copy failed"):
        store.run(1, x, [2, 0, 1, 0])  # expert 0 is computed first (its copy was queued first), then 2 fails
    assert not store.cache.in_use.any()  # nothing of the failed layer stays pinned against eviction
    assert store.clock == 1
    if copier == "stream":  # the slot expert 0's compute read is released: a later copy into it waits for it
        slot = int(store.cache.slot_of[1 * 4 + 0])
        assert slot >= 0 and store.copier._released[slot] is not None
    # the retry (expert 0's rows alone) computes what it would have
    torch.testing.assert_close(store.run(1, x[:2], [2, 0, 0, 0]), expert_forward(x[:2], *src.w[1, 0]))
    assert store.clock == 2 and not store.cache.in_use.any()
    store.close()


class RewrittenWhileBatched(RouterHooks):
    """The checkpoint file looks rewritten (new mtime) during the first step that holds both prompts,
    so host=mmap's read of a missing expert fails (CheckpointError, inside begin_layer); its old mtime
    is back for the retry, which reads it again. Records the store's state as each retry begins."""
    active = True

    def __init__(self, store, path):
        self.store, self.path, self.mtime = store, path, os.stat(path).st_mtime_ns
        self.failing, self.failed, self.seen_at_retry = False, False, []

    def begin_step(self, batch):
        if len(batch.seq_ids) > 1 and not self.failed:
            self.failing = self.failed = True
            os.utime(self.path, ns=(self.mtime, self.mtime + 10**9))
        elif self.failing and len(batch.seq_ids) == 1:  # the engine's retry, one prompt at a time
            self.failing = False
            os.utime(self.path, ns=(self.mtime, self.mtime))
            self.seen_at_retry.append((bool(self.store.cache.in_use.any()), self.store.clock))

    def route(self, moe_layer, hidden, expert_ids, weights):
        return None


def test_the_engine_retry_after_a_failed_host_read_gives_a_clean_runs_tokens(tiny_checkpoint, tmp_path):
    import shutil

    path = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "ckpt")  # its mtime is touched
    opts = dict(model=str(path), dtype="float32", kv_cache_gb=0.01, expert_cache_slots=3, cache_policy="lru",
                cpu_experts="off", host_memory="mmap", cache_admission="always")
    clean = [o.token_ids for o in LLM(**opts).generate(PROMPTS, GREEDY)]
    llm = LLM(**opts)
    store = llm.engine.model.store
    hook = RewrittenWhileBatched(store, next(path.glob("*.safetensors")))
    llm.engine.model.runtime.hooks = hook
    clock_before = store.clock
    out = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert hook.failed and hook.seen_at_retry and out == clean
    assert not hook.seen_at_retry[0][0]  # the failed layer's experts are unpinned
    assert hook.seen_at_retry[0][1] > clock_before  # the clock counted the layers the failed forward began
    llm.close()


def test_streamed_copies_that_a_failed_layer_never_made_are_not_counted():
    """Four experts stream through the two staging buffers; the third one's copy fails, so the fourth,
    already queued behind it, is never computed, and the next streamed layer's copy into its buffer
    supersedes it. `copies` counted all four at the start of the layer (6 for 5 made); the ring now
    counts a copy when it submits it and takes back one it drops before it started."""
    from moe_serve.experts.offload import OffloadExpertStore
    from moe_serve.experts.policies import LRUPolicy

    src = BrokenSource()  # expert (1, 2)'s copy fails
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=1, policy=LRUPolicy(), top_k=2,
                               cpu_experts="off", host="mmap", admit="reuse")
    with store.copier._cv:  # the worker is held: a copy runs when this thread waits for it
        store.run(0, torch.randn(1, 8), [0, 0, 0, 1])  # (0, 3) takes the only slot
        with pytest.raises(CopyError, match="expert copy failed"):
            store.run(1, torch.randn(4, 8), [1, 1, 1, 1])  # all four stream; (1, 2) fails, (1, 3) left queued
        assert store.metrics()["streamed"] == 4
        x = torch.randn(1, 8)
        torch.testing.assert_close(store.run(0, x, [0, 1, 0, 0]), expert_forward(x, *src.w[0, 1]))  # streams
    m = store.metrics()
    # made: (0, 3) into the slot; (1, 0), (1, 1), the failed (1, 2) and (0, 1) through the buffers
    assert m["copies"] == 5 and m["bytes_moved"] == 5 * store.expert_bytes and m["streamed"] == 5
    store.close()
