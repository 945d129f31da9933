"""DeepSeek's Expert Parallelism Load Balancer (EPLB), written from its published description
(github.com/deepseek-ai/EPLB README; DeepSeek-V3 report), in numpy.

Hierarchical policy (used when the number of nodes divides the number of expert groups):
  1. pack the expert groups (contiguous blocks of logical ids) onto nodes, balancing node load, each
     node getting the same number of groups;
  2. inside each node, replicate experts: each spare physical slot goes to the expert with the largest
     load per copy;
  3. pack the node's physical experts onto its GPUs, balancing GPU load, each GPU getting the same
     number of physical experts.
Global policy (otherwise): the same with one node and one group - replicate over all experts, then pack
onto all GPUs.

Balanced packing is greedy: items in descending weight order, each to the lightest pack that still has
room (ties -> lowest pack index); an item's position inside its pack is the order it arrived in.
Departures from the reference: in step 3 a GPU never gets two copies of one expert when the node has a
GPU for each copy (the reference sometimes doubles one up, a wasted slot; see `balanced_packing`); and
the registry form `eplb` on one node keeps, per layer, the contiguous layout where that balances the
load better under the run-time replica rule (`no_worse_than_contiguous`). `rebalance_experts` is the
reference's entry point with the first departure only.
Descending sorts are stable (equal weights keep ascending index order).
"""
from __future__ import annotations

import time

import numpy as np

from placement.algorithms.common import check_sizes, no_worse_than_contiguous, separate_packed_copies
from placement.plan import PlacementPlan


