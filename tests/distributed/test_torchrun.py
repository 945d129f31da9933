"""Ranks started by an external launcher (torchrun) attach to the engine's `parallel.worker_endpoint`,
get their spec from it (Configure), rendezvous by env:// and give the single-process tokens."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_serve.config import ModelConfig, ParallelConfig
from moe_serve.distributed.endpoints import free_tcp_port, free_tcp_port_run
from moe_serve.distributed.executor import DistributedModel
from moe_serve.models import load_model
from tests.distributed.helpers import greedy
from tests.models.tiny_checkpoints import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed")
def test_ranks_from_torchrun_attach_to_the_engine(tmp_path):
    ckpt = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    ref = load_model(ckpt)
    ref.allocate_kv_cache(4, 64)
    want, want_logits = greedy(ref, steps=4)
    port, master = free_tcp_port_run(3), free_tcp_port()  # the frontend binds port, port+1, port+2
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MOE_SERVE_FRONTEND=f"127.0.0.1:{port}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = subprocess.Popen([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                              "--master-port", str(master), "-m", "moe_serve.distributed.worker"], env=env)
    dm = DistributedModel(ModelConfig(model=str(ckpt)),
                          ParallelConfig(tp=2, ep=2, allreduce="gloo", threads_per_rank=1, startup_timeout_s=60,
                                         worker_endpoint=f"tcp://127.0.0.1:{port}"))
    try:
        dm.allocate_kv_cache(4, 64)
        got, got_logits = greedy(dm, steps=4)
    finally:
        dm.close()
        try:
            assert ranks.wait(timeout=30) == 0  # Shutdown ends the ranks, torchrun exits cleanly
        finally:
            if ranks.poll() is None:
                ranks.kill()
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
