"""Per-request results, their summary under `vllm bench serve`'s keys, and server RSS sampling."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float | None = None  # s, request sent -> first content chunk
    itl: list[float] = field(default_factory=list)  # s, between content chunks
    e2el: float = 0.0  # s, request sent -> end of stream


def _stats(name: str, values_s: list[float], out: dict) -> None:
    """mean/median/std/p50/p90/p99 in ms under vLLM's key names (`mean_ttft_ms`, ...)."""
    v = np.asarray(values_s, dtype=np.float64) * 1000.0
    if v.size == 0:
        v = np.zeros(1)
    out[f"mean_{name}_ms"] = float(v.mean())
    out[f"median_{name}_ms"] = float(np.median(v))
    out[f"std_{name}_ms"] = float(v.std())
    for p in (50, 90, 99):
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p))


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    out = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
    }
    _stats("ttft", [r.ttft for r in ok if r.ttft is not None], out)
    _stats("tpot", [(r.e2el - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1 and r.ttft is not None], out)
    _stats("itl", [x for r in ok for x in r.itl], out)
    _stats("e2el", [r.e2el for r in ok], out)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error[:120]
            errors[key] = errors.get(key, 0) + 1
    out["errors"] = errors
    return out


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc/PID/status (VmRSS), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every `interval` s in a thread: [(seconds since start, bytes)]."""

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def _run(self):
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic() - self._t0, rss))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, warmup_s: float) -> dict:
        """RSS after warm-up: first, last, max, and the growth of the last over the first in %."""
        after = [(t, b) for t, b in self.samples if t >= warmup_s]
        if not after:
            return {"rss_samples": len(self.samples)}
        first, last = after[0][1], after[-1][1]
        # the mean of the last 10% of samples against the first 10% damps allocator noise
        k = max(1, len(after) // 10)
        head = float(np.mean([b for _, b in after[:k]]))
        tail = float(np.mean([b for _, b in after[-k:]]))
        return {
            "rss_samples": len(self.samples), "rss_warmup_s": warmup_s,
            "rss_first_after_warmup_mb": first / 2**20, "rss_last_mb": last / 2**20,
            "rss_max_mb": max(b for _, b in after) / 2**20,
            "rss_growth_pct": 100.0 * (tail - head) / head,
            "rss_timeline_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in self.samples[:: max(1, len(self.samples) // 120)]],
        }


def moe_metrics(base_url: str) -> dict:
    """The server's MoE gauges (balancedness per layer, expert cache, predictor) after the run."""
    try:
        text = httpx.get(base_url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    keep = ("moe_serve:expert_", "moe_serve:num_requests")
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines())
            if k.startswith(keep) and not k.startswith("#")}


def machine() -> str:
    import platform

    return f"{platform.machine()} {os.cpu_count()} CPU cores ({platform.processor() or platform.platform()})"
