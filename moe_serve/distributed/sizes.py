"""What a TP/EP layout needs of a checkpoint's sizes: one pure check, run by the frontend before any rank
starts (DistributedModel) and by every rank before it loads its shard (runner.ModelRunner).

Tensor parallelism (tp > 1) splits attention heads (MLA too), KV heads (or, with fewer KV heads than
ranks, each rank keeps the one its query heads read; not with OLMoE's q/k norm over the whole
projection, which then spans ranks), dense MLPs and shared experts. Ranks sharing the same experts
(moe_tp = max(tp, ep) / ep > 1) split each expert's intermediate dim. Every error names the
config.json field, the parallel option and the limit.
"""
from __future__ import annotations


def split_error(what: str, n: int, by: str) -> str:
    """The one message of every size a layout splits: '<kind>: <field>=<n> must be divisible by <by>'."""
    return f"{what}={n} must be divisible by {by}"


def tp_error(what: str, n: int, tp: int) -> str:
    return "tensor parallelism: " + split_error(what, n, f"parallel.tp={tp}")


def moe_tp_error(what: str, n: int, moe_tp: int, tp: int, ep: int) -> str:
    return "expert parallelism: " + split_error(
        what, n, f"the {moe_tp} ranks sharing each expert (parallel.tp={tp}, parallel.ep={ep})")


def kv_heads_split(num_heads: int, num_kv_heads: int, tp: int, qk_norm: str) -> bool:
    """GQA under TP: True when the KV heads are split across ranks, False when there are fewer KV heads
    than ranks and each rank keeps the one its query heads read; a ValueError when neither works."""
    if num_kv_heads % tp == 0:
        return True
    if tp % num_kv_heads == 0 and qk_norm != "full":
        return False
    if tp % num_kv_heads == 0:  # the norm spans all KV heads: a rank holding a copy would count it twice
        raise ValueError(tp_error("num_key_value_heads", num_kv_heads, tp)
                         + " (the q/k norm over the whole projection cannot use replicated KV heads)")
    raise ValueError(f"tensor parallelism: num_key_value_heads={num_kv_heads} and parallel.tp={tp} "
                     "must divide one another")


# config.json fields behind ModelSpec sizes whose name differs by family
_MOE_SIZE_FIELD = {"mixtral": "intermediate_size", "olmoe": "intermediate_size"}
_SHARED_SIZE_FIELD = {"deepseek_v2": "n_shared_experts x moe_intermediate_size",
                      "deepseek_v3": "n_shared_experts x moe_intermediate_size"}


def check_shardable(spec, layout) -> None:
    """ValueError (every problem, one line) when `layout` (a ParallelLayout) cannot split `spec`'s sizes."""
    tp, ep, moe_tp = layout.tp, layout.ep, layout.moe_tp
    problems: list[str] = []
    if tp > 1:
        if spec.num_heads % tp:  # GQA and MLA alike
            problems.append(tp_error("num_attention_heads", spec.num_heads, tp))
        if spec.attention != "mla":  # MLA: one latent KV per token, nothing to split
            try:
                kv_heads_split(spec.num_heads, spec.num_kv_heads, tp, spec.qk_norm)
            except ValueError as exc:
                problems.append(str(exc))
        if len(spec.moe_layers) < spec.num_layers and spec.intermediate_size % tp:  # dense MLP layers
            problems.append(tp_error("intermediate_size", spec.intermediate_size, tp))
        shared = spec.shared_expert_intermediate_size
        if shared and shared % tp:
            problems.append(tp_error(_SHARED_SIZE_FIELD.get(spec.family, "shared_expert_intermediate_size"),
                                     shared, tp))
    if moe_tp > 1 and spec.moe_intermediate_size % moe_tp:
        problems.append(moe_tp_error(_MOE_SIZE_FIELD.get(spec.family, "moe_intermediate_size"),
                                     spec.moe_intermediate_size, moe_tp, tp, ep))
    if problems:
        raise ValueError("; ".join(problems))


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (taskset, a container's cpuset), not the machine's count."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(tp: int, ep: int, threads: int, device: str, cores: int | None = None) -> int:
    """torch threads of each of the max(tp, ep) ranks this machine starts on `device`, or a ValueError naming the
    option and the limit when the usable cores cannot hold them: on CPU each rank computes on its own cores, and
    ranks (or threads) beyond them take turns inside every collective, each step waiting on the slowest."""
    world, cores = max(tp, ep), cores or usable_cores()
    if not device.startswith("cpu"):
        return threads or max(1, cores // world)
    if world > cores:
        raise ValueError(f"parallel.tp={tp}, parallel.ep={ep}: {world} CPU ranks need one core each at least; this "
                         f"process may use {cores} (os.sched_getaffinity)")
    if threads * world > cores:
        raise ValueError(f"parallel.threads_per_rank={threads}: {world} ranks x {threads} threads exceed the {cores} "
                         f"cores this process may use; at most {cores // world} (0 picks it)")
    return threads or cores // world


def rank_device(device: str, rank: int) -> str:
    """The device of rank `rank` when this machine starts the ranks: on CUDA one GPU each, from the given index
    on ("cuda" = "cuda:0"); all on "cuda" put every rank on GPU 0, which NCCL refuses (and two ranks would share it)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    return f"cuda:{first + rank}"


def check_rank_devices(device: str, tp: int, ep: int, gpus: int) -> None:
    """A ValueError naming the options when the max(tp, ep) ranks this machine starts on `device` need more GPUs
    than the `gpus` it has (torch.cuda.device_count())."""
    if not device.startswith("cuda"):
        return
    world = max(tp, ep)
    last = int(rank_device(device, world - 1).partition(":")[2])
    if last >= gpus:
        raise ValueError(f"model.device={device} with parallel.tp={tp}, parallel.ep={ep}: the {world} ranks take one "
                         f"GPU each, {rank_device(device, 0)} to cuda:{last}; this machine has {gpus}")
