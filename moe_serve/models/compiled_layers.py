"""A compiled decode step for any expert store: each layer's attention block and router as one
compiled graph, the experts stage eager between them.

The whole-step graph (compiled.py) gathers the resident store's expert weights inside the graph. An
offloading store decides on the host which experts to copy in, and hooks may replace or read each
router's output, so there the step cannot be one graph. This one stops at every router:

    for each layer:  [compiled] input norm -> q|k|v -> rope -> cache write -> attention -> o_proj
                                -> residual -> post-attention norm -> router (ids, weights [B, K])
                     [eager]    hooks -> dispatch -> store.run (copies, experts) -> combine -> + h

One graph serves every layer: the layer's modules are inputs (dynamo lifts their parameters), and
the fused q|k|v weights are passed in (their staleness check reads object ids, which would make every
layer its own graph). A dense layer (Qwen2-MoE's MLP-only layers) is compiled whole: a second graph.
Batch size and visible cache rows are symbolic as in compiled.py; attention is the same written-out
`cached_attention`. Why: on a GPU the eager layer is ~75 small ops whose launches (~15-20 us each on
an H100's host) the GPU waits for at every layer, because the store reads the routing on the host.

Warm-up, batch-size tuning and the fall-back are CompiledDecode's. A graph that fails to compile in
the middle of a step finishes that step with the same function run eagerly (hooks and the store have
already seen its first layers: the step is not run twice), and later steps take the eager model.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from moe_serve.models.attention import visible_keys, write_cache_rows
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.compiled import CompiledDecode, _own_copy, cached_attention
from moe_serve.models.hooks import NO_HOOKS
from moe_serve.models.moe import MoEBlock

log = logging.getLogger(__name__)


def layer_front(layer, h, cos, sin, rows, key, positions, slots, cache, fused):
    """One layer of B decodes up to its router. h [B, H]; cos/sin [B, rope_dim]; rows long [B]: each
    new token's flat cache row; key long [T]: 0..T-1; positions/slots long [B]; cache (K, V);
    fused: the layer's `fused_weights()`. -> (h after the attention residual [B, H], x the MLP's
    input [B, H], ids long [B, K], weights [B, K]); a dense layer: (h after the whole layer, x, None, None)."""
    attn, b = layer.self_attn, h.shape[0]
    q, k, v = attn.project(layer.input_layernorm.forward(h), cos, sin, fused)
    write_cache_rows(cache, (k, v), rows)
    o = cached_attention(q, cache, slots, visible_keys(key, positions + 1, attn.window), attn.scale)  # [B, Hq, D]
    h = h + F.linear(o.reshape(b, -1), attn.o_proj.weight, attn.o_proj.bias)
    x = layer.post_attention_layernorm.forward(h)
    if not isinstance(layer.mlp, MoEBlock):
        return h + layer.mlp.forward(x), x, None, None
    ids, weights = layer.mlp.gate.forward(x)
    return h, x, ids, weights


def make_compiled_decode(model, max_batch: int) -> CompiledDecode:
    """The whole-step graph for the resident store, the per-layer graphs for any other."""
    from moe_serve.experts.store import ResidentExpertStore

    cls = CompiledDecode if type(model.store) is ResidentExpertStore else CompiledLayers
    return cls(model, max_batch)


class CompiledLayers(CompiledDecode):
    """CompiledDecode's contract (accepts / warm_up / tune_max_batch / forward) for a model whose
    store or hooks the whole-step graph cannot take: any expert store, any hooks."""

    def __init__(self, model, max_batch: int):
        super().__init__(model, max_batch)
        self._front = torch.compile(_own_copy(layer_front), dynamic=False, fullgraph=True)

    def accepts(self, batch: ForwardBatch) -> bool:
        return (self.failed is None and batch.num_seqs <= self.max_batch and not batch.all_logits
                and batch.is_decode_only and max(batch.context_lens) + 1 < self.model.max_len)

    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        logits = self._run(batch, self.model.hooks)
        if logits is not None:
            self.steps += 1
        return logits

    def _run(self, batch: ForwardBatch, hooks=NO_HOOKS):
        """Logits fp32 [B, V]; None when the first layer's graph failed to compile (the caller runs
        the eager step). Hooks see the step as in the eager model; warm-up and tuning pass none."""
        m, dev = self.model, self.model.device
        tokens, positions = batch.token_ids.to(dev, copy=True), batch.positions.to(dev, copy=True)
        slots = torch.tensor(batch.slot_ids, dtype=torch.long, device=dev)
        if self._keys.shape[0] != m.max_len:
            self._keys = torch.arange(m.max_len, device=dev)
        key = self._keys[:max(batch.context_lens) + 1]
        torch._dynamo.mark_dynamic(key, 0)
        many = batch.num_seqs > 1  # B = 1 gets its own graph; B >= 2 one with B symbolic in every input
        front = self._front if self.failed is None else layer_front
        saved, m.hooks = m.hooks, hooks  # the MoE blocks read the runtime's hooks
        try:
            h = F.embedding(tokens, m.embed_tokens.weight)  # [B, H]
            cos, sin = m.rotary.cos_sin(positions, h.dtype)
            rows = slots * m.max_len + positions
            if many:
                for t in (cos, sin, rows, positions, slots):
                    torch._dynamo.mark_dynamic(t, 0)
            for i, (layer, attn, cache) in enumerate(zip(m.layers, self._attn, m.kv_cache)):
                if many:
                    torch._dynamo.mark_dynamic(h, 0)
                args = (layer, h, cos, sin, rows, key, positions, slots, cache, attn.fused_weights())
                try:
                    h, x, ids, weights = front(*args)
                except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: say why once, go on
                    if front is layer_front:
                        raise  # the plain function failed: a real error
                    self.failed = f"{type(exc).__name__}: {exc}"
                    log.warning("compiled decode disabled, running eagerly: %s", self.failed.splitlines()[0])
                    if i == 0:
                        return None  # nothing has seen this step yet: the caller runs it eagerly
                    front = layer_front  # later layers have: finish it with the same function, eager
                    h, x, ids, weights = front(*args)
                if i == 0 and hooks.active:  # after the first graph ran: a failure there leaves no trace
                    hooks.begin_step(batch)
                if ids is not None:
                    h = h + layer.mlp.routed(x, ids, weights)
            head = m.embed_tokens.weight if m.spec.tie_word_embeddings else m.lm_head.weight
            logits = F.linear(m.norm.forward(h), head).float()
            if hooks.active:
                hooks.end_step(batch)
            return logits
        finally:
            m.hooks = saved
