"""Edge cases of the offloading store: host tiers in another dtype, failed host reads, shutdown with
copies queued, and budgets at their limits (the error names the field and the minimum)."""
from __future__ import annotations

import threading

import pytest
import torch

from moe_serve.config import ExpertCacheConfig
from moe_serve.experts.factory import expert_store_factory
from moe_serve.experts.offload import OffloadExpertStore
from moe_serve.experts.policies import LRUPolicy
from moe_serve.experts.store import expert_forward
from tests.experts.sources import SlowSource, TinySource
from tests.experts.test_offload import run


def bf16_copy(path, to):
    """The checkpoint at `path` with every tensor stored in bfloat16, written to `to`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(path, to)
    for f in to.glob("*.safetensors"):
        save_file({k: t.to(torch.bfloat16) for k, t in load_file(f).items()}, f, metadata={"format": "pt"})
    return to


def test_mmap_experts_computed_in_place_use_the_compute_dtype(tiny_checkpoint, tmp_path):
    """host=mmap hands out the checkpoint's own tensors (bfloat16 here): an expert computed where it
    lies must still run in the model's dtype (float32), as the resident store's converted copy does;
    in bfloat16 the logits moved by ~6e-3."""
    path = bf16_copy(tiny_checkpoint("mixtral"), tmp_path / "bf16")
    (ref_toks, ref_logits), _ = run(path, n=4)
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_policy="lru", host_memory="mmap", cpu_experts="on")
    (toks, logits), store = run(path, expert_store_factory(cfg), n=4)
    assert store.host == "mmap" and store.metrics()["cpu_computed"] > 0
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    store.close()


class UnreadableOnce(TinySource):
    """A checkpoint view whose read of one expert fails once (as a truncated file's would), then works."""

    def __init__(self, bad):
        super().__init__()
        self.bad = set(bad)

    def get(self, l, e):
        if (l, e) in self.bad:
            self.bad.discard((l, e))
            raise OSError(f"cannot read expert ({l}, {e}) from model.safetensors")
        return super().get(l, e)


@pytest.mark.parametrize("evicts", [False, True])
def test_failed_host_read_leaves_no_expert_claiming_a_slot(evicts):
    """host=mmap reads an expert when it is copied in: when that read fails, the error reaches the
    caller and the expert must not stay resident. It did (its slot taken before the read), so its
    next use was a hit on whatever the slot held: zeros, or the evicted expert's weights."""
    src = UnreadableOnce({(1, 2)})
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=1, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="always")
    x = torch.randn(2, 8)
    if evicts:  # the slot already holds another expert, the victim of (1, 2)
        store.begin_layer(0, [1])
        store.compute_expert(0, 1, x)
        store.end_layer(0)
    with pytest.raises(OSError, match="model.safetensors"):
        store.begin_layer(1, [2])
    assert not store.cache.resident(1 * 4 + 2)
    store.begin_layer(1, [2])  # the read works now: a miss, copied in
    torch.testing.assert_close(store.compute_expert(1, 2, x), expert_forward(x, *src.w[1, 2]))
    store.end_layer(1)
    store.close()


def test_close_drops_queued_copies_instead_of_running_them():
    """Engine shutdown closes the store with prefetches still queued: nobody will read them, so
    close() stops the copy thread after the copy it is running, not after every queued one (it ran
    them all, so a slow host tier kept shutdown waiting, and past the 5 s join the thread leaked)."""
    src = SlowSource(0.1)  # each tensor copy out of the host tier takes 100 ms more: 1.6 s for all 8 experts
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=8, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="always")
    for layer in range(2):
        store.prefetch(layer, [0, 1, 2, 3])
    assert store.metrics()["prefetch_issued"] == 8
    worker = store.copier._thread
    done = len(src.copy_s)  # tensors copied so far (the worker started at the first hint)
    store.close()
    assert not worker.is_alive() and worker not in threading.enumerate()
    # at most the expert being copied when close() came (2 tensors, or 4 if one more began meanwhile)
    assert len(src.copy_s) <= done + 4 < 16


