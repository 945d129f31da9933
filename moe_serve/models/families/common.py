"""What every family shares: reading config fields with clear errors, rope parameters, key mapping."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from moe_serve.models.families.fields import flag, number, token_id, token_ids
from moe_serve.models.spec import ModelSpec, RopeSpec, UnsupportedModelError

SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")


def need(cfg: dict, name: str, where: str):
    """A required config.json field, or an error naming it."""
    if cfg.get(name) is None:
        raise ValueError(f"config.json of a {where} checkpoint lacks the required field '{name}'")
    return cfg[name]


def need_any(cfg: dict, names: tuple[str, ...], where: str):
    """The first present of several names for one field (transformers renames some across versions)."""
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise ValueError(f"config.json of a {where} checkpoint lacks the required field '{names[0]}' "
                     f"(also accepted: {', '.join(names[1:])})")


def positive(value: int, name: str) -> int:
    # bool is an int to Python, but `true` is no size
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json field '{name}' must be a positive integer, got {value!r}")
    return value


def norm_eps(cfg: dict, default: float) -> float:
    """rms_norm_eps: absent/null means the family's default; else a positive number (not a bool)."""
    eps = cfg.get("rms_norm_eps")
    if eps is None:
        return default
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"config.json field 'rms_norm_eps' must be a positive number, got {eps!r}")
    return float(eps)


def need_size(cfg: dict, name: str, where: str) -> int:
    """A required size field: a positive integer (a string, a float or -64 would only fail later, deep in torch)."""
    return positive(need(cfg, name, where), name)


def optional_size(cfg: dict, name: str) -> int | None:
    """An optional size field: absent/null, or a positive integer."""
    return None if cfg.get(name) is None else positive(cfg[name], name)


def experts_and_top_k(cfg: dict, names: tuple[str, ...], where: str) -> tuple[int, int]:
    """(experts per layer, num_experts_per_tok); `names`: the family's names for the expert count.
    A token cannot pick more experts than a layer has (torch.topk would only fail at the first forward)."""
    num_experts = positive(need_any(cfg, names, where), names[0])
    top_k = positive(need(cfg, "num_experts_per_tok", where), "num_experts_per_tok")
    if top_k > num_experts:
        raise ValueError(f"config.json field 'num_experts_per_tok' ({top_k}) must be <= '{names[0]}' ({num_experts})")
    return num_experts, top_k


def eos_ids(cfg: dict) -> tuple[int, ...]:
    return token_ids(cfg, "eos_token_id")


def max_positions(cfg: dict, default: int | None = None) -> int | None:
    """max_position_embeddings: a positive integer; absent/null means the family's `default`."""
    return optional_size(cfg, "max_position_embeddings") or default


SERVABLE_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(cfg: dict) -> str:
    """config.json's `dtype` (transformers 5) or `torch_dtype` (older); absent/null: float32.

    One the runtime cannot serve (float64, int8, a typo) is refused here with the other fields, not when
    dtype=auto resolves it: the refusal must not depend on the dtype a caller asks for, and `moe-serve
    info`, which asks for none, reads this same spec."""
    name = next((n for n in ("dtype", "torch_dtype") if cfg.get(n) is not None), None)
    if name is None:
        return "float32"
    value = str(cfg[name]).replace("torch.", "")
    if value not in SERVABLE_DTYPES:
        raise UnsupportedModelError(f"config.json field '{name}' must be one of {', '.join(SERVABLE_DTYPES)}, "
                                    f"got {cfg[name]!r}")
    return value


