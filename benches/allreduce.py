"""All-reduce latency for decode-sized messages: gloo vs DeepSpeed's shared-memory all-reduce (CPU).

Two ranks on this machine (started here, LOCAL_SIZE=2, OMP_NUM_THREADS=1 each). For every message
size (1 KB .. 1 MB of float32: hidden x batch x 4 bytes of a decode step) both paths run in the same
process group, interleaved, after a warm-up; the result of the shm path is checked against gloo's.
Prints a table and writes benches/results/allreduce.json, including the size threshold up to which
`parallel.allreduce=auto` uses the shm path. The /dev/shm files DeepSpeed leaves are removed.

    python benches/allreduce.py [--iters 200] [--out benches/results/allreduce.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]


def worker(rank: int, world: int, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from moe_serve.distributed.comm import AllReduce, load_deepspeed_shm

    shm_error, level = None, 0
    t = time.perf_counter()
    try:
        level = load_deepspeed_shm(world, rank)
    except Exception as exc:  # record the exact failure, measure gloo anyway
        shm_error = f"{type(exc).__name__}: {exc}"
    build_s = time.perf_counter() - t
    dist.barrier()
    gloo = AllReduce(dist.group.WORLD, "gloo")
    shm = AllReduce(dist.group.WORLD, "deepspeed", shm_max_bytes=1 << 40, shm_level=level)
    ops = {"gloo": gloo} if shm_error else {"gloo": gloo, "deepspeed_shm": shm}
    rows = []
    for size in SIZES:
        n = size // 4
        x = torch.full((n,), float(rank + 1))
        want = float(sum(range(1, world + 1)))
        correct = {name: bool(torch.all(op(x.clone()) == want)) for name, op in ops.items()}
        for _ in range(20):
            for op in ops.values():
                op(x.clone())
        dist.barrier()
        lat = {name: [] for name in ops}
        for _ in range(iters):  # interleaved: both paths see the same background load
            for name, op in ops.items():
                buf = x.clone()
                t0 = time.perf_counter()
                op(buf)
                lat[name].append(time.perf_counter() - t0)
        res = {}
        for name, v in lat.items():
            v = torch.tensor(v, dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)  # an all-reduce is as slow as its slowest rank
            q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)) * 1e6
            res[name] = dict(p10_us=round(float(q[0]), 1), median_us=round(float(q[1]), 1),
                             p90_us=round(float(q[2]), 1), mean_us=round(float(v.mean() * 1e6), 1),
                             correct=correct[name])
        rows.append(dict(bytes=size, **res))
    if rank == 0:
        doc = dict(world_size=world, iters=iters, load_average_1min=os.getloadavg()[0], build_or_load_s=round(build_s, 2), shm_error=shm_error,
                   shm_kernel_level=level, machine=f"{platform.machine()} {os.cpu_count()} cores "
                   f"({platform.processor() or 'cpu'}), 2 ranks x 1 thread, shared with other jobs",
                   torch=torch.__version__, rows=rows)
        faster = [r["bytes"] for r in rows if "deepspeed_shm" in r and r["deepspeed_shm"]["correct"]
                  and r["deepspeed_shm"]["median_us"] < r["gloo"]["median_us"]]
        doc["shm_faster_up_to_bytes"] = max(faster) if faster else 0
        doc["auto_choice"] = ("deepspeed up to %d bytes, gloo above" % doc["shm_faster_up_to_bytes"]
                              if faster else "gloo")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "allreduce.json"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, int(os.environ["WORLD_SIZE"]), args.iters, args.out)
        return 0
    from moe_serve.distributed.comm import shm_files
    from moe_serve.distributed.endpoints import free_tcp_port

    world, port = 2, str(free_tcp_port())
    env = dict(os.environ, WORLD_SIZE=str(world), LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), "--iters", str(args.iters),
                               "--out", args.out], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(world)]
    rc = 0
    try:
        for p in procs:
            rc |= p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"allreduce bench: ranks did not finish within --timeout={args.timeout} s", file=sys.stderr)
        rc = 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in shm_files("127.0.0.1", port):
            os.remove(f)
    if rc:
        print(f"allreduce bench: a rank failed (exit codes {[p.returncode for p in procs]})", file=sys.stderr)
        return 1
    doc = json.loads(Path(args.out).read_text())
    print(f"median (p10 / p90) latency in us, 2 ranks, load average {doc['load_average_1min']:.1f}")
    print(f"{'bytes':>9} {'gloo':>24} {'deepspeed shm':>24} {'speedup':>8}")
    for r in doc["rows"]:
        g, s = r["gloo"], r.get("deepspeed_shm")
        cell = lambda x: f"{x['median_us']:.1f} ({x['p10_us']:.0f}/{x['p90_us']:.0f})"
        speedup = f"{g['median_us'] / s['median_us']:.2f}x" if s else ""
        print(f"{r['bytes']:>9} {cell(g):>24} {cell(s) if s else '-':>24} {speedup:>8}")
    print("shm error:", doc["shm_error"]) if doc["shm_error"] else None
    print("auto:", doc["auto_choice"], "| written to", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
