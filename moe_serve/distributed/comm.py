"""The all-reduce used by TP layers: gloo/NCCL, or DeepSpeed's shared-memory all-reduce on CPU.

Decode all-reduces a few KB per layer, where latency rules. DeepSpeed's CPU shm kernel
(`deepspeed_shm_comm`, compiled on first use) reduces through /dev/shm without the gloo TCP path;
`benches/allreduce.py` measures both. It only spans the whole world of ranks on one machine and
only float32/bf16/fp16, so `AllReduce` falls back to torch.distributed for anything else.

Its shm files are named from MASTER_ADDR/MASTER_PORT and the rank; DeepSpeed leaves them, so each rank
removes its own once every rank has mapped them, and `shm_files()` lists what a group failing at
start-up may have left, for the frontend to remove.
"""
from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist

SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_files(addr: str, port: str) -> list[str]:
    return glob.glob(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_*")


def load_deepspeed_shm(world_size: int, rank: int) -> int:
    """Build (first use: ~40 s) and start DeepSpeed's shm all-reduce; return its kernel level.

    Needs LOCAL_SIZE == world size (else DeepSpeed silently never sets up shm and crashes later),
    MASTER_ADDR and MASTER_PORT set (they only name the /dev/shm files).
    """
    if os.environ.get("LOCAL_SIZE") != str(world_size):
        raise ValueError(f"deepspeed shm all-reduce: LOCAL_SIZE must equal the world size {world_size}, "
                         f"got {os.environ.get('LOCAL_SIZE')!r}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    mod = ShareMemCommBuilder().load(verbose=False)
    mod.initialize(world_size, rank)
    # every rank has mapped every rank's buffer once all are past initialize: the names are no longer
    # needed, so remove this rank's now (nothing is left in /dev/shm however the processes end)
    dist.barrier()
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        os.remove(f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")
    except OSError:
        pass
    return int(mod.vector_kernel_level())


class AllReduce:
    """Sum a tensor over a group in place; `backend`: gloo (torch.distributed) or deepspeed (shm)."""

    def __init__(self, group, backend: str = "gloo", shm_max_bytes: int = 1 << 20, shm_level: int = 0):
        self.group, self.backend, self.shm_max_bytes, self.shm_level = group, backend, shm_max_bytes, shm_level
        self.calls = 0

    def _shm_ok(self, t: torch.Tensor) -> bool:
        if self.backend != "deepspeed" or t.device.type != "cpu":
            return False
        if self.group is not None and dist.get_world_size(self.group) != dist.get_world_size():
            return False  # the shm kernel always spans the whole world
        need = 1 if t.dtype == torch.float32 else 2 if t.dtype in (torch.bfloat16, torch.float16) else 99
        return self.shm_level >= need and t.numel() * t.element_size() <= self.shm_max_bytes and t.is_contiguous()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return t
        self.calls += 1
        if self._shm_ok(t):
            return torch.ops.deepspeed.inference_all_reduce_(t)
        dist.all_reduce(t, group=self.group)
        return t
