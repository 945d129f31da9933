"""`moe-serve info DIR`: what a checkpoint is, read from config.json and the safetensors headers only.

No weight is loaded: parameter counts come from the tensor shapes in the headers, sizes from the
stored dtypes. "active per token" counts the non-expert parameters plus top_k of the routed experts.
A checkpoint that `load_model` would refuse (a config.json field, a quantization_config, a missing
tensor, one of the wrong shape or dtype) is refused the same way, by the loader's own header checks.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def _kind(key: str) -> str:
    k = key.lower()
    if "shared_expert" in k:
        return "shared_experts"
    if ".experts." in k or k.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return "routed_experts"
    return "dense"


def model_info(model_dir: str | Path) -> dict:
    from moe_serve.models.loader import check_tensors, read_spec

    _, family, spec = read_spec(model_dir)
    ckpt, _, _ = check_tensors(model_dir, family, spec)  # what load_model refuses, from the headers only
    params, size, dtypes = Counter(), Counter(), Counter()
    for key in ckpt.key_file:
        n = 1
        for d in ckpt.shape(key):
            n *= d
        kind, dt = _kind(key), ckpt.dtype(key)
        params[kind] += n
        size[kind] += n * _BYTES.get(dt, 0)
        dtypes[dt] += n
    total = sum(params.values())
    active = params["dense"] + params["shared_experts"] + params["routed_experts"] * spec.top_k // max(1, spec.num_experts)
    info = dict(spec.summary())
    info.update(
        path=str(model_dir), shared_experts=bool(spec.shared_expert_intermediate_size),
        params_total=total, params_routed_experts=params["routed_experts"],
        params_shared_experts=params["shared_experts"], params_dense=params["dense"],
        params_active_per_token=active, bytes_total=sum(size.values()),
        stored_dtypes=", ".join(f"{d} ({n / total:.0%})" for d, n in dtypes.most_common()) if total else "",
    )
    return info


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(round(n, 1)) < 1000 or suffix == "T":  # 999.96K prints as 1.0M, not 1000.0K
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000


def format_info(info: dict) -> str:
    rows = [(k, info[k]) for k in ("path", "family", "architecture", "layers", "moe_layers", "hidden", "vocab",
                                   "heads", "kv_heads", "attention", "experts", "top_k", "moe_intermediate",
                                   "shared_experts", "shared_expert_intermediate", "routing", "rope",
                                   "max_position_embeddings", "dtype", "stored_dtypes")]
    rows += [
        ("parameters", f"{_human(info['params_total'])} total, {_human(info['params_active_per_token'])} active per token"),
        ("  routed experts", _human(info["params_routed_experts"])),
        ("  shared experts", _human(info["params_shared_experts"])),
        ("  dense (attention, embeddings, norms)", _human(info["params_dense"])),
        ("size on disk (weights)", f"{info['bytes_total'] / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
