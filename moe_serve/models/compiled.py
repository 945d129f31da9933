"""A compiled decode step: batches of one-token decodes as one torch.compile (inductor) graph.

The eager step pays PyTorch's per-op cost (~1-3 us an op on a CPU, ~900 ops a step on the default
model) and Python's bookkeeping for mixed batches; inductor fuses the elementwise work into a few C++
(or Triton) loops around the matmuls and drops the interpreter from the loop: the default model's
batch-1 step is ~2.4x faster, below the leanest eager step we could write (docs/engine.md). As
gpt-fast does it:
  - the batch size B and the visible cache rows T are symbolic (marked per call), so there are two
    graphs (B = 1, and B >= 2; on a CPU a third, "wide", from `WIDE_BATCH` on), compiled by
    `warm_up` when the engine starts;
  - attention reads each slot's first T cache rows and masks the keys past each sequence's position,
    written out (`cached_attention`) so that the rows are read inside inductor's fused loops (in
    wide batches SDPA's kernel does it, over gathered rows: `sdpa_attention`);
  - experts are reached by gathering their weights by id (no host sync, no data-dependent shapes):
    `w[ids]` [B, K, out, in] reduced against the token. It reads K experts per token (the eager
    grouped path reads each distinct expert once), so it is used up to `max_batch` decodes only;
  - a bf16 checkpoint computed in fp32 gathers bf16 copies of its experts (`narrow_copy`; they cost
    half the experts' fp32 memory again), and at B = 1 also reads bf16 copies of the attention
    projections and the output head, each as one reduction per output row (`widened_linear`; both
    in models/narrow.py); narrow weights of 4 MB and more go through an AVX-512 kernel (models/bf16_gemv.py),
    and in wide batches narrow experts of any size do.
Everything else (prefill chunks, mixed batches, bigger batches, offloading stores, hooks that replace
routing or read hidden states, MLA) runs the eager model; outputs match it within float rounding
(tests/models/test_compiled_decode.py). Routing is returned, so id-only hooks (the expert-load
counter) still see every layer's choice.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from moe_serve.models import bf16_gemv
from moe_serve.models.attention import visible_keys, write_cache_rows
from moe_serve.models.batch import ForwardBatch
from moe_serve.models.decode_ops import cached_attention, gathered_experts, sdpa_attention
from moe_serve.models.hooks import NO_HOOKS
from moe_serve.models.layers import GQAttention
from moe_serve.models.moe import MoEBlock
from moe_serve.models.narrow import NarrowCopies, kernel_linear, widened_linear
from moe_serve.timing import best_time

log = logging.getLogger(__name__)


def unsupported_reason(model) -> str | None:
    """Why `model` cannot use the compiled decode step, or None when it can."""
    from moe_serve.experts.store import ResidentExpertStore

    if any(not isinstance(layer.self_attn, GQAttention) for layer in model.layers):
        return "multi-head latent attention (DeepSeek) runs eagerly"
    if type(model.store) is not ResidentExpertStore:
        return f"expert store {type(model.store).__name__} is not the resident store"
    if model.rotary is not None and model.rotary.mode == "complex":
        return "complex rotary mode"
    return None


def decode_step(model, tokens, positions, slots, key, fused, out_proj, experts, caches, head, kernel=False,
                wide=False):
    """One step of B decodes. tokens/positions/slots long [B]; key long [T]: 0..T-1, the cache rows
    to attend over (T = max position + 1; a tensor so that T is a symbolic size); fused: each layer's
    `fused_weights()`; out_proj: each layer's o_proj weight; experts: (gate_up, down) per MoE layer,
    None for dense ones; caches: each layer's (K, V) [slots, max_len, Hkv, D]; head: the output
    projection [V, H]. At B = 1 the qkv, o_proj and head weights may be narrow copies. kernel: narrow
    copies of 4 MB and more go through the AVX-512 kernel (bf16_gemv.py). wide (`WIDE_BATCH`): attention
    through SDPA, and narrow experts of any size through the kernel.
    -> (logits fp32 [B, V], expert ids long [L, B, K], weights [L, B, K])."""
    b = tokens.shape[0]
    h = F.embedding(tokens, model.embed_tokens.weight)  # [B, H]
    cos, sin = model.rotary.cos_sin(positions, h.dtype)
    rows = slots * model.max_len + positions  # each new token's row in a cache viewed as [slots * max_len]
    all_ids, all_weights = [], []
    linear = kernel_linear if kernel else widened_linear
    for layer, fw, ow, ex, cache in zip(model.layers, fused, out_proj, experts, caches):
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm.forward(h), cos, sin, fw, linear=linear)
        write_cache_rows(cache, (k, v), rows)
        visible = visible_keys(key, positions + 1, attn.window)  # [B, T]
        o = (sdpa_attention if wide else cached_attention)(q, cache, slots, visible, attn.scale)  # [B, Hq, D]
        h = h + linear(o.reshape(b, -1), ow, attn.o_proj.bias)
        x = layer.post_attention_layernorm.forward(h)
        mlp = layer.mlp
        if isinstance(mlp, MoEBlock):
            ids, weights = mlp.gate.forward(x)  # [B, K]
            out = gathered_experts(x, ids, weights, *ex, kernel=kernel, grouped=wide)
            if hasattr(mlp, "shared_expert"):
                shared = mlp.shared_expert.forward(x)
                if hasattr(mlp, "shared_expert_gate"):
                    shared = torch.sigmoid(mlp.shared_expert_gate.forward(x)) * shared
                out = out + shared
            all_ids.append(ids)
            all_weights.append(weights)
        else:
            out = mlp.forward(x)
        h = h + out
    logits = linear(model.norm.forward(h), head).float()
    return logits, torch.stack(all_ids), torch.stack(all_weights)


TUNED_SIZES = (2, 4, 8, 16)  # decode batch sizes `tune_max_batch` times
# From this many decodes on, a CPU step runs a third graph, "wide": attention through SDPA's flash
# kernel, and narrow experts of any size through the widening kernel, grouped by expert (gathering
# weights by id reads an expert once per token, the kernel once per step; the weights of small
# experts sit in cache, so below this the kernel's sorting and calls cost more than they save).
# Measured on the default model (256 KB experts, K = 2 of E = 8): experts through the kernel 1.69
# against 2.29 ms a step at B = 16 and 1.30 against 1.45 at B = 8 (context 2), the same at B = 4 and
# 0.98 against 0.87 ms at B = 2; with SDPA as well 2.07 against 2.30 ms at B = 16 and context 128.
WIDE_BATCH = 8
# On a CPU inductor writes the step's wrapper (the code that allocates buffers and calls the kernels in
# order) in C++: the Python one cost 5-15% of a default-model step (0.62-0.63 against 0.58 ms at batch 1,
# 2.0 against 1.7 ms at 16, context 128). Its first compile takes longer; torch.profiler does not see
# the ops it calls.
CPP_WRAPPER = True


def pick_max_batch(seconds: dict[int, tuple[float, float]]) -> int:
    """{batch size: (compiled step s, eager step s)} -> the largest size up to which the compiled
    step is faster at every timed size (1 when it loses at the first): the compiled step's cost grows
    with the tokens (it reads each token's experts), the eager one's with the distinct experts, so
    once eager wins it keeps winning at bigger sizes."""
    best = 1
    for b in sorted(seconds):
        compiled, eager = seconds[b]
        if compiled > eager:
            break
        best = b
    return best


def _own_copy(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object, at most 8
    (`recompile_limit`), and each model's graphs guard on that model: models sharing one function
    (several LLMs in a process, tests) would exhaust that budget and fall back to eager."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _throwaway_decodes(b: int) -> ForwardBatch:
    """b one-token decodes at position 1 of slots 0..b-1 (rows a sequence's prefill rewrites before
    anything reads them)."""
    return ForwardBatch(token_ids=torch.zeros(b, dtype=torch.long), positions=torch.ones(b, dtype=torch.long),
                        slot_ids=list(range(b)), query_lens=[1] * b, context_lens=[1] * b)


class CompiledDecode:
    """Runs decode-only batches of at most `max_batch` sequences through the compiled step.

    `model.forward` asks `accepts(batch)` first; a compile failure (no C++ compiler, an unsupported
    op) is logged once and the model goes on eagerly, so `--compile-decode` never stops a server."""

    def __init__(self, model, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"model.compile_max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._store_type = type(model.store)
        self.narrow = NarrowCopies()  # bf16 copies of a bf16 checkpoint's weights computed in fp32
        self.kernel: bool | None = None  # narrow copies through bf16_gemv's kernel (decided at the first step)
        # the smallest batch that runs the wide graph: on a CPU (SDPA's CPU kernel, the widening kernel)
        self.wide_from: float = WIDE_BATCH if model.device.type == "cpu" else float("inf")
        # the modules the step reads, looked up once (nn.Module attribute lookups cost ~1 us each); their
        # parameter dicts are read every step, so a replaced weight is still seen
        self._attn = [layer.self_attn for layer in model.layers]
        self._o_proj = [attn.o_proj._parameters for attn in self._attn]
        self._head = (model.embed_tokens if model.spec.tie_word_embeddings else model.lm_head)._parameters
        self._moe_index = [getattr(layer.mlp, "moe_index", None) for layer in model.layers]
        self.failed: str | None = None
        self.tuned: dict[int, dict[str, float]] = {}  # tune_max_batch's timings, by batch size
        self.steps = 0  # steps run compiled (the rest of the model's steps ran eagerly)
        # Only the step's sizes are symbolic (marked per call): all-dynamic would also make every
        # weight's shape symbolic, and checking those guards costs ~0.1 ms a step.
        options = {"cpp_wrapper": CPP_WRAPPER} if model.device.type == "cpu" else None
        self._step = torch.compile(_own_copy(decode_step), dynamic=False, fullgraph=True, options=options)
        self._keys = torch.arange(0)  # 0 .. max_len-1, sized at the first step (the cache may be reallocated)

    def accepts(self, batch: ForwardBatch) -> bool:
        hooks = self.model.hooks
        return (self.failed is None and batch.num_seqs <= self.max_batch and not batch.all_logits
                and batch.is_decode_only and (not hooks.active or hooks.reads_ids_only)
                # the last cache row stays eager: attending over all max_len rows would make dynamo
                # specialise the symbolic length to max_len, which it refuses (compiled decode off for good)
                and max(batch.context_lens) + 1 < self.model.max_len
                and type(self.model.store) is self._store_type)  # a store swapped in later runs eagerly

    @torch.inference_mode()  # as model.forward: grad mode is part of what a compiled graph is for
    def warm_up(self) -> str | None:
        """Compile the graphs now (batch 1; batch 2 standing for the batches below `wide_from`; on a
        CPU, `wide_from` for those from there on), so the first requests do not wait for the compiler. The
        throwaway decodes write cache rows at position 1 of the first slots, which a sequence's
        prefill rewrites before anything reads them; no hook sees them. Returns why compiling
        failed, or None."""
        if not self.model.kv_cache:
            raise RuntimeError("compiled decode warm-up: call model.allocate_kv_cache(num_slots, max_len) first")
        for b in sorted({1, min(2, self.max_batch, self.model.num_slots)}):
            if self._run(_throwaway_decodes(b)) is None:
                return self.failed
        if 2 < self.wide_from <= min(self.max_batch, self.model.num_slots):
            self._run(_throwaway_decodes(self.wide_from))
        return self.failed

    @torch.inference_mode()
    def tune_max_batch(self, repeats: int = 3) -> int:
        """Time the compiled and the eager step on throwaway decode batches of each of TUNED_SIZES (up
        to the cache's slots; written as `warm_up` writes them, and no hook sees them) and run compiled
        up to the size `pick_max_batch` chooses. Sets and returns `max_batch`."""
        m = self.model
        seconds: dict[int, tuple[float, float]] = {}
        hooks, m.hooks = m.hooks, NO_HOOKS
        try:
            for b in TUNED_SIZES:
                if b > m.num_slots:
                    break
                batch = _throwaway_decodes(b)
                compiled = best_time(lambda: self._run(batch), repeats, m.device)
                if self.failed is not None:
                    break
                seconds[b] = (compiled, best_time(lambda: m.forward_eager(batch), repeats, m.device))
                if seconds[b][0] > seconds[b][1]:
                    break  # eager wins from here on (pick_max_batch)
        finally:
            m.hooks = hooks
        self.max_batch = pick_max_batch(seconds)
        self.tuned = {b: dict(compiled_s=c, eager_s=e) for b, (c, e) in seconds.items()}
        return self.max_batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Logits fp32 [B, V], or None when compiling failed (the caller runs the eager step)."""
        out = self._run(batch)
        if out is None:
            if self.failed is not None:  # once: accepts() refuses every later step
                log.warning("compiled decode disabled, running eagerly: %s", self.failed.splitlines()[0])
            return None
        logits, ids, weights = out
        self.steps += 1
        hooks = self.model.hooks
        if hooks.active:  # id-only observers (accepts() checked): the step's routing, layer by layer
            hooks.begin_step(batch)
            for i, (layer_ids, layer_weights) in enumerate(zip(ids.unbind(0), weights.unbind(0))):  # 2 ops, not 2 L
                hooks.route(i, None, layer_ids, layer_weights)
            hooks.end_step(batch)
        return logits

    def _run(self, batch: ForwardBatch):
        """(logits fp32 [B, V], ids [L, B, K], weights [L, B, K]) from the compiled step, or None
        when compiling failed (`failed` says why) or the batch holds a token id past the vocabulary."""
        m, dev = self.model, self.model.device
        narrow, one = self.narrow.get, batch.num_seqs == 1
        fused = [attn.fused_weights() for attn in self._attn]
        out_proj = [params["weight"] for params in self._o_proj]
        head = self._head["weight"]
        if one:  # B >= 2 keeps F.linear: it reads a weight once for all rows, the reduction once per row
            fused = [(narrow(w), *rest) for w, *rest in fused]
            out_proj, head = [narrow(w) for w in out_proj], narrow(head)
        gate_up, down = m.store.gate_up, m.store.down
        experts = [None if mi is None else (narrow(gate_up[mi]), narrow(down[mi])) for mi in self._moe_index]
        # copies made here, in inference mode, whoever made the batch's tensors: whether an input is an
        # inference tensor is part of what a graph was compiled for (a mismatch recompiles)
        tokens, positions = batch.token_ids.to(dev, copy=True), batch.positions.to(dev, copy=True)
        slots = torch.tensor(batch.slot_ids, dtype=torch.long, device=dev)
        if self._keys.shape[0] != m.max_len:
            self._keys = torch.arange(m.max_len, device=dev)
        key = self._keys[:max(batch.context_lens) + 1]
        torch._dynamo.mark_dynamic(key, 0)
        if batch.num_seqs > 1:  # B = 1 gets its own graph (dynamo specialises sizes 0 and 1 anyway)
            for t in (tokens, positions, slots):
                torch._dynamo.mark_dynamic(t, 0)
        try:
            if self.kernel is None:  # built (~25 s, then cached) only when there are narrow copies to read
                self.kernel = (dev.type == "cpu" and any(ex is not None and ex[0].dtype != m.dtype for ex in experts)
                               and bf16_gemv.available())
            wide = batch.num_seqs >= self.wide_from
            return self._step(m, tokens, positions, slots, key, fused, out_proj, experts, m.kv_cache, head, self.kernel,
                              wide)
        except Exception as exc:  # noqa: BLE001 - compiling is an optimisation: fall back, say why once
            if ((tokens < 0) | (tokens >= m.embed_tokens.weight.shape[0])).any():
                return None  # the batch's fault, not the graph's: the eager step raises it, for this step only
            self.failed = f"{type(exc).__name__}: {exc}"
            return None