def test_budgets_too_small_for_a_slot_per_layer_name_the_field_and_the_minimum(tiny_checkpoint):
    """cache_per_layer gives each MoE layer slots of its own, so it needs one per layer (3 here): a
    smaller budget is refused naming the budget's field and that minimum (it was SlotCache's
    'capacity >= num_layers', naming no option)."""
    from moe_serve.models import load_model

    path = tiny_checkpoint("mixtral")  # 3 MoE layers x 8 experts of 36 KiB each (float32)
    one = 3 * 48 * 64 * 4  # bytes of one expert: gate_up [96, 64] and down [64, 48]
    for budget, says in ((dict(expert_cache_slots=2), r"expert_cache.expert_cache_slots=2: .* >= 3 slots"),
                         (dict(expert_cache_gb=2.5 * one / 2**30),
                          r"expert_cache.expert_cache_gb=.* holds 2 experts.* >= 3 slots")):
        cfg = ExpertCacheConfig(**budget, cache_per_layer=True, cache_policy="lru", cpu_experts="off")
        with pytest.raises(ValueError, match=says):
            load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg))
    cfg = ExpertCacheConfig(expert_cache_slots=3, cache_per_layer=True, cache_policy="lru", cpu_experts="off")
    store = load_model(path, dtype="float32", expert_store_factory=expert_store_factory(cfg)).store
    assert store.capacity == 3 and store.cache.per_layer  # the minimum itself serves (one slot a layer)
    store.close()


@pytest.mark.parametrize("gb", [float("inf"), float("nan")])
def test_a_budget_that_is_no_finite_number_names_the_field(gb):
    """An infinite --expert-cache-gb passed `> 0` and failed later in the slot count with Python's
    'cannot convert float NaN to integer', naming no option."""
    with pytest.raises(ValueError, match="expert_cache.expert_cache_gb must be a finite number > 0"):
        ExpertCacheConfig(expert_cache_gb=gb)


class InterruptedTensor(torch.Tensor):
    """A host tensor whose first copy out raises KeyboardInterrupt (Ctrl-C landing mid-copy)."""

    armed = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.copy_ and InterruptedTensor.armed:
                InterruptedTensor.armed = False
                raise KeyboardInterrupt
            return func(*args, **(kwargs or {}))


def test_copy_interrupted_in_the_waiting_thread_is_copied_again():
    """Ctrl-C in LLM.generate aborts the requests and the engine serves on. When it lands while the
    compute thread runs a copy itself (the worker was busy), the slot holds half an expert: the copy
    was marked done all the same, so the expert's next use was a hit on gate_up without its down."""
    slow = SlowSource(0.3)  # the worker is busy with a slow prefetch: the waiter runs the demand copy

    class Source(TinySource):
        def get(self, l, e):
            if (l, e) == (1, 3):
                return slow.get(l, e)
            gu, dn = super().get(l, e)
            return (gu, dn.as_subclass(InterruptedTensor)) if (l, e) == (0, 1) else (gu, dn)

    src = Source()
    InterruptedTensor.armed = True
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               host="mmap", admit="always")
    store.prefetch(1, [3])
    x = torch.randn(2, 8)
    store.begin_layer(0, [1])
    with pytest.raises(KeyboardInterrupt):  # gate_up copied, then the interrupt
        store.compute_expert(0, 1, x)
    assert not InterruptedTensor.armed
    store.begin_layer(0, [1])  # the next step: resident, and whole
    torch.testing.assert_close(store.compute_expert(0, 1, x), expert_forward(x, *src.w[0, 1]))
    store.end_layer(0)
    store.close()


def test_a_gib_budget_below_one_expert_says_how_much_one_takes():
    """The minimum was printed with 4 decimals: a 36 KiB expert 'takes 0.0000 GiB', no limit at all."""
    from moe_serve.experts.factory import slots_for

    one = 3 * 48 * 64 * 4  # bytes of one expert of the tiny Mixtral (float32)
    says = r"expert_cache.expert_cache_gb=1e-09 holds no expert \(one takes 3.433e-05 GiB"
    with pytest.raises(ValueError, match=says):
        slots_for(ExpertCacheConfig(expert_cache_gb=1e-9), one, 24)
    assert slots_for(ExpertCacheConfig(expert_cache_gb=one / 2**30), one, 24) == 1  # exactly one expert fits


def test_metrics_after_a_reset_count_only_what_happened_since():
    """reset_metrics() (the benches call it after warm-up) forgot the counts but not which experts
    had been prefetched: prefetches issued before it were counted after it as late, used or
    cancelled (taking their copy off `copies`, counted before): here 2 cancelled and 2 late of 1
    issued, and 0 copies where 2 were made."""
    src = TinySource()
    store = OffloadExpertStore(src, torch.float32, "cpu", capacity=3, policy=LRUPolicy(), top_k=2, cpu_experts="off",
                               admit="always")
    with store.copier._cv:  # the worker is held: copies run only when waited for (here), in this order
        store.prefetch(0, [0, 1])
        store.prefetch(1, [1])
        store.reset_metrics()
        store.begin_layer(0, [2])  # evicts (0, 0), prefetched before the reset, copy not started
        assert torch.equal(store.get(0, 2)[0], src.w[0, 2][0])
        store.end_layer(0)
        store.prefetch(1, [0])  # evicts (0, 1), the same
        store.begin_layer(1, [0, 1])  # (1, 0): prefetched since, not started: late; (1, 1): a hit
        for e in (0, 1):
            assert torch.equal(store.get(1, e)[1], src.w[1, e][1])
        store.end_layer(1)
    m = store.metrics()
    assert m["copies"] == 2 and m["bytes_moved"] == 2 * store.expert_bytes  # (0, 2) and the prefetch of (1, 0)
    assert m["prefetch_issued"] == 1 and m["prefetch_cancelled"] == 0 and m["prefetch_late"] == 1
    assert (m["hits"], m["misses"]) == (1, 2) and m["prefetch_precision"] == 0.0
    store.close()


