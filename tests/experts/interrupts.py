"""Ctrl-C at every point it could land: a `sys.settrace` tracer that raises KeyboardInterrupt at the
k-th point, in the given code objects, where CPython's eval loop checks for a pending signal.

A signal's KeyboardInterrupt surfaces only at such checks: at a function's entry, after a call
returns and at a backward jump. Raising it before the instruction that follows one of those is
where the exception would surface, so running a scenario once per k tries every place a real
Ctrl-C could land, deterministically.
"""
from __future__ import annotations

import dis
import sys

SIGNAL_CHECKS = {"CALL", "CALL_FUNCTION_EX", "RESUME", "JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_TRUE",
                 "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE"}


def interrupt_at(k: int, functions, armed=lambda: True):
    """(tracer, fired): the tracer raises KeyboardInterrupt at the k-th point (from 0, once) where a
    pending signal is checked, in frames of `functions`: before the instruction that follows one that
    checks (a call that returned, a function's entry, a backward jump). CPython turns the tracer off
    once it raised, so the handlers run untraced: one Ctrl-C. Points count only while `armed()`."""
    opnames = {f.__code__: {i.offset: i.opname for i in dis.get_instructions(f.__code__)} for f in functions if f}
    # offset -> the next instruction's: a call that raised jumps to a handler instead, with no check for signals
    fall_through = {code: dict(zip(sorted(names), sorted(names)[1:])) for code, names in opnames.items()}
    seen, fired = [0], [False]

    def tracer(frame, event, arg):
        if frame.f_code not in opnames:
            return None
        names, after, last = opnames[frame.f_code], fall_through[frame.f_code], [None]
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


def call_interrupted(tracer, fn, *args) -> None:
    """fn(*args) with `tracer` (from interrupt_at) installed; the KeyboardInterrupt it raises is taken as
    the Ctrl-C the scenario is about and swallowed (whether it fired is the tracer's `fired`)."""
    sys.settrace(tracer)
    try:
        fn(*args)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
