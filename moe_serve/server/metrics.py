"""Prometheus metrics of one server: vLLM's names under a `moe_serve:` prefix, plus MoE metrics.

Each app owns its registry (no global singletons), so two servers in one process, or a test that
builds several apps, never share counters. Per-request histograms are observed by the handlers when
a request ends; engine-side gauges (queue depth, expert cache, predictor, per-layer balancedness) are
read from an `EngineStats` snapshot at scrape time, and a quantity the engine does not expose is
simply absent rather than reported as 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "moe_serve:"
# vLLM's buckets (seconds), so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass
class EngineStats:
    """What the engine exposes at one instant; None means "the engine does not report this"."""

    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    expert_load: np.ndarray | None = None  # [L, E] tokens routed to each expert of each MoE layer
    cache: dict[str, float] = field(default_factory=dict)  # hits, misses, bytes_moved (cumulative)
    predictor: dict[str, float] = field(default_factory=dict)  # precision, recall in [0, 1]


def balancedness(load: np.ndarray) -> np.ndarray:
    """[L, E] load -> [L] mean/max per layer (1.0 = perfectly even; a layer with no load counts as 1)."""
    load = np.asarray(load, dtype=np.float64)
    mx = load.max(axis=-1)
    return np.where(mx > 0, load.mean(axis=-1) / np.where(mx > 0, mx, 1.0), 1.0)


class _EngineCollector:
    """Reads an EngineStats snapshot on every scrape."""

    def __init__(self, stats_fn: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self.stats_fn, self.in_flight = stats_fn, in_flight

    def describe(self):
        return []

    def collect(self):
        s = self.stats_fn()
        yield GaugeMetricFamily(P + "num_requests_in_flight", "requests the server holds (admitted, not finished)",
                                value=self.in_flight())
        if s.num_requests_running is not None:
            yield GaugeMetricFamily(P + "num_requests_running", "requests in the engine's running batch",
                                    value=s.num_requests_running)
        if s.num_requests_waiting is not None:
            yield GaugeMetricFamily(P + "num_requests_waiting", "requests queued in the engine",
                                    value=s.num_requests_waiting)
        if s.expert_load is not None and np.size(s.expert_load):
            load = np.asarray(s.expert_load)
            bal = GaugeMetricFamily(P + "expert_balancedness", "mean/max of per-expert token load per MoE layer",
                                    labels=["layer"])
            for layer, b in enumerate(balancedness(load)):
                bal.add_metric([str(layer)], float(b))
            yield bal
            total = CounterMetricFamily(P + "expert_routed_tokens", "token-expert assignments per MoE layer",
                                        labels=["layer"])
            for layer, n in enumerate(load.sum(axis=-1)):
                total.add_metric([str(layer)], float(n))
            yield total
        c = s.cache
        if "hits" in c and "misses" in c:
            yield CounterMetricFamily(P + "expert_cache_hits", "expert lookups served from the cache", value=c["hits"])
            yield CounterMetricFamily(P + "expert_cache_misses", "expert lookups that had to fetch", value=c["misses"])
            looked = c["hits"] + c["misses"]
            if looked > 0:
                yield GaugeMetricFamily(P + "expert_cache_hit_rate", "hits / (hits + misses) since start",
                                        value=c["hits"] / looked)
        if "bytes_moved" in c:
            yield CounterMetricFamily(P + "expert_cache_bytes_moved", "expert weight bytes copied into the cache",
                                      value=c["bytes_moved"])
        for key in ("precision", "recall"):
            if key in s.predictor:
                yield GaugeMetricFamily(P + f"expert_predictor_{key}", f"prefetch {key} of the expert predictor",
                                        value=s.predictor[key])


class ServerMetrics:
    """The registry of one app and the per-request series the handlers record."""

    def __init__(self, model_name: str, stats_fn: Callable[[], EngineStats] = EngineStats,
                 in_flight: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(P + "time_to_first_token_seconds", "time to first token", labels, registry=r,
                              buckets=TTFT_BUCKETS)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "mean time per output token after the first",
                              labels, registry=r, buckets=TPOT_BUCKETS)
        self.itl = Histogram(P + "inter_token_latency_seconds", "time between streamed token deltas", labels,
                             registry=r, buckets=TPOT_BUCKETS)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "request latency, arrival to last token", labels,
                             registry=r, buckets=E2E_BUCKETS)
        self.prompt_hist = Histogram(P + "request_prompt_tokens", "prompt tokens per request", labels, registry=r,
                                     buckets=TOKEN_BUCKETS)
        self.gen_hist = Histogram(P + "request_generation_tokens", "generated tokens per request", labels,
                                  registry=r, buckets=TOKEN_BUCKETS)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens processed", labels, registry=r)
        self.gen_tokens = Counter(P + "generation_tokens", "tokens generated", labels, registry=r)
        self.success = Counter(P + "request_success", "requests finished", labels + ["finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "requests answered with an error", labels + ["status"],
                              registry=r)
        for series in (self.ttft, self.tpot, self.itl, self.e2e, self.prompt_hist, self.gen_hist,
                       self.prompt_tokens, self.gen_tokens):
            series.labels(model_name)  # present (at 0) before the first request, as vLLM's are
        r.register(_EngineCollector(stats_fn, in_flight))

    def observe_request(self, *, prompt_tokens: int, output_tokens: int, e2e_s: float, ttft_s: float | None,
                        tpot_s: float | None, finish_reason: str | None) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.gen_tokens.labels(m).inc(output_tokens)
        self.prompt_hist.labels(m).observe(prompt_tokens)
        self.gen_hist.labels(m).observe(output_tokens)
        self.e2e.labels(m).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
        if tpot_s is not None and output_tokens > 1:
            self.tpot.labels(m).observe(tpot_s)
        self.success.labels(m, finish_reason or "unknown").inc()

    def observe_itl(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