def rope_spec(cfg: dict, dim: int, default_theta: float, interleaved: bool = False,
              complex_fp32: bool = False) -> RopeSpec:
    """Read `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older configs). Every value
    is checked and named in errors as `rope_parameters.<key>`: a bad one failed at the first forward, or
    not at all (a negative factor computed a model that loaded fine).
    With both, a non-empty `rope_scaling` wins and `rope_parameters` is not read (its theta neither), as
    transformers 5 reads them: model cards say to add rope_scaling to enable YaRN, whatever else is there."""
    where = next((n for n in ("rope_scaling", "rope_parameters") if cfg.get(n)), "rope_parameters")
    params = cfg.get(where) or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json field '{where}' must be an object, got {params!r}")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in SUPPORTED_ROPE:
        key = "rope_type" if params.get("rope_type") else "type"
        raise UnsupportedModelError(f"rope type {kind!r} is not supported (config.json field '{where}.{key}'; "
                                    f"supported: {', '.join(SUPPORTED_ROPE)})")

    def value(key: str, default=None, above: float | None = 0.0):
        return number(params.get(key), f"{where}.{key}", default, above)

    # a base <= 1 has no decreasing frequencies, and YaRN divides by log(base)
    if params.get("rope_theta") is not None:
        theta = value("rope_theta", above=1.0)
    else:
        theta = number(cfg.get("rope_theta"), "rope_theta", default_theta, above=1.0)
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) not in (None, 1.0):
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if params.get("original_max_position_embeddings") is not None:
        omax = positive(params["original_max_position_embeddings"], f"{where}.original_max_position_embeddings")
    else:
        omax = optional_size(cfg, "original_max_position_embeddings")
    max_pos = max_positions(cfg)
    if kind in ("yarn", "llama3") and omax is None:
        omax = max_pos
        if omax is None:
            raise ValueError(f"rope type '{kind}' needs {where}.original_max_position_embeddings "
                             "(or max_position_embeddings)")
    factor = value("factor")
    if kind in ("linear", "yarn", "llama3") and factor is None:
        if kind == "yarn" and max_pos:
            factor = max_pos / omax
        else:
            raise ValueError(f"rope type '{kind}' needs {where}.factor")
    low, high = value("low_freq_factor", 1.0), value("high_freq_factor", 4.0)
    if kind == "llama3" and not high > low:  # llama3 interpolates between the two: divides by high - low
        raise ValueError(f"config.json field '{where}.high_freq_factor' ({high}) must be > "
                         f"'{where}.low_freq_factor' ({low})")
    return RopeSpec(
        kind=kind, theta=theta, dim=dim, interleaved=interleaved, complex_fp32=complex_fp32,
        factor=factor or 1.0, original_max_position_embeddings=omax, attention_factor=value("attention_factor"),
        beta_fast=value("beta_fast", 32.0), beta_slow=value("beta_slow", 1.0),
        mscale=value("mscale", above=None), mscale_all_dim=value("mscale_all_dim", above=None),
        truncate=flag(params, "truncate", True, f"{where}.truncate"), low_freq_factor=low, high_freq_factor=high,
    )


def check_act(cfg: dict) -> str:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act '{act}' is not supported (supported: silu)")
    return "silu"


@dataclass(frozen=True)
class Family:
    """How one family's config.json and checkpoint keys map onto the runtime.

    Runtime parameter names follow transformers' in-memory names without the `model.` prefix
    (`layers.3.self_attn.q_proj.weight`, `layers.3.mlp.gate.weight`, `layers.3.mlp.shared_expert.up_proj.weight`);
    `renames` turns runtime substrings into the checkpoint's where they differ (Mixtral's
    `block_sparse_moe`, DeepSeek's `shared_experts`).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    parse: Callable[[dict], ModelSpec]
    moe_module: str = "mlp"  # checkpoint name of the MoE block
    expert_leaves: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    renames: tuple[tuple[str, str], ...] = ()

    def checkpoint_key(self, runtime_name: str) -> str:
        key = runtime_name
        for ours, theirs in self.renames:
            key = key.replace(ours, theirs)
        if key.startswith("lm_head."):
            return key
        return "model." + key

    def expert_keys(self, layer: int, e: int) -> tuple[str, str, str]:
        """Per-expert keys as published on the Hub (and as transformers' save_pretrained writes them)."""
        p = f"model.layers.{layer}.{self.moe_module}.experts.{e}"
        return tuple(f"{p}.{leaf}.weight" for leaf in self.expert_leaves)  # type: ignore[return-value]

    def fused_expert_keys(self, layer: int) -> list[tuple[str, str]]:
        """Fused layouts (transformers 5 in-memory): gate_up_proj [E, 2I, H] gate rows first, down_proj [E, H, I]."""
        mods = dict.fromkeys([self.moe_module, "mlp"])
        return [(f"model.layers.{layer}.{m}.experts.gate_up_proj", f"model.layers.{layer}.{m}.experts.down_proj")
                for m in mods]


def decoder_fields(cfg: dict, where: str) -> dict:
    """The ModelSpec fields the GQA families (Mixtral, Qwen-MoE, OLMoE) read the same way."""
    hidden, heads = need_size(cfg, "hidden_size", where), need_size(cfg, "num_attention_heads", where)
    head_dim = optional_size(cfg, "head_dim") or hidden // heads
    if head_dim == 0:
        raise ValueError(f"config.json: hidden_size ({hidden}) / num_attention_heads ({heads}) gives head_dim 0; "
                         "num_attention_heads must be <= hidden_size (or set head_dim)")
    kv_heads = optional_size(cfg, "num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"config.json field 'num_attention_heads' ({heads}) must be a multiple of "
                         f"'num_key_value_heads' ({kv_heads}): each KV head serves a whole group of query heads")
    return dict(
        num_layers=need_size(cfg, "num_hidden_layers", where), hidden_size=hidden,
        vocab_size=need_size(cfg, "vocab_size", where),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, v_head_dim=head_dim,
        tie_word_embeddings=flag(cfg, "tie_word_embeddings", False), bos_token_id=token_id(cfg, "bos_token_id"),
        eos_token_ids=eos_ids(cfg), torch_dtype=torch_dtype(cfg), hidden_act=check_act(cfg),
        attn_scale=head_dim ** -0.5,
    )
