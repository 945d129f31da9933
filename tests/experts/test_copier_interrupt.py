"""Ctrl-C (KeyboardInterrupt) landing at any point of `ThreadCopier.wait` while the waiting thread runs
a copy itself: the copier must stay consistent (LLM.generate aborts its requests on Ctrl-C and serves
on), so a later wait gets the whole copy and the worker is never blocked on the slot.

A signal's KeyboardInterrupt surfaces only where CPython's eval loop checks for pending signals: at a
function's entry, after a call returns and at a backward jump. A `sys.settrace` tracer raises it at
each such point in turn (in `wait` and the copier code it calls), one point per run, so every place a
real Ctrl-C could land is tried, deterministically.
"""
from __future__ import annotations

import dis
import os
import signal
import sys
import threading

import pytest
import torch

from moe_serve.experts import copy_failures, copy_queue
from moe_serve.experts.copier import ThreadCopier

SRC = (torch.arange(12.0).reshape(4, 3), torch.arange(6.0).reshape(3, 2))
TRACED = [f.__code__ for f in (ThreadCopier.wait, ThreadCopier._finished, copy_failures.copy_pairs,
                               copy_queue.CopyQueue.take, getattr(copy_queue.CopyQueue, "peek", None),
                               getattr(ThreadCopier, "_drop_claim", None)) if f]
SIGNAL_CHECKS = {"CALL", "CALL_FUNCTION_EX", "RESUME", "JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_TRUE",
                 "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE"}
OPNAMES = {code: {i.offset: i.opname for i in dis.get_instructions(code)} for code in TRACED}
# offset -> the next instruction's: a call that raised jumps to a handler instead, with no check for signals
FALL_THROUGH = {code: dict(zip(sorted(names), sorted(names)[1:])) for code, names in OPNAMES.items()}


def interrupt_at(k: int, armed=lambda: True):
    """(tracer, fired): the tracer raises KeyboardInterrupt at the k-th point (from 0, once) where a
    pending signal is checked: before the instruction that follows one that checks (a call that
    returned, a function's entry, a backward jump), which is where the exception would surface. CPython turns
    the tracer off once it raised, so the handlers run untraced: one Ctrl-C. Points count only
    while `armed()`."""
    seen, fired = [0], [False]

    def tracer(frame, event, arg):
        if frame.f_code not in OPNAMES:
            return None
        names, after, last = OPNAMES[frame.f_code], FALL_THROUGH[frame.f_code], [None]
        frame.f_trace_opcodes = True

        def local(frame, event, arg):
            if event == "opcode":
                checked = names.get(last[0]) in SIGNAL_CHECKS
                if names.get(last[0], "").startswith("CALL") and after.get(last[0]) != frame.f_lasti:
                    checked = False  # the call raised: its exception is being handled, no signal check
                if checked and armed():
                    if seen[0] == k:
                        fired[0] = True
                        raise KeyboardInterrupt
                    seen[0] += 1
                last[0] = frame.f_lasti
            return local

        return local

    return tracer, fired


def interrupted_wait(k: int):
    """A demand copy run by this thread's `wait` (worker_demand=False: the worker leaves it to its
    waiter), interrupted before the k-th instruction of `wait`: (copier, ticket, dst, interrupted)."""
    c = ThreadCopier(1, worker_demand=False)
    dst = (torch.zeros(4, 3), torch.zeros(3, 2))
    ticket = c.submit([(dst[0], SRC[0]), (dst[1], SRC[1])], 0)
    tracer, fired = interrupt_at(k)
    sys.settrace(tracer)
    try:
        c.wait(ticket, 0)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
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
        tracer, fired = interrupt_at(j, armed=lambda: FirstCopyInterrupted.fired)
        sys.settrace(tracer)
        try:
            c.wait(ticket, 0)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
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
