"""The copy engines (copier.py), the queue they share (copy_queue.py) and the staging ring.

The CUDA copier's host-side logic runs on CPU too (torch.cpu's stream and event stand-ins: copies
land at once), so its contract is tested here without a GPU; what needs real streams is marked.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from moe_serve.experts.copier import CopyError, StreamCopier, ThreadCopier
from moe_serve.experts.copy_queue import CopyQueue
from moe_serve.experts.staging import StagingRing
from tests.experts.sources import settle


COPIERS = {"thread": lambda n: ThreadCopier(n), "stream": lambda n: StreamCopier(torch.device("cpu"), n)}


@pytest.mark.parametrize("kind", sorted(COPIERS))
def test_copier_copies_in_order_and_reports_errors(kind):
    """Both copiers' contract: the last copy into a slot wins; a failed copy never raises from
    `submit`, it is a `CopyError` (slot, ticket) raised by `wait`: to its own waiter, and a failure
    nobody waits for (a prefetch, in the worker or issued from the CUDA copier's host queue) to the
    next waiter, whichever copy it waits on, once."""
    c = COPIERS[kind](4)
    dst = torch.zeros(4, 1000)
    tickets = [c.submit([(dst[i % 4], torch.full((1000,), float(i)))], i % 4, need=None if i % 3 else i)
               for i in range(12)]
    for i in range(8, 12):
        c.wait(tickets[i], i % 4)
    assert all(c.ready(t, i % 4) for i, t in enumerate(tickets[8:], 8))
    assert dst[:, 0].tolist() == [8.0, 9.0, 10.0, 11.0]  # the last copy into each slot wins
    bad = c.submit([(torch.zeros(3), torch.zeros(4))], 0)  # shape mismatch: a demand copy that fails
    with pytest.raises(CopyError, match="expert copy failed") as info:
        c.wait(bad, 0)
    assert info.value.slot == 0 and info.value.ticket == bad
    c.wait(bad, 0)  # reported once
    bad = c.submit([(torch.zeros(3), torch.zeros(4))], 1, need=1)  # a prefetch that fails: reported to
    good = c.submit([(dst[2], torch.ones(1000))], 2, need=2)  # the next waiter, whichever copy it waits on
    settle(c, (bad, 1))
    with pytest.raises(CopyError, match="expert copy failed") as info:
        c.wait(good, 2)
    assert info.value.slot == 1 and info.value.ticket == bad and c.ready(bad, 1)
    c.wait(good, 2)  # reported once
    assert dst[2, 0] == 1.0
    c.close()


def test_thread_copier_runs_demand_first_then_by_need_and_waiters_take_queued_copies():
    """Queued while the worker is held: the worker runs the demand copy first, then the promoted
    prefetch, then the rest by need clock; a cancelled copy and a superseded one (same slot) never
    run; a copy still queued when someone waits for it runs in the waiting thread. With
    worker_demand=False the worker leaves demand copies to their waiters."""
    order = []

    class Dst:  # a destination that records when, and in which thread, its copy ran
        def __init__(self, name):
            self.name = name

        def copy_(self, src):
            order.append((self.name, threading.current_thread().name))

    me = threading.current_thread().name
    for worker_demand in (True, False):
        order.clear()
        c = ThreadCopier(7, worker_demand=worker_demand)
        with c._cv:  # the worker cannot pop until everything is queued
            t9 = c.submit([(Dst("p9"), None)], 0, need=9)
            c.submit([(Dst("p3"), None)], 1, need=3)
            late = c.submit([(Dst("p5"), None)], 2, need=5)
            cut = c.submit([(Dst("p4"), None)], 3, need=4)
            demand = c.submit([(Dst("demand"), None)], 4)
            assert c.cancel(cut, 3) and not c.cancel(cut, 3)  # its expert was evicted before the copy started
            assert c.promote(late, 2)  # needed before its copy started
            c.submit([(Dst("p7-old"), None)], 5, need=7)
            t8 = c.submit([(Dst("p8-new"), None)], 5, need=8)  # a new copy into slot 5 supersedes the queued one
            assert c.queued_prefetches() == 3
            mine = c.submit([(Dst("p1-waited"), None)], 6, need=1)
            c.wait(mine, 6)  # queued, not started: runs here, at once, though the worker is held
        assert order == [("p1-waited", me)]
        settle(c, (t9, 0), (t8, 5))
        worker = [n for n, th in order if th == "expert-copier"]
        if worker_demand:
            settle(c, (demand, 4), (late, 2))
            assert worker == ["demand", "p5", "p3", "p8-new", "p9"]
        else:
            assert worker == ["p3", "p8-new", "p9"]
            assert not c.ready(demand, 4) and not c.ready(late, 2)  # left to their waiters
            c.wait(late, 2)
            c.wait(demand, 4)
            assert order[-2:] == [("p5", me), ("demand", me)]
        assert not c.promote(late, 2) and c.ready(late, 2)
        with pytest.raises(RuntimeError, match="cancelled"):
            c.wait(cut, 3)
        c.close()


def test_thread_copier_counts_queued_prefetches_while_the_worker_pops():
    """`queued_prefetches` (the store asks it per prefetch) reads the queue the worker changes: it
    must hold the lock, or the count can see the dict change size mid-iteration (RuntimeError)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    c = ThreadCopier(32)
    dst, src = torch.zeros(32, 4), torch.ones(4)
    try:
        for _ in range(1000):
            for s in range(32):
                c.submit([(dst[s], src)], s, need=s)
                assert 0 <= c.queued_prefetches() <= 32
    finally:
        sys.setswitchinterval(old)
        c.close()


def test_thread_copier_waits_for_an_earlier_copy_into_the_slot():
    """A demand copy into a slot whose prefetch is still running in the worker starts only after
    it: the later copy's bytes win."""
    started, go = threading.Event(), threading.Event()

    class Slow:  # the worker's copy into slot 0 runs until the test lets it go
        def copy_(self, src):
            started.set()
            go.wait(5)
            dst.copy_(torch.zeros(8))

    dst = torch.full((8,), -1.0)
    c = ThreadCopier(1)
    c.submit([(Slow(), None)], 0, need=1)
    assert started.wait(5)
    t = c.submit([(dst, torch.ones(8))], 0)  # the prefetch's expert was evicted; a demand copy follows
    threading.Timer(0.05, go.set).start()
    c.wait(t, 0)
    assert dst.tolist() == [1.0] * 8
    c.close()


def test_staging_ring_fills_ahead_in_any_order():
    """Each streamed expert's buffers hold its own weights when `get` returns, in the ring's order
    (the worker fills the next buffer while one is read) and out of it (a buffer is taken back
    from an expert that runs later, which is then copied again)."""
    srcs = [(torch.full((4, 3), float(j)), torch.full((3, 2), -float(j))) for j in range(5)]
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1]):
        c = ThreadCopier(3)
        ring = StagingRing(c, 1, 2, torch.zeros(4, 3), torch.zeros(3, 2))  # copier slots 1 and 2
        ring.start(srcs)
        for j in order:
            gu, dn = ring.get(j)
            assert torch.equal(gu, srcs[j][0]) and torch.equal(dn, srcs[j][1]), (order, j)
            ring.done(j)
        assert ring.owner == [-1, -1] and not ring.where
        c.close()


