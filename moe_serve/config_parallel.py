"""The `parallel` section of the config tree: TP+EP worker ranks, dispatch, placement, rebalancing and
the control plane's timeouts (`moe_serve/distributed/`, docs/distributed.md)."""
from __future__ import annotations

from dataclasses import dataclass

from moe_serve.config_fields import doc, require


@dataclass
class ParallelConfig:
    tp: int = doc("tensor-parallel ranks: attention heads, dense MLPs and shared experts are split over them", default=1)
    ep: int = doc("expert-parallel ranks: experts are spread over them per the placement plan "
                  "(world size = max(tp, ep); tp=1 with ep>1 runs attention data-parallel)", default=1)
    dispatch: str = doc("EP token dispatch: auto (alltoall when attention is data-parallel, else allgather), "
                        "allgather (all-gather / reduce-scatter) or alltoall", default="auto")
    preplan: bool = doc("pre-planned all-to-all dispatch: size each layer's buffers from the previous step's "
                        "counts and skip the count exchange (mispredictions are corrected)", default=False)
    preplan_predictor: str | None = doc("fitted predictor file (predictors' safetensors, lookahead >= 1): the "
                                        "pre-planned dispatch forecasts layer l+1's counts with it after layer l's "
                                        "router instead of using the previous step's counts", default=None)
    placement: str | None = doc("placement plan file (JSON or safetensors from `placement`); default: contiguous",
                                default=None)
    rebalance_every: int = doc("compute a new placement from live expert loads every N steps (0: never)", default=0)
    rebalance_window: int = doc("steps of expert-load history the rebalancer plans from", default=64)
    redundant_experts: int = doc("extra physical expert slots in all (replicas of hot experts); must make "
                                 "experts + redundant_experts divisible by ep", default=0)
    allreduce: str = doc("TP all-reduce: auto (DeepSpeed shm for small CPU messages when available, else "
                         "gloo/nccl), gloo or deepspeed", default="auto")
    startup_timeout_s: float = doc("seconds to wait for every rank to load and report ready", default=180.0)
    heartbeat_interval_s: float = doc("seconds between heartbeats of each rank", default=0.5)
    heartbeat_timeout_s: float = doc("a rank silent this long is declared dead", default=30.0)
    step_timeout_s: float = doc("longest a forward step may take on the ranks before it is failed", default=600.0)
    shutdown_grace_s: float = doc("seconds a shutdown waits for the step in flight, and the ranks for their Shutdown, "
                                  "before the ranks are stopped (SIGTERM, 2 s later SIGKILL): a hung rank cannot hold "
                                  "it for heartbeat_timeout_s or step_timeout_s", default=5.0)
    control_transport: str = doc("ZeroMQ control sockets: ipc (a temp dir only this user can open) or tcp "
                                 "(loopback, free ports; every frame signed and encrypted under a key drawn per "
                                 "engine)", default="ipc")
    threads_per_rank: int = doc("torch threads of each rank on CPU (0: cores / ranks)", default=0)
    worker_endpoint: str | None = doc("tcp://host:port to bind for ranks started by torchrun (each rank gets "
                                      "MOE_SERVE_FRONTEND=host:port; it and the frontend the same hex "
                                      "MOE_SERVE_CONTROL_KEY); default: the engine starts its ranks",
                                      default=None)

    def __post_init__(self):
        require(self.tp >= 1, "parallel", "tp", ">= 1", self.tp)
        require(self.ep >= 1, "parallel", "ep", ">= 1", self.ep)
        w = max(self.tp, self.ep)
        require(w % self.tp == 0 and w % self.ep == 0, "parallel", "ep",
                f"a divisor or a multiple of tp={self.tp}", self.ep)
        require(self.tp in (1, w), "parallel", "tp", f"1 or max(tp, ep)={w} (mixed TP and DP attention "
                "is not supported)", self.tp)
        require(self.dispatch in ("auto", "allgather", "alltoall"), "parallel", "dispatch",
                "one of auto, allgather, alltoall", self.dispatch)
        require(not (self.dispatch == "alltoall" and self.tp > 1 and self.ep > 1), "parallel", "dispatch",
                "allgather or auto when tp > 1 (alltoall needs data-parallel attention, tp=1)", self.dispatch)
        require(not self.preplan or (self.tp == 1 and self.ep > 1 and self.dispatch != "allgather"), "parallel",
                "preplan", "False unless the dispatch is alltoall (tp=1, ep>1, dispatch auto or alltoall)", self.preplan)
        require(self.preplan_predictor is None or self.preplan, "parallel", "preplan_predictor",
                "unset unless preplan is on", self.preplan_predictor)
        require(self.rebalance_every >= 0, "parallel", "rebalance_every", ">= 0", self.rebalance_every)
        require(self.rebalance_window >= 1, "parallel", "rebalance_window", ">= 1", self.rebalance_window)
        require(self.redundant_experts >= 0, "parallel", "redundant_experts", ">= 0", self.redundant_experts)
        # with ep=1 nothing reads them (one process, or TP ranks that each hold every expert): they were ignored
        why = "unless ep > 1 (experts are placed over EP ranks; with ep=1 every rank holds every expert)"
        require(self.ep > 1 or self.placement is None, "parallel", "placement", f"unset {why}", self.placement)
        require(self.ep > 1 or self.rebalance_every == 0, "parallel", "rebalance_every", f"0 {why}",
                self.rebalance_every)
        require(self.ep > 1 or self.redundant_experts == 0, "parallel", "redundant_experts", f"0 {why}",
                self.redundant_experts)
        require(self.allreduce in ("auto", "gloo", "deepspeed"), "parallel", "allreduce",
                "one of auto, gloo, deepspeed", self.allreduce)
        for name in ("startup_timeout_s", "heartbeat_interval_s", "heartbeat_timeout_s", "step_timeout_s",
                     "shutdown_grace_s"):
            require(getattr(self, name) > 0, "parallel", name, "> 0", getattr(self, name))
        require(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s, "parallel", "heartbeat_timeout_s",
                f"> 2 x heartbeat_interval_s ({2 * self.heartbeat_interval_s:g})", self.heartbeat_timeout_s)
        require(self.control_transport in ("ipc", "tcp"), "parallel", "control_transport", "ipc or tcp",
                self.control_transport)
        require(self.threads_per_rank >= 0, "parallel", "threads_per_rank", ">= 0", self.threads_per_rank)
        require(self.worker_endpoint is None or (self.worker_endpoint.startswith("tcp://")
                                                 and self.worker_endpoint.rsplit(":", 1)[-1].isdigit()),
                "parallel", "worker_endpoint", "tcp://host:port", self.worker_endpoint)
        if self.worker_endpoint is not None:  # it binds port and port + 1 + r for every rank r; ZeroMQ took port 0 as
            # "any" (the ranks, told port + 1 + r, found nothing) and a port past 65535 modulo 65536, silently
            port, top = int(self.worker_endpoint.rsplit(":", 1)[-1]), 65535 - w
            require(1 <= port <= top, "parallel", "worker_endpoint", f"tcp://host:port with 1 <= port <= {top} (it "
                    f"binds port and port+1+r for each of the max(tp, ep)={w} ranks, up to 65535)", self.worker_endpoint)

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)