def balanced_packing(weight: np.ndarray, num_packs: int, label: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """weight [X, n] -> (pack [X, n], position in pack [X, n]); every pack gets n / num_packs items.

    label int [X, n] (optional): the logical expert of each item. Two copies of one expert in one pack
    waste a slot (the replica rule gives a rank one share of an expert however many copies it holds),
    so an item goes to the lightest open pack *that lacks its label*, and only when none has room to the
    lightest open one; `separate_packed_copies` then swaps such leftovers apart. DeepSeek's reference
    has no such rule; with no doubled copy to avoid, the result is the reference's exactly."""
    X, n = weight.shape
    if n % num_packs:
        raise ValueError(f"eplb: {n} items do not split evenly into num_packs={num_packs}")
    per_pack = n // num_packs
    pack = np.empty((X, n), dtype=np.int64)
    pos = np.empty((X, n), dtype=np.int64)
    for x in range(X):
        pack_w = np.zeros(num_packs)
        pack_n = np.zeros(num_packs, dtype=np.int64)
        held: list[set] = [set() for _ in range(num_packs)]
        for item in np.argsort(-weight[x], kind="stable"):
            open_w = np.where(pack_n < per_pack, pack_w, np.inf)
            if label is not None:
                fresh = np.where([label[x, item] not in h for h in held], open_w, np.inf)
                open_w = fresh if np.isfinite(fresh).any() else open_w
            p = int(np.argmin(open_w))
            pack[x, item], pos[x, item] = p, pack_n[p]
            pack_w[p] += weight[x, item]
            pack_n[p] += 1
            if label is not None:
                held[p].add(label[x, item])
        if label is not None:
            separate_packed_copies(weight[x], label[x], pack[x], pos[x], num_packs)
    return pack, pos


def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [X, n] -> (phy2log [X, num_phy], replica index [X, num_phy], count [X, n]).
    The first n physical experts are the logical ones in order; spare ones are appended as chosen."""
    X, n = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (X, 1))
    rep = np.zeros((X, num_phy), dtype=np.int64)
    count = np.ones((X, n), dtype=np.int64)
    rows = np.arange(X)
    for p in range(n, num_phy):
        e = np.argmax(weight / count, axis=1)  # first maximum on ties
        phy2log[:, p], rep[:, p] = e, count[rows, e]
        count[rows, e] += 1
    return phy2log, rep, count


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """EPLB's entry point: weight [L, E] -> (phy2log [L, P], log2phy [L, E, Rmax], count [L, E])."""
    weight = np.asarray(weight, dtype=np.float64)
    L, E = weight.shape
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # global policy
    if E % num_groups or num_gpus % num_nodes or num_replicas % num_gpus:
        raise ValueError(
            f"eplb: need E={E} % num_groups={num_groups} == 0, num_gpus={num_gpus} % num_nodes={num_nodes} == 0, "
            f"num_replicas={num_replicas} % num_gpus == 0"
        )
    group_size, per_node_groups = E // num_groups, num_groups // num_nodes
    log_per_node, phy_per_node = E // num_nodes, num_replicas // num_nodes
    gpus_per_node, phy_per_gpu = num_gpus // num_nodes, num_replicas // num_gpus
    # 1. groups -> nodes; relabel logical experts node-major ("mlog")
    group_w = weight.reshape(L, num_groups, group_size).sum(-1)
    gpack, gpos = balanced_packing(group_w, num_nodes)
    log2mlog = ((gpack * per_node_groups + gpos) * group_size)[:, :, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(L, E)
    mlog2log = np.argsort(log2mlog, axis=1)
    # 2. replicate within each node: [L * nodes, E / nodes]
    mlog_w = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, log_per_node)
    phy2mlog, _, mcount = replicate(mlog_w, phy_per_node)
    # 3. physical experts -> GPUs of the node
    phy_w = np.take_along_axis(mlog_w / mcount, phy2mlog, axis=1)
    ppack, ppos = balanced_packing(phy_w, gpus_per_node, label=phy2mlog)  # copies of one expert apart
    phy2pphy = ppack * phy_per_gpu + ppos
    pphy2phy = np.argsort(phy2pphy, axis=1)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(L, num_nodes, phy_per_node)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(L, num_replicas)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    plan = PlacementPlan.from_phy2log(phy2log, E, num_gpus)
    return plan.phy2log, plan.log2phy, plan.replica_count


def hierarchy_problem(num_experts: int, num_ranks: int, num_nodes: int, num_groups: int | None = None,
                      names: dict[str, str] | None = None) -> str | None:
    """Why EPLB cannot place `num_experts` experts on `num_ranks` ranks over `num_nodes` nodes in
    `num_groups` expert groups (default: one per node), or None. The hierarchical policy (taken when the
    nodes divide the groups, else the global one, as in the reference) needs equal nodes and equal
    groups. `names` gives each value's prefix as the caller's user writes it, e.g.
    {"num_nodes": "--num-nodes "} (default "num_nodes=")."""
    prefix = lambda key: (names or {}).get(key, key + "=")
    word = lambda key, value: f"{prefix(key)}{value}"
    groups = num_groups or num_nodes
    if groups % num_nodes:
        return None  # global policy: one node, one group
    if num_ranks % num_nodes:
        return (f"{word('num_nodes', num_nodes)} must divide {word('num_ranks', num_ranks)} "
                "(eplb gives every node the same number of ranks)")
    if num_experts % groups and num_groups:
        return (f"{word('num_groups', num_groups)} must divide the {num_experts} experts per layer "
                "(eplb's expert groups are equal blocks of consecutive expert ids)")
    if num_experts % groups:
        return (f"{word('num_nodes', num_nodes)} must divide the {num_experts} experts per layer (eplb gives "
                "every node the same number of expert groups, blocks of consecutive expert ids; set their "
                f"number with {prefix('num_groups').rstrip(' =')})")
    return None


def eplb(load, num_ranks: int, slots_per_rank: int, coact=None, transitions=None,
         num_nodes: int = 1, num_groups: int | None = None, **_) -> PlacementPlan:
    """Registry form: EPLB on `num_ranks` GPUs over `num_nodes` nodes (groups default to one per node).
    On one node, each layer is then the better balanced of EPLB's and the contiguous layout under the
    run-time replica rule on `load` (`no_worse_than_contiguous`: EPLB's packing assumes even shares per
    copy, the rule does not); over several nodes EPLB's is kept, as contiguous ignores the nodes."""
    load = np.asarray(load, dtype=np.float64)
    L, E = check_sizes(load, num_ranks, slots_per_rank)
    problem = hierarchy_problem(E, num_ranks, num_nodes, num_groups)
    if problem:
        raise ValueError(f"placement algorithm eplb: {problem}")
    t0 = time.perf_counter()
    phy2log, _, _ = rebalance_experts(load, num_ranks * slots_per_rank, num_groups or num_nodes, num_nodes, num_ranks)
    if num_nodes == 1:
        phy2log = np.stack([no_worse_than_contiguous(phy2log[l], load[l], num_ranks, slots_per_rank) for l in range(L)])
    return PlacementPlan.from_phy2log(phy2log, E, num_ranks,
                                      dict(algorithm="eplb", solver_seconds=time.perf_counter() - t0))
