"""/metrics in Prometheus format after real traffic, and routing-trace recording on a live server."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictors.traces import load_trace


def families(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fam, suffix: str = "", **labels) -> float:
    for s in fam.samples:
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{fam.name}{suffix} {labels}")


def test_metrics_count_real_requests(server):
    before = families(server)
    outs = [httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "The lazy dog", "max_tokens": n, "ignore_eos": True}).json()
            for n in (3, 5)]
    after = families(server)
    m = server.model
    gen = sum(o["usage"]["completion_tokens"] for o in outs)
    prompt = sum(o["usage"]["prompt_tokens"] for o in outs)
    delta = lambda name, suffix="": value(after[name], suffix, model_name=m) - value(before[name], suffix, model_name=m)  # noqa: E731
    assert delta("moe_serve:generation_tokens", "_total") == gen == 8
    assert delta("moe_serve:prompt_tokens", "_total") == prompt
    for hist in ("moe_serve:time_to_first_token_seconds", "moe_serve:time_per_output_token_seconds",
                 "moe_serve:e2e_request_latency_seconds", "moe_serve:request_generation_tokens"):
        assert after[hist].type == "histogram"
        assert delta(hist, "_count") == 2
    assert delta("moe_serve:request_generation_tokens", "_sum") == 8
    assert delta("moe_serve:e2e_request_latency_seconds", "_sum") > 0
    assert value(after["moe_serve:request_success"], "_total", model_name=m, finished_reason="length") >= 2
    assert value(after["moe_serve:num_requests_running"]) == 0
    assert value(after["moe_serve:num_requests_waiting"]) == 0


def test_balancedness_per_moe_layer(server):
    httpx.post(server.url + "/v1/completions", json={"prompt": "Hello world", "max_tokens": 4}, timeout=60)
    fams = families(server)
    bal = {s.labels["layer"]: s.value for s in fams["moe_serve:expert_balancedness"].samples}
    routed = {s.labels["layer"]: s.value for s in fams["moe_serve:expert_routed_tokens"].samples}
    assert sorted(bal) == ["0", "1"]  # the tiny checkpoint has 2 MoE layers
    assert all(0.25 <= b <= 1.0 for b in bal.values())  # mean/max with 4 experts lies in [1/4, 1]
    assert all(r > 0 for r in routed.values())
    # the resident store keeps no cache counters: they are absent, not reported as 0
    assert "moe_serve:expert_cache_hit_rate" not in fams


def test_expert_cache_metrics_come_from_the_offloading_store(strict_server):
    s = strict_server
    r = httpx.post(s.url + "/v1/completions", headers=s.headers, json={"prompt": "Hello there", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.get(s.url + "/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    hits = value(fams["moe_serve:expert_cache_hits"], "_total")
    misses = value(fams["moe_serve:expert_cache_misses"], "_total")
    assert hits + misses > 0  # 4 slots for 8 experts: every step looks experts up
    assert value(fams["moe_serve:expert_cache_hit_rate"]) == pytest.approx(hits / (hits + misses))
    assert value(fams["moe_serve:expert_cache_bytes_moved"], "_total") >= 0


def test_trace_start_stop_dump(server):
    url = server.url + "/v1/traces"
    started = httpx.post(url + "/start", timeout=30).json()
    assert started == {"recording": True, "sequences": 0, "tokens": 0}
    out = httpx.post(server.url + "/v1/completions", json={"prompt": [3, 4, 5, 6, 7], "max_tokens": 4,
                                                           "ignore_eos": True}, timeout=60).json()
    stopped = httpx.post(url + "/stop", timeout=30).json()
    # every token fed to the model has a row: the prompt and all generated tokens but the last
    assert stopped == {"recording": False, "sequences": 1, "tokens": 5 + 4 - 1}
    httpx.post(server.url + "/v1/completions", json={"prompt": "not recorded", "max_tokens": 2}, timeout=60)
    dumped = httpx.post(url + "/dump", json={"path": "live.npz"}, timeout=30).json()
    assert dumped["tokens"] == 8 and dumped["path"].endswith("live.npz")
    trace = load_trace(dumped["path"])
    assert trace.experts.shape == (8, 2, 2)  # [tokens, MoE layers, top-k]
    assert trace.num_sequences == 1 and int(trace.experts.max()) < 4
    assert list(trace.token_ids[:5]) == [3, 4, 5, 6, 7] and out["usage"]["completion_tokens"] == 4
    raw = httpx.get(url + "/dump", timeout=30)  # the same trace, downloaded
    assert raw.status_code == 200
    assert np.load(io.BytesIO(raw.content))["experts"].shape == (8, 2, 2)


def test_trace_dump_refuses_paths_outside_trace_dir(server):
    # a NUL byte or a name over the file system's 255 bytes used to reach open() and answer 500
    for bad in ("../escape.npz", "/tmp/x.npz", "trace.txt", ".hidden.npz", "a\x00b.npz", "x" * 300 + ".npz"):
        r = httpx.post(server.url + "/v1/traces/dump", json={"path": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", (bad, r.text)
