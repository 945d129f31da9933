"""The expert store: the only way the model reaches expert weights.

Contract (what the MoE block's experts stage calls, per MoE layer and step):

    store.run(moe_layer, x_sorted, counts) -> y_sorted
        x_sorted [M, H]: the step's token copies sorted by logical expert id (dispatch's output);
        counts: long tensor [E], rows of x_sorted per expert (sum = M); or a list of ints when the
                dispatcher counted on the host (its one-token path on CPU);
        y_sorted [M, H]: each row's expert output (unweighted: combine applies the gate weights).

`ExpertStore.run` is written once in terms of overridable methods, so another store changes
where weights live without touching model code:

    begin_layer(moe_layer, ids, rows)    the experts this step needs; an offloading store pins the
                                         resident ones and starts fetching the missing ones
    get(moe_layer, e) -> (gate_up, down) weights on the compute device, gate_up [2I, H] (gate rows
                                         first), down [H, I]; may block until a fetch lands
    compute_order(moe_layer, active)     the order `run` computes the step's experts in (expert
                                         order here; outputs stay in expert order)
    end_layer(moe_layer)                 unpin
    abort_layer(moe_layer)               the layer failed (before end_layer): undo what begin_layer counted
    prefetch(moe_layer, expert_ids)      a hint from the predictor for a later layer (no-op here)

A store that wants to compute a cold expert where its weights lie (on the CPU) overrides `run` or
`compute_expert` for that expert; the stage only sees y_sorted. Weights come from an
`ExpertSource` (the loader's memory-mapped checkpoint view), so a store may keep a host copy
instead of stacking everything on the device.

`ResidentExpertStore`: every expert on the compute device, stacked per layer as gate_up [E, 2I, H]
and down [E, H, I]; `get` returns views (no copies); on GPU `run` is two `F.grouped_mm` calls over
the stacked weights (no host sync), on CPU a loop over the active experts (same bits).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class ExpertSource(Protocol):
    """Where a store gets weights from (the loader provides one backed by the safetensors files)."""

    num_moe_layers: int
    num_experts: int

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) on the host, in the checkpoint's dtype, shapes checked."""
        ...


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x [M, H] -> [M, H] (fused gate_up as transformers computes it)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [M, I] each
    return F.linear(F.silu(gate) * up, down)


class StackedExperts:
    """ExpertSource over experts already stacked per MoE layer: gate_up[l] [E, 2I, H], down[l] [E, H, I].

    For weights made or kept in memory rather than read from a checkpoint (a benchmark's random
    experts, larger than the disk). `stack_experts` hands a store these very tensors when they are
    already what it asks for (dtype, device, pinning): no second copy of the host tier."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor]):
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError("StackedExperts needs one gate_up and one down tensor per MoE layer")
        E, I2, H = gate_up[0].shape
        for l, (gu, dn) in enumerate(zip(gate_up, down)):
            if tuple(gu.shape) != (E, I2, H) or tuple(dn.shape) != (E, H, I2 // 2):
                raise ValueError(f"StackedExperts: layer {l} has gate_up {tuple(gu.shape)} and down "
                                 f"{tuple(dn.shape)}, expected {(E, I2, H)} and {(E, H, I2 // 2)}")
        self.gate_up, self.down = list(gate_up), list(down)
        self.num_moe_layers, self.num_experts = len(gate_up), E

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[moe_layer][e], self.down[moe_layer][e]

    def stacked_as(self, dtype: torch.dtype, device: torch.device | str, pin_memory: bool) -> bool:
        device = torch.device(device)
        return all(t.dtype == dtype and t.device == device and (not pin_memory or t.is_pinned())
                   for t in (*self.gate_up, *self.down))


def stack_experts(source: ExpertSource, dtype: torch.dtype, device: torch.device | str = "cpu",
                  pin_memory: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every expert of `source` stacked per MoE layer: gate_up [E, 2I, H] and down [E, H, I] per layer
    (the resident store's weights, or a host copy that an offloading store copies from). A
    `StackedExperts` source already stacked that way is returned as it is, not copied."""
    if isinstance(source, StackedExperts) and source.stacked_as(dtype, device, pin_memory):
        return list(source.gate_up), list(source.down)
    gate_up, down = [], []
    for l in range(source.num_moe_layers):
        gu0, d0 = source.get(l, 0)
        gu = torch.empty((source.num_experts, *gu0.shape), dtype=dtype, device=device, pin_memory=pin_memory)
        dn = torch.empty((source.num_experts, *d0.shape), dtype=dtype, device=device, pin_memory=pin_memory)
        for e in range(source.num_experts):
            g, d = (gu0, d0) if e == 0 else source.get(l, e)
            gu[e].copy_(g)
            dn[e].copy_(d)
        gate_up.append(gu)
        down.append(dn)
    return gate_up, down