def test_a_store_that_computes_every_miss_in_place_allocates_no_slots(tiny_checkpoint):
    """On a CPU device with cpu_experts auto (the default) or on, every miss runs where its weights
    lie and nothing is ever copied in; the store still allocated (and faulted in) the whole budget
    of slots plus the staging buffers: --expert-cache-gb 8 took 8 GB more RAM than the resident store."""
    path = tiny_checkpoint("mixtral")
    (ref_toks, ref_logits), _ = run(path, n=4)
    cfg = ExpertCacheConfig(expert_cache_slots=12, cache_policy="lru", cpu_experts="auto", host_memory="copy")
    (toks, logits), store = run(path, expert_store_factory(cfg), n=4)
    assert store.in_place_only and store.nbytes() == 0
    assert store.slot_gu.numel() == 0 and store.slot_dn.numel() == 0 and store.ring is None
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    m = store.metrics()
    assert m["cpu_computed"] == m["misses"] > 0 and m["copies"] == 0
    store.close()


def test_the_cost_models_choices_are_what_the_metrics_report(tiny_checkpoint):
    """cpu_experts auto on a GPU: per miss, the start-up cost model picks copy-in or compute-in-place
    by the miss's rows. Here that choice is made on the CPU (the store built with real slots, then
    given a cost model as a GPU would measure it: a miss of up to 2 rows is cheaper where it lies);
    the tokens are the resident store's, and cpu_computed counts exactly the in-place choices."""
    from moe_serve.experts.cost import ExpertCosts
    from moe_serve.models import load_model
    from tests.experts.test_offload import PROMPT, greedy

    class Counted(ExpertCosts):
        in_place = 0

        def compute_on_cpu(self, rows):
            chosen = super().compute_on_cpu(rows)
            self.in_place += chosen
            return chosen

    def factory(spec, source, dtype, device):
        store = OffloadExpertStore(source, dtype, device, 24, LRUPolicy(), top_k=2, cpu_experts="off",
                                   admit="always")  # every expert fits: no miss runs in place for want of a slot
        store.cpu_mode = "auto"
        store.costs = Counted(store.expert_bytes, bandwidth=store.expert_bytes / 1e-3, device_s=(0.0, 1e-4),
                              cpu_s=(5e-4, 3e-4))  # copy 1.0 + 0.1/row ms, in place 0.5 + 0.3/row ms
        return store

    path = tiny_checkpoint("mixtral")
    (ref_toks, ref_logits), _ = run(path, n=4)
    model = load_model(path, dtype="float32", expert_store_factory=factory)
    model.allocate_kv_cache(2, 64)
    with torch.no_grad():
        toks, logits = greedy(model, PROMPT, 4)
    assert toks == ref_toks
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    m, costs = model.store.metrics(), model.store.costs
    assert m["cpu_computed"] == costs.in_place > 0 and m["copies"] > 0
    assert costs.compute_on_cpu(2) and not costs.compute_on_cpu(3)
    assert m["misses"] == m["cpu_computed"] + m["copies"] and m["bytes_moved"] == m["copies"] * model.store.expert_bytes
    model.store.close()


@pytest.mark.parametrize("cpu_experts, allocated", [("auto", 0), ("on", 0), ("off", 5)])
def test_capacity_reports_the_slots_allocated_and_the_budget_apart(cpu_experts, allocated):
    """A store that computes every miss in place allocates no slot, yet metrics()["capacity"] said the
    configured 5: a cache of 5 experts that never held one. capacity is what is allocated,
    capacity_configured the budget."""
    store = OffloadExpertStore(TinySource(), torch.float32, "cpu", 5, LRUPolicy(), top_k=2, cpu_experts=cpu_experts,
                               admit="always")
    m = store.metrics()
    assert m["capacity"] == allocated == store.slot_gu.shape[0] == store.slot_dn.shape[0]
    assert m["capacity_configured"] == 5
    store.close()