def test_copy_queue_order_supersede_cancel_promote_and_busy_slots():
    """The queue both copiers share: demand first in submission order, then prefetches by need;
    one queued copy per slot; a copy whose slot is busy waits until `resume`."""
    q = CopyQueue()
    q.push(1, 0, "p9", need=9)
    q.push(2, 1, "p3", need=3)
    q.push(3, 2, "p5", need=5)
    q.push(4, 3, "d", need=None)
    q.push(5, 4, "p4", need=4)
    q.push(6, 5, "p7", need=7)
    q.push(7, 5, "p8", need=8)  # supersedes p7 in slot 5
    assert q.take(5, 4) == "p4" and q.take(5, 4) is None  # cancelled
    assert q.promote(3, 2) and not q.promote(4, 3)  # a demand copy is not a prefetch to promote
    assert q.prefetches() == 3 and q.has(7, 5) and not q.has(6, 5)
    q.drop(0)  # a newer copy into slot 0 went past the queue
    out = []
    while (job := q.pop(busy={1})) is not None:
        out.append(job)
    assert out == [(3, 4, "d"), (2, 3, "p5"), (5, 7, "p8")]  # slot 1 busy: p3 waits
    q.resume(1)
    assert q.pop() == (1, 2, "p3") and q.pop() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (StreamCopier)")
def test_stream_copier_lands_cancels_and_promotes_on_cuda():
    """Prefetches wait on the host beyond `depth` (64 MB copies, so the queue fills); whatever
    cancel and promote report, every copy that was not cancelled lands, the cancelled one never."""
    dev = torch.device("cuda")
    n = 1 << 24
    c = StreamCopier(dev, 6, depth=1)
    dst = torch.zeros(6, n, device=dev)
    src = [torch.full((n,), float(i)).pin_memory() for i in range(6)]
    t = [c.submit([(dst[i], src[i])], i, need=10 + i) for i in range(5)]
    cancelled = c.cancel(t[4], 4)  # True while still on the host
    c.promote(t[3], 3)  # issued now if still on the host
    d = c.submit([(dst[5], src[5])], 5)  # demand: on the stream at once
    for i in (0, 1, 2, 3):
        c.wait(t[i], i)
    c.wait(d, 5)
    c.release(range(6))
    torch.cuda.synchronize()
    assert dst[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0 if cancelled else 4.0, 5.0]
    assert torch.equal(dst[3], src[3].to(dev)) and c.queued_prefetches() == 0
    c.close()


