"""Load generator for the OpenAI-compatible server: `vllm bench serve`'s modes and result keys.

Streaming clients (httpx, asyncio) send /v1/completions (or /v1/chat/completions) requests, either
with at most `--max-concurrency` in flight or arriving as a Poisson process of `--request-rate`
req/s (or both), for `--num-prompts` requests or for `--duration` seconds. Prompts are random
token ids (`--dataset random`, exact input lengths) or slices of the text corpus (`--dataset
corpus`). Per request: TTFT (first content chunk), ITL (between chunks), TPOT ((E2E - TTFT) /
(output tokens - 1)) and E2E latency; output token counts come from the server's `usage`.

`--sweep 1,8,64` runs one pass per concurrency in the same process (the first is the baseline the
table compares against). `--launch` starts `python -m moe_serve.server` itself, so the server's
resident memory can be sampled from /proc (`--server-pid` does the same for a running server);
`rss_growth_pct` compares the last sample with the first one after `--warmup-s`.

    python benches/serve_bench.py --launch --serve-args "--max-num-seqs 16" --sweep 1,8,64 \
        --num-prompts 64 --input-len 64 --output-len 64 --result-file benches/results/serve_sweep.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from serve_stats import RequestResult, RssSampler, machine, moe_metrics, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / ".." / "shared" / "corpus"


# ---- prompts ---------------------------------------------------------------------------------

def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def lengths(mean: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompts(n: int, input_len: int, ratio: float, vocab: int, rng: random.Random) -> list[list[int]]:
    """Token-id prompts of exact lengths (ids >= 256 avoid the byte-level tokens of a BPE vocab)."""
    lo = 256 if vocab > 512 else 0
    return [[rng.randrange(lo, vocab) for _ in range(k)] for k in lengths(input_len, ratio, n, rng)]


def corpus_prompts(n: int, input_len: int, ratio: float, tokenizer, rng: random.Random) -> list[str]:
    """Text slices of the corpus, each about `input_len` tokens, from random offsets."""
    files = sorted(CORPUS.glob("*.txt"))
    if not files:
        raise SystemExit(f"--dataset corpus: no *.txt under {CORPUS}")
    texts = [f.read_text(errors="ignore") for f in files]
    out = []
    for k in lengths(input_len, ratio, n, rng):
        text = rng.choice(texts)
        start = rng.randrange(0, max(1, len(text) - 8 * k))
        ids = tokenizer.encode(text[start:start + 8 * k + 64]).ids[1:k + 1]  # skip a partial first token
        out.append(tokenizer.decode(ids))
    return out


# ---- one request -----------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                    return res
                if chunk.get("usage"):
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                    res.output_len = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                text = (choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")) if choices else None
                if text:
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2el = time.perf_counter() - t0
        res.success = res.output_len > 0
        if not res.success:
            res.error = "no usage in the stream"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
    return res


# ---- a pass ----------------------------------------------------------------------------------

async def run_pass(args, prompts: list, concurrency: int | None, chat: bool, model: str) -> tuple[list, float]:
    url = args.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    limits = httpx.Limits(max_connections=(concurrency or 1024) + 4, max_keepalive_connections=(concurrency or 64) + 4)
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    rng = np.random.default_rng(args.seed)
    results: list[RequestResult] = []
    deadline = time.perf_counter() + args.duration if args.duration else None

    def body(prompt) -> dict:
        b = {"model": model, "max_tokens": args.output_len, "stream": True, "temperature": args.temperature,
             "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        if chat:
            b["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else args.decode(prompt)}]
        else:
            b["prompt"] = prompt
        return b

    def more(i: int) -> bool:
        return (time.perf_counter() < deadline) if deadline is not None else i < len(prompts)

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        start = time.perf_counter()
        if args.request_rate == float("inf") and concurrency:
            counter = iter(range(1 << 62))

            async def closed_loop():  # each client sends its next request as soon as one returns
                while more(i := next(counter)):
                    results.append(await one_request(client, url, body(prompts[i % len(prompts)]), chat))

            await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
        else:  # open loop: Poisson arrivals (or all at once), optionally capped at `concurrency` in flight
            async def send(prompt):
                if sem is None:
                    results.append(await one_request(client, url, body(prompt), chat))
                    return
                async with sem:
                    results.append(await one_request(client, url, body(prompt), chat))

            tasks, i = [], 0
            while more(i):
                tasks.append(asyncio.create_task(send(prompts[i % len(prompts)])))
                i += 1
                if args.request_rate != float("inf"):
                    await asyncio.sleep(float(rng.exponential(1.0 / args.request_rate)))
            await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


# ---- server ----------------------------------------------------------------------------------

def launch_server(args) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moe_serve.server", "--port", str(port), *shlex.split(args.serve_args)]
    if args.model_dir:
        cmd += ["--model", str(args.model_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))
    args.base_url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {args.server_log}")
        try:
            if httpx.get(args.base_url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 300 s")


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to load (ignored with --launch)")
    p.add_argument("--launch", action="store_true", help="start `python -m moe_serve.server` on a free port")
    p.add_argument("--serve-args", default="", help="extra server flags with --launch")
    p.add_argument("--server-log", default="/tmp/moe_serve_bench_server.log", help="the --launch server's output")
    p.add_argument("--server-pid", type=int, default=None, help="sample this process's RSS")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="checkpoint served (its tokenizer builds the prompts; --launch serves it); default: the default model")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--dataset", choices=["random", "corpus"], default="random",
                   help="random token ids (exact input lengths) or slices of ../shared/corpus")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request (mean with --range-ratio)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request (mean with --range-ratio)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn from mean*(1 +- ratio)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per pass")
    p.add_argument("--duration", type=float, default=None, help="run each pass for this many seconds instead")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    p.add_argument("--sweep", default=None, help="comma-separated concurrencies, one pass each (first = baseline)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--warmup-requests", type=int, default=4, help="requests sent (and not counted) before the first pass")
    p.add_argument("--warmup-s", type=float, default=30.0, help="RSS growth is measured from this time on")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests end at EOS (default: ignore_eos, so each runs its --output-len)")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout per request, seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts, lengths and arrival times")
    p.add_argument("--result-file", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moe_serve.config import DEFAULT_MODEL

    args.model_dir = args.model_dir or Path(DEFAULT_MODEL)
    tok = load_tokenizer(args.model_dir)
    args.decode = tok.decode
    rng = random.Random(args.seed)
    if args.dataset == "random":
        prompts = random_prompts(args.num_prompts, args.input_len, args.range_ratio, tok.get_vocab_size(), rng)
    else:
        prompts = corpus_prompts(args.num_prompts, args.input_len, args.range_ratio, tok, rng)
    load_start = os.getloadavg()
    proc = launch_server(args) if args.launch else None
    pid = proc.pid if proc else args.server_pid
    try:
        model = httpx.get(args.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        chat = args.endpoint == "chat"
        levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.max_concurrency]
        sampler = RssSampler(pid) if pid else None
        if sampler:
            sampler.__enter__()
        warm = dict(vars(args))
        asyncio.run(run_pass(argparse.Namespace(**dict(warm, duration=None)), prompts[:args.warmup_requests],
                             min(4, args.warmup_requests), chat, model))
        passes = []
        for c in levels:
            results, duration = asyncio.run(run_pass(args, prompts, c, chat, model))
            summary = dict(summarize(results, duration), max_concurrency=c, request_rate=args.request_rate)
            passes.append(summary)
            print_row(summary, passes[0])
        if sampler:
            sampler.__exit__(None, None, None)
        moe = moe_metrics(args.base_url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    out = {"backend": "moe-serve", "model_id": model, "model_dir": str(args.model_dir), "endpoint": args.endpoint,
           "dataset": args.dataset, "input_len": args.input_len, "output_len": args.output_len,
           "num_prompts": args.num_prompts, "duration_per_pass": args.duration, "machine": machine(),
           "server_args": args.serve_args if args.launch else None, "passes": passes,
           "baseline": f"max_concurrency={levels[0]}", "moe_metrics": moe,
           "load_avg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)]}
    if sampler:
        out.update(sampler.report(args.warmup_s))
    if len(passes) == 1:
        out.update(passes[0])
    if args.result_file:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.result_file}")
    if sampler and "rss_growth_pct" in out:
        print(f"server RSS after {args.warmup_s:.0f} s warm-up: {out['rss_first_after_warmup_mb']:.1f} MB -> "
              f"{out['rss_last_mb']:.1f} MB (growth {out['rss_growth_pct']:+.2f}%, max {out['rss_max_mb']:.1f} MB)")
    return 0 if all(p["failed"] == 0 for p in passes) else 1


def print_row(s: dict, base: dict) -> None:
    if s is base:
        print(f"{'conc':>5} {'done':>6} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'x base':>7} "
              f"{'TTFT mean':>10} {'TTFT p99':>9} {'TPOT mean':>10} {'ITL mean':>9} {'E2E mean':>9}  (ms)")
    ratio = s["output_throughput"] / base["output_throughput"] if base["output_throughput"] else float("nan")
    print(f"{s['max_concurrency']!s:>5} {s['completed']:>6} {s['failed']:>5} {s['request_throughput']:>7.2f} "
          f"{s['output_throughput']:>10.1f} {ratio:>7.2f} {s['mean_ttft_ms']:>10.1f} {s['p99_ttft_ms']:>9.1f} "
          f"{s['mean_tpot_ms']:>10.1f} {s['mean_itl_ms']:>9.1f} {s['mean_e2el_ms']:>9.1f}", flush=True)
    if s["errors"]:
        print("  errors:", s["errors"])


if __name__ == "__main__":
    sys.exit(main())
