"""Ctrl-C (KeyboardInterrupt) landing at any point of `ThreadCopier.wait` while the waiting thread runs
a copy itself: the copier must stay consistent (LLM.generate aborts its requests on Ctrl-C and serves
on), so a later wait gets the whole copy and the worker is never blocked on the slot.

The interrupt is raised at every point a real one could land, one per run (`interrupts.py`).
"""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from moe_serve.experts import copy_failures, copy_queue
from moe_serve.experts.copier import ThreadCopier
from tests.experts.interrupts import call_interrupted, interrupt_at

SRC = (torch.arange(12.0).reshape(4, 3), torch.arange(6.0).reshape(3, 2))
TRACED = (ThreadCopier.wait, ThreadCopier._finished, copy_failures.copy_pairs, copy_queue.CopyQueue.take,
          getattr(copy_queue.CopyQueue, "peek", None), getattr(ThreadCopier, "_drop_claim", None))


def interrupted_wait(k: int):
    """A demand copy run by this thread's `wait` (worker_demand=False: the worker leaves it to its
    waiter), interrupted at the k-th point: (copier, ticket, dst, interrupted)."""
    c = ThreadCopier(1, worker_demand=False)
    dst = (torch.zeros(4, 3), torch.zeros(3, 2))
    ticket = c.submit([(dst[0], SRC[0]), (dst[1], SRC[1])], 0)
    tracer, fired = interrupt_at(k, TRACED)
    call_interrupted(tracer, c.wait, ticket, 0)
    return c, ticket, dst, fired[0]


def test_ctrl_c_at_any_instruction_of_wait_leaves_the_copy_to_be_run_again():
    """Interrupted right after taking its copy off the queue, a wait lost the copy (every later wait
    on it: 'cancelled'); interrupted between the lock's release and the try whose finally puts the
    copy back, it left the slot claimed by nobody: the next wait on it (and every copy the worker had
    for the slot) waited forever."""
    k = 0
    while True:
        c, ticket, dst, interrupted = interrupted_wait(k)
        if not interrupted:  # wait ran to its end before a k-th instruction: every point was tried
            assert k > 10 and torch.equal(dst[0], SRC[0]) and torch.equal(dst[1], SRC[1])
            c.close()
            return
        assert 0 not in c._running, f"interrupted at point {k}, the slot stays claimed: {c._running}"
        errors = []

        def wait_elsewhere():
            try:
                c.wait(ticket, 0)
            except Exception as exc:  # noqa: BLE001 - e.g. 'cancelled': the copy was lost
                errors.append(exc)

        other = threading.Thread(target=wait_elsewhere, daemon=True)  # another thread: no claim of its own to find
        other.start()
        other.join(5)
        assert not other.is_alive(), f"interrupted at point {k}, the copy can never be waited for"
        assert not errors, f"interrupted at point {k}: {errors}"
        assert torch.equal(dst[0], SRC[0]) and torch.equal(dst[1], SRC[1]), k
        later = c.submit([(dst[0], SRC[0] + 1), (dst[1], SRC[1] + 1)], 0)  # the slot takes new copies
        c.wait(later, 0)
        assert torch.equal(dst[0], SRC[0] + 1), k
        c.close()
        k += 1


class FirstCopyInterrupted(torch.Tensor):
    """A host tensor whose first copy out raises KeyboardInterrupt (a Ctrl-C landing mid-copy)."""

    fired = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.copy_ and not FirstCopyInterrupted.fired:
                FirstCopyInterrupted.fired = True
                raise KeyboardInterrupt
            return func(*args, **(kwargs or {}))


def test_a_second_ctrl_c_in_the_handler_is_repaired_by_the_next_wait():
    """A first Ctrl-C mid-copy, a second one at any point of the handler that puts the copy back:
    whatever the handler left, this thread's next wait on the slot gets the whole copy."""
    j = 0
    while True:
        FirstCopyInterrupted.fired = False
        c = ThreadCopier(1, worker_demand=False)
        dst = (torch.zeros(4, 3), torch.zeros(3, 2))
        ticket = c.submit([(dst[0], SRC[0]), (dst[1], SRC[1].as_subclass(FirstCopyInterrupted))], 0)
        tracer, fired = interrupt_at(j, TRACED, armed=lambda: FirstCopyInterrupted.fired)
        call_interrupted(tracer, c.wait, ticket, 0)
        if not fired[0]:  # the handler ran to its end before a j-th point: every point was tried
            assert j > 3
            c.close()
            return
        hung = threading.Timer(5, os.kill, (os.getpid(), signal.SIGINT))  # a wait that hangs gets a real Ctrl-C
        hung.start()
        try:
            c.wait(ticket, 0)
        except KeyboardInterrupt:
            pytest.fail(f"the second Ctrl-C at point {j} of the handler left a wait that never returns")
        finally:
            hung.cancel()
        assert torch.equal(dst[0], SRC[0]) and torch.equal(dst[1], SRC[1]), j
        assert not c._running, j
        c.close()
        j += 1