def test_stream_copier_host_side_on_cpu():
    """The CUDA copier's host-side logic on torch.cpu's stand-ins (copies land at once, events are
    always done). With depth 0 no prefetch is issued until it is needed, so cancel, promote and a
    wait that issues a queued copy all run; a demand copy goes out at once and supersedes a queued
    prefetch into its slot; with depth 1 a prefetch goes out at once (nothing is in flight)."""
    c = StreamCopier(torch.device("cpu"), 4, depth=0)
    dst = torch.zeros(4, 2)
    src = [torch.full((2,), float(i)) for i in range(6)]
    t = [c.submit([(dst[i], src[i])], i, need=10 + i) for i in range(3)]
    assert c.queued_prefetches() == 3 and not any(c.ready(t[i], i) for i in range(3))
    assert c.cancel(t[2], 2) and not c.cancel(t[2], 2)  # only while still on the host
    with pytest.raises(RuntimeError, match="copy 3 into slot 2 was cancelled"):  # as ThreadCopier does
        c.wait(t[2], 2)
    assert c.promote(t[1], 1) and not c.promote(t[1], 1) and c.ready(t[1], 1)
    c.wait(t[0], 0)  # still on the host when needed: the wait issues it
    stale = c.submit([(dst[3], src[4])], 3, need=30)
    d = c.submit([(dst[3], src[3])], 3)  # a demand copy into slot 3: the queued prefetch is dropped
    c.wait(d, 3)
    assert not c.cancel(stale, 3) and c.queued_prefetches() == 0
    c.wait(stale, 3)  # superseded by a later copy into its slot: nothing to raise
    c.release(range(4))
    assert dst[:, 0].tolist() == [0.0, 1.0, 0.0, 3.0]  # the cancelled copy and the superseded one never ran
    c.close()
    c = StreamCopier(torch.device("cpu"), 1, depth=1)
    t = c.submit([(dst[0], src[5])], 0, need=1)
    assert c.queued_prefetches() == 0 and c.ready(t, 0) and dst[0, 0] == 5.0
    c.close()


def _cpu_s(thread) -> float:
    """CPU time `thread` has used so far (Linux: its own clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def test_idle_worker_sleeps_until_there_is_a_copy_and_close_joins_it():
    """With nothing to copy the worker blocks on its condition without a timeout: over an idle
    period it is never woken and uses no CPU (a poll or spin would do one or the other); a new
    copy wakes it; close stops and joins it."""
    c = ThreadCopier(2)
    dst = torch.zeros(2, 4)
    t = c.submit([(dst[0], torch.ones(4))], 0, need=1)  # the worker runs it, then goes idle
    settle(c, (t, 0))
    woken, cpu = c.wakeups, _cpu_s(c._thread)
    time.sleep(0.3)
    assert c.wakeups == woken and _cpu_s(c._thread) - cpu < 0.005
    t = c.submit([(dst[1], torch.ones(4))], 1, need=2)
    settle(c, (t, 1))
    assert c.ready(t, 1) and dst[1, 0] == 1.0 and c.wakeups == woken + 1
    c.close()
    assert not c._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        c.submit([(dst[0], torch.ones(4))], 0)


@pytest.mark.parametrize("kind", sorted(COPIERS))
def test_a_copy_whose_check_fails_is_a_failed_copy(kind):
    """CheckedPairs (host=mmap: is the checkpoint file unchanged?) runs its check right before the
    copy, in whichever thread runs it: a failing check is that copy's CopyError at `wait`, with the
    check's error as the cause, and the destination is not written."""
    from moe_serve.experts.copy_failures import CheckedPairs

    def truncated():
        raise OSError("model.safetensors changed after it was memory-mapped")

    c = COPIERS[kind](2)
    dst = torch.zeros(8)
    bad = c.submit(CheckedPairs([(dst, torch.ones(8))], truncated), 0)
    with pytest.raises(CopyError, match="OSError: model.safetensors changed") as info:
        c.wait(bad, 0)
    assert isinstance(info.value.__cause__, OSError) and dst.tolist() == [0.0] * 8
    good = c.submit(CheckedPairs([(dst, torch.ones(8))], lambda: None), 1)
    c.wait(good, 1)
    assert dst.tolist() == [1.0] * 8
    c.close()
