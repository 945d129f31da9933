"""Timing a step at start-up (the expert cost model, the compiled decode's batch size): best of a few
calls after an untimed one, with the device's queued work waited for inside each call."""
from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CPU runs it synchronously: nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` (each until `device` is done), after one
    untimed call."""
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
