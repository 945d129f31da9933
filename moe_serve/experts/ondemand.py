"""The no-cache baseline: every step copies each expert it needs from the host into a device buffer.

This is what offloading without a cache does: Hugging Face accelerate's `cpu_offload` hooks move a
module's weights to the device in its pre-forward, vLLM's `cpu_offload_gb` streams the offloaded
parameters in every forward. Both move whole modules (with fused expert tensors: every expert of the
layer); this store copies only the experts the step routes to, so it is the *generous* version of
that baseline (fewer bytes than either moves), and the one the expert cache is measured against.

Each needed expert is copied synchronously (`dst.copy_(src)`, the compute waits for it, as in
accelerate's hook) into one preallocated device buffer pair, then computed; nothing is kept for the
next step. On CUDA the copy is a real host-to-device transfer from pinned memory; on a CPU-only
machine it is a real buffer-to-buffer copy of the same bytes.
"""
from __future__ import annotations

import time

import torch

from moe_serve.experts.store import ExpertStore, expert_forward, stack_experts


class OnDemandExpertStore(ExpertStore):
    """`host_gu[l]` [E, 2I, H] and `host_dn[l]` [E, H, I]: every expert on the host (pinned when the
    device is CUDA); `device`: where the buffer lives and the experts run."""

    def __init__(self, host_gu: list[torch.Tensor], host_dn: list[torch.Tensor], device):
        if len(host_gu) != len(host_dn) or not host_gu:
            raise ValueError("OnDemandExpertStore needs one gate_up and one down tensor per MoE layer")
        self.host_gu, self.host_dn, self.device = host_gu, host_dn, torch.device(device)
        self.num_moe_layers, self.num_experts = len(host_gu), host_gu[0].shape[0]
        self.buf_gu = torch.empty(host_gu[0].shape[1:], dtype=host_gu[0].dtype, device=self.device)  # [2I, H]
        self.buf_dn = torch.empty(host_dn[0].shape[1:], dtype=host_dn[0].dtype, device=self.device)  # [H, I]
        self.expert_bytes = (self.buf_gu.numel() + self.buf_dn.numel()) * self.buf_gu.element_size()
        self.reset_metrics()

    @classmethod
    def from_source(cls, source, dtype: torch.dtype, device) -> "OnDemandExpertStore":
        return cls(*stack_experts(source, dtype, pin_memory=torch.device(device).type == "cuda"), device)

    def reset_metrics(self) -> None:
        self.stats = dict(copies=0, bytes_moved=0, copy_s=0.0)

    def metrics(self) -> dict:
        return dict(self.stats, hits=0, misses=self.stats["copies"], hit_rate=0.0, stall_s=self.stats["copy_s"],
                    cpu_computed=0, cpu_overflow=0, capacity=1)

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        self.buf_gu.copy_(self.host_gu[moe_layer][e])
        self.buf_dn.copy_(self.host_dn[moe_layer][e])  # blocking: the compute waits for its weights
        self.stats["copy_s"] += time.perf_counter() - t0
        self.stats["copies"] += 1
        self.stats["bytes_moved"] += self.expert_bytes
        return self.buf_gu, self.buf_dn

    def compute_expert(self, moe_layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        gu, dn = self.get(moe_layer, e)
        return expert_forward(x, gu, dn)

    def nbytes(self) -> int:
        return self.expert_bytes