class ExpertStore(ABC):
    num_moe_layers: int
    num_experts: int
    device: torch.device
    counts_on_host = True  # `run` reads the per-expert counts on the host (the dispatcher may order there)

    @abstractmethod
    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, on the compute device."""

    def begin_layer(self, moe_layer: int, expert_ids: list[int], rows: list[int] | None = None) -> None:
        """This step needs `expert_ids` of `moe_layer` (ascending), for `rows[i]` tokens each."""

    def abort_layer(self, moe_layer: int) -> None:
        """The layer failed after `begin_layer` (`end_layer` still follows): undo what it counted."""

    def end_layer(self, moe_layer: int) -> None:
        """The layer's experts are done with for this step."""

    def prefetch(self, moe_layer: int, expert_ids: torch.Tensor) -> None:
        """Hint: these experts of `moe_layer` will likely be needed soon."""

    def compute_expert(self, moe_layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.get(moe_layer, e)
        return expert_forward(x, gate_up, down)

    def compute_order(self, moe_layer: int, active: list[int]):
        """Positions in `active` in the order `run` computes them (after `begin_layer`): expert order
        here; a store whose weights land at different times may compute the ready ones first. The
        outputs stay in expert order whatever this is (each expert's rows are computed alone)."""
        return range(len(active))

    def run(self, moe_layer: int, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Experts stage: y_sorted [M, H] for x_sorted [M, H] grouped by expert per `counts` [E]."""
        # one host read per layer (a store may avoid it, as the resident one does)
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        active = [e for e, c in enumerate(counts) if c]
        xs, start = [], 0
        for e in active:
            xs.append(x_sorted[start:start + counts[e]])
            start += counts[e]
        outs: list[torch.Tensor | None] = [None] * len(active)
        # end_layer even when the layer fails (a copy error, a failed host read, Ctrl-C): else the
        # failed layer's experts stay pinned, the slots its compute read are never released to the
        # copier (on CUDA a later copy into one would not wait for that compute) and the clock stops
        try:
            self.begin_layer(moe_layer, active, [counts[e] for e in active])
            for i in self.compute_order(moe_layer, active):
                outs[i] = self.compute_expert(moe_layer, active[i], xs[i])
        except BaseException:
            self.abort_layer(moe_layer)  # the engine retries: what begin_layer counted must not count twice
            raise
        finally:
            self.end_layer(moe_layer)
        if not outs:
            return x_sorted.new_empty(x_sorted.shape)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def nbytes(self) -> int:
        """Bytes of expert weights this store holds on the compute device."""
        return 0


class ResidentExpertStore(ExpertStore):
    """All experts on the compute device, stacked per MoE layer."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor]):
        # gate_up[l]: [E, 2I, H]; down[l]: [E, H, I]
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError("ResidentExpertStore needs one gate_up and one down tensor per MoE layer")
        self.gate_up, self.down = gate_up, down
        self.num_moe_layers, self.num_experts = len(gate_up), gate_up[0].shape[0]
        self.device = gate_up[0].device
        # per-expert views made once: `get` runs per expert and step, and indexing costs an op each time
        self._views = [list(zip(gu.unbind(0), dn.unbind(0))) for gu, dn in zip(gate_up, down)]

    @classmethod
    def from_source(cls, source: ExpertSource, dtype: torch.dtype, device: torch.device | str) -> "ResidentExpertStore":
        return cls(*stack_experts(source, dtype, device))

    def get(self, moe_layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._views[moe_layer][e]

    @property
    def counts_on_host(self) -> bool:  # the grouped GPU path below takes them as a device tensor
        return not (HAS_GROUPED_MM and self.device.type != "cpu" and self.gate_up[0].dtype == torch.bfloat16)

    def run(self, moe_layer: int, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """On GPU in bf16: all experts of the layer in two grouped matmuls, no host sync. Otherwise a
        loop over the active experts (torch's CPU grouped_mm visits every expert, ~10x slower for
        decode; the GPU kernel wants bf16); on CPU both give the same bits as transformers."""
        if not HAS_GROUPED_MM or x_sorted.device.type == "cpu" or x_sorted.dtype != torch.bfloat16:
            return super().run(moe_layer, x_sorted, counts)
        counts = torch.as_tensor(counts, device=x_sorted.device)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each expert's group
        gate_up = F.grouped_mm(x_sorted, self.gate_up[moe_layer].transpose(-2, -1), offs=offs)  # [M, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down[moe_layer].transpose(-2, -1), offs=offs)  # [M, H]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down))


def resident_store_factory(spec, source: ExpertSource, dtype: torch.dtype, device) -> ExpertStore:
    """The default `expert_store_factory` of `load_model`: (spec, source, dtype, device) -> store."""
    return ResidentExpertStore.from_source(source, dtype, device)
