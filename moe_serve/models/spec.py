"""ModelSpec: one normalized description of every supported MoE family.

Each family module (`moe_serve.models.families.*`) reads its config.json into this dataclass; the
lean model, the KV cache, the expert store and the engine read only the spec, never the raw config.
Routing rules, rotary variants and attention flavour are data here so that one model implementation
covers Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2/V3.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, or one of its options, is not supported."""


@dataclass(frozen=True)
class RopeSpec:
    kind: str = "default"  # default | linear | yarn | llama3
    theta: float = 10000.0
    dim: int = 0  # rotary dimensions per head (head_dim, or qk_rope_head_dim for MLA)
    interleaved: bool = False  # DeepSeek: rotate adjacent pairs (x0,x1),(x2,x3)... instead of halves
    complex_fp32: bool = False  # DeepSeek-V2 (as transformers): pairs as complex numbers, rotated in fp32
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None  # yarn: scales cos/sin (None: derived from factor/mscale)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3


@dataclass(frozen=True)
class RoutingSpec:
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid: how router logits become scores
    topk_method: str = "greedy"  # greedy | group_limited_greedy (group max) | noaux_tc (group top-2 sum + bias)
    norm_topk_prob: bool = False  # renormalize the k chosen scores to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    n_group: int = 1
    topk_group: int = 1
    has_bias: bool = False  # e_score_correction_bias: added for the choice only, not to the weights
    logits_fp32: bool = False  # DeepSeek computes the router matmul in fp32
    weights_fp32: bool = True  # False: the weights are cast to the hidden dtype (Qwen, OLMoE)


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention: the KV cache holds a latent of kv_lora_rank + rope dims."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    family: str  # mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | deepseek_v3
    architecture: str  # e.g. MixtralForCausalLM
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim (GQA) or qk_head_dim (MLA)
    v_head_dim: int
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]  # model layer ids that are MoE; the rest are dense MLPs
    moe_intermediate_size: int
    intermediate_size: int  # dense MLP layers
    routing: RoutingSpec
    rope: RopeSpec
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"  # the checkpoint's dtype ("auto" resolves to it)
    hidden_act: str = "silu"
    attention: str = "gqa"  # gqa | mla
    mla: MLASpec | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # none | head (Qwen3: per head) | full (OLMoE: over the whole projection)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None: full attention
    attn_scale: float = 0.0  # softmax scale (DeepSeek YaRN folds mscale^2 in)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) scales the shared expert
    extra: dict = field(default_factory=dict, compare=False)  # family-specific leftovers, informational

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int:
        """Index among the MoE layers (what hooks and the expert store use) of model layer `layer`."""
        return self.moe_layers.index(layer)

    @property
    def rope_mode(self) -> str:
        """How q/k are rotated: half | pairs | complex (see moe_serve.models.rope.Rotary)."""
        return "complex" if self.rope.complex_fp32 else ("pairs" if self.rope.interleaved else "half")

    @property
    def context_length(self) -> int:
        """Tokens a sequence may span: max_position_embeddings, or under YaRN original x factor when that
        is more. YaRN is enabled by adding rope_scaling to a config.json that keeps its max_position_embeddings
        (Qwen3: 40960, with factor 4 over 32768 for 131072 tokens); vLLM derives the same length."""
        r = self.rope
        if r.kind == "yarn" and r.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(r.original_max_position_embeddings * r.factor))
        return self.max_position_embeddings

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token costs across all layers."""
        if self.attention == "mla":
            per_layer = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        else:
            per_layer = self.num_kv_heads * (self.head_dim + self.v_head_dim)
        return per_layer * self.num_layers * dtype_bytes

    def summary(self) -> dict:
        """Short, printable description (for `moe-serve info`)."""
        return {
            "family": self.family, "architecture": self.architecture, "layers": self.num_layers,
            "moe_layers": len(self.moe_layers), "hidden": self.hidden_size, "vocab": self.vocab_size,
            "heads": self.num_heads, "kv_heads": self.num_kv_heads, "attention": self.attention,
            "experts": self.num_experts, "top_k": self.top_k, "moe_intermediate": self.moe_intermediate_size,
            "shared_expert_intermediate": self.shared_expert_intermediate_size,
            "routing": f"{self.routing.scoring}/{self.routing.topk_method}", "rope": self.rope.kind,
            "max_position_embeddings": self.max_position_embeddings, "dtype": self.torch_dtype,
        }
