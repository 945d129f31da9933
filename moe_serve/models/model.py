"""The lean MoE transformer: embeddings -> decoder layers (attention + dense MLP or MoE) -> logits.

Forward contract (the engine's seam, see batch.py):
    model.allocate_kv_cache(num_slots, max_len)  preallocates zeroed per-slot caches for all layers
    model.kv_bytes_per_token()                    bytes one cached token costs (size slots from a budget)
    model.copy_kv_prefix(src, dsts, n)            optional: copy a slot's first n cached positions to others
    model.forward(batch: ForwardBatch) -> logits  fp32 [S, V] (each sequence's last token) or [N, V]
                                                  (every token) when batch.all_logits
The batch may mix prefill chunks (query_len > 1, any context_len) and decodes; each sequence's new
tokens are written into its slot at `positions`. Expert weights are only reached through
`model.store` (an ExpertStore); `model.hooks` see every router's choice when active.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_serve.models.attention import StepMeta
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.compiled import TUNED_SIZES, CompiledDecode, unsupported_reason
from moe_serve.models.hooks import NO_HOOKS, RouterHooks
from moe_serve.models.layers import MLP, GQAttention, RMSNorm, linear
from moe_serve.models.mla import MLAttention
from moe_serve.models.moe import LocalDispatcher, MoEBlock, MoERuntime
from moe_serve.models.rope import Rotary
from moe_serve.models.spec import ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, runtime: MoERuntime):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = MLAttention(spec, layer) if spec.attention == "mla" else GQAttention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if layer in spec.moe_layers:
            self.mlp = MoEBlock(spec, spec.moe_index(layer), runtime)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size)

    def forward(self, h, cos, sin, meta, cache):  # h [N, H]
        # Submodules are called through .forward: nn.Module.__call__'s hook machinery (no hooks are
        # registered on them) costs ~2.5 us a call, ~5% of the default model's decode step.
        h = h + self.self_attn.forward(self.input_layernorm.forward(h), cos, sin, meta, cache)
        return h + self.mlp.forward(self.post_attention_layernorm.forward(h))


class MoEModel(nn.Module):
    def __init__(self, spec: ModelSpec, store=None, hooks: RouterHooks = NO_HOOKS):
        super().__init__()
        self.spec = spec
        self.runtime = MoERuntime(store=store, hooks=hooks)
        self.runtime.dispatcher = LocalDispatcher(self.runtime)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, self.runtime) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = linear(spec.hidden_size, spec.vocab_size)
        self.rotary: Rotary | None = None
        self.kv_cache: list[tuple[torch.Tensor, ...]] = []
        self.max_len = 0
        self.compiled: CompiledDecode | None = None  # see enable_compiled_decode

    # --- the engine's handles ---------------------------------------------------------------
    @property
    def store(self):
        return self.runtime.store

    @store.setter
    def store(self, store) -> None:
        self.runtime.store = store

    @property
    def hooks(self) -> RouterHooks:
        return self.runtime.hooks

    @hooks.setter
    def hooks(self, hooks: RouterHooks) -> None:
        self.runtime.hooks = hooks

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def finish_loading(self) -> "MoEModel":
        """Build what is derived, not loaded (rope tables, fused q|k|v weights) once weights sit on their device."""
        self.rotary = Rotary(self.spec.rope, self.device)
        for layer in self.layers:
            if isinstance(layer.self_attn, GQAttention):
                layer.self_attn.fuse_projections()
        return self

    def enable_compiled_decode(self, max_batch: int | None, warm_up: bool = False) -> str | None:
        """Run decode-only steps of up to `max_batch` sequences through one torch.compile graph
        (models/compiled.py); `warm_up`: compile now (after allocate_kv_cache), not at the first
        decodes. `max_batch` None: timed after the warm-up (`CompiledDecode.tune_max_batch`), which it
        needs. Returns why it cannot (and stays eager), or None."""
        if max_batch is None and not warm_up:
            raise ValueError("model.compile_max_batch: unset (timed at start-up) needs the warm-up")
        reason = unsupported_reason(self)
        # to be tuned: the largest size tried until then (so the warm-up compiles the batch >= 2 graph)
        self.compiled = None if reason else CompiledDecode(self, max(TUNED_SIZES) if max_batch is None else max_batch)
        if self.compiled is not None and warm_up:
            reason = self.compiled.warm_up()
            if reason is None and max_batch is None:
                self.compiled.tune_max_batch()
        return reason

    def close(self) -> None:
        """Release what the expert store holds beyond memory (an offloading store's copy thread)."""
        getattr(self.store, "close", lambda: None)()

    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)

    def allocate_kv_cache(self, num_slots: int, max_len: int) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"allocate_kv_cache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        self.kv_cache = [tuple(torch.zeros(s, dtype=self.dtype, device=self.device)
                               for s in layer.self_attn.cache_shapes(num_slots, max_len)) for layer in self.layers]
        self.num_slots, self.max_len = num_slots, max_len

    @torch.inference_mode()
    def copy_kv_prefix(self, src_slot: int, dst_slots: list[int], n: int) -> None:
        """Copy positions [0, n) of slot `src_slot`'s cache, every layer, into each of `dst_slots`: the
        completions of one request share its prompt's prefill (the engine runs it once). In place, so the
        compiled decode's views of the cache stay valid."""
        if not 0 < n <= self.max_len or not all(0 <= s < self.num_slots for s in [src_slot, *dst_slots]):
            raise ValueError(f"copy_kv_prefix: slots {src_slot} -> {dst_slots} (of {self.num_slots}) and "
                             f"n={n} (max_len {self.max_len}) out of range")
        dst = torch.tensor(dst_slots, dtype=torch.long, device=self.device)
        for layer in self.kv_cache:
            for cache in layer:  # [slots, max_len, ...]
                cache[dst, :n] = cache[src_slot, :n]  # broadcast over the destination slots

    # --- forward ------------------------------------------------------------------------------
    def _check(self, batch: ForwardBatch) -> None:
        if not self.kv_cache:
            raise RuntimeError("call model.allocate_kv_cache(num_slots, max_len) before forward")
        s = batch.num_seqs
        if not (len(batch.query_lens) == len(batch.context_lens) == s) or s == 0:
            raise ValueError(f"ForwardBatch: slot_ids, query_lens and context_lens must have the same length >= 1, "
                             f"got {s}, {len(batch.query_lens)}, {len(batch.context_lens)}")
        for slot, q, c in zip(batch.slot_ids, batch.query_lens, batch.context_lens):
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot id {slot} out of range [0, {self.num_slots})")
            if q < 1 or c < 0 or c + q > self.max_len:
                raise ValueError(f"sequence in slot {slot}: context_len {c} + query_len {q} must be <= "
                                 f"max_len {self.max_len} (and query_len >= 1)")

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        self._check(batch)
        if self.compiled is not None and self.compiled.accepts(batch):
            logits = self.compiled.forward(batch)
            if logits is not None:
                return logits
        return self.forward_eager(batch)

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        """The eager step (any batch; `forward` checks the batch and may take the compiled one)."""
        meta = StepMeta.build(batch, self.device, self.max_len)
        hooks = self.runtime.hooks
        if hooks.active:
            hooks.begin_step(batch)
        h = F.embedding(batch.token_ids.to(self.device), self.embed_tokens.weight)  # [N, H]
        cos, sin = self.rotary.cos_sin(meta.positions, self.dtype)  # [N, rope_dim]
        for layer, cache in zip(self.layers, self.kv_cache):
            h = layer.forward(h, cos, sin, meta, cache)
        if not batch.all_logits and meta.prefills:  # decodes only: every token is its sequence's last
            h = h.index_select(0, meta.last_idx)  # [S, H]
        h = self.norm(h)
        head = self.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(h, head)  # [S or N, V]
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if hooks.active:
            hooks.end_step(batch)
        return logits
