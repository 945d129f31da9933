"""Fiddler's question, per cold expert and step: copy it to the compute device, or compute it where
its weights lie (host memory, on the CPU)?

Measured once at start-up (`measure_costs`): host-to-device copy bandwidth into a real slot, and the
time of one expert's forward on the device and on the CPU for 1 and 8 rows (a line through the two
fits the time of any row count m). Then, for a miss with m rows:

    copy = bytes / bandwidth + t_device(m)        compute in place = t_cpu(m)

and the cheaper wins. With the compute device being the CPU itself the copy can never win (same
memory, same cores, plus a copy), so `auto` there computes cold experts in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.experts.store import expert_forward
from moe_serve.timing import best_time


@dataclass
class ExpertCosts:
    bytes_per_expert: int
    bandwidth: float  # host -> device bytes/s
    device_s: tuple[float, float]  # (fixed, per row) seconds of one expert on the compute device
    cpu_s: tuple[float, float]  # (fixed, per row) seconds of one expert on the CPU from host memory

    def copy_seconds(self, rows: int) -> float:
        return self.bytes_per_expert / self.bandwidth + self.device_s[0] + self.device_s[1] * rows

    def cpu_seconds(self, rows: int) -> float:
        return self.cpu_s[0] + self.cpu_s[1] * rows

    def compute_on_cpu(self, rows: int) -> bool:
        return self.cpu_seconds(rows) < self.copy_seconds(rows)


def _line(t1: float, t8: float) -> tuple[float, float]:
    per_row = max((t8 - t1) / 7.0, 0.0)
    return max(t1 - per_row, 0.0), per_row


def measure_costs(host_gu: torch.Tensor, host_dn: torch.Tensor, slot_gu: torch.Tensor, slot_dn: torch.Tensor,
                  repeats: int = 3) -> ExpertCosts:
    """Time real copies and forwards of one expert: host (gate_up [2I, H], down [H, I]) into the
    device slot buffers given, and the forward on either side."""
    device = slot_gu.device
    nbytes = sum(t.numel() * t.element_size() for t in (slot_gu, slot_dn))

    def copy():
        slot_gu.copy_(host_gu, non_blocking=True)
        slot_dn.copy_(host_dn, non_blocking=True)

    H = slot_gu.shape[1]
    times = {}
    with torch.no_grad():
        t_copy = best_time(copy, repeats, device)
        for where, (gu, dn) in (("device", (slot_gu, slot_dn)), ("cpu", (host_gu, host_dn))):
            for rows in (1, 8):
                x = torch.randn(rows, H, dtype=gu.dtype, device=gu.device)
                times[where, rows] = best_time(lambda: expert_forward(x, gu, dn), repeats, gu.device)
    return ExpertCosts(
        bytes_per_expert=nbytes,
        bandwidth=nbytes / max(t_copy, 1e-9),
        device_s=_line(times["device", 1], times["device", 8]),
        cpu_s=_line(times["cpu", 1], times["cpu", 8]),
    )
