"""The compiled decode step (models/compiled.py) against the eager model it stands in for: the same
logits (float rounding apart) and expert choices, for every GQA family, at batch 1 and for a batch of
decodes of different lengths in scattered slots; past a sliding window; through the engine. When it
runs and when it falls back to eager: test_compiled_decode_fallback.py."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moe_serve import LLM, SamplingParams
from moe_serve.models import bf16_gemv, load_model, narrow
from moe_serve.models import compiled as compiled_module
from moe_serve.models.compiled import TUNED_SIZES
from moe_serve.tracing.load import ExpertLoadCounter
from tests.models.decode_steps import run


@pytest.mark.parametrize("family", ["mixtral_window", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_compiled_decode_matches_eager(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    eager, compiled = load_model(path), load_model(path)
    for m in (eager, compiled):
        m.allocate_kv_cache(4, 64)
    assert compiled.enable_compiled_decode(max_batch=4) is None
    steps = 5  # mixtral_window's window is 8: the batch-1 steps run past it
    want_logits, want_ids = run(eager, steps)
    got_logits, got_ids = run(compiled, steps)
    assert compiled.compiled.failed is None and compiled.compiled.steps == 2 * steps
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("family,kernel", [("mixtral", True), ("mixtral", False), ("qwen2_moe", True)])
def test_bf16_checkpoint_in_fp32_reads_narrow_expert_copies(tiny_checkpoint, family, kernel, monkeypatch):
    """A bf16 checkpoint computed in fp32: the compiled step reads bf16 copies of the expert weights
    (and at batch 1 of the attention projections and the head; every fp32 value is a bf16 value,
    so the products are the eager ones) and still matches eager; through the AVX-512 kernel
    (bf16_gemv.py) where it runs, and through inductor's loop. qwen2_moe: a qkv bias, a shared expert,
    a tied head."""
    if kernel and not bf16_gemv.available():
        pytest.skip(f"bf16 GEMV kernel unavailable here: {bf16_gemv._state['error']}")
    monkeypatch.setattr(narrow, "KERNEL_MIN_BYTES", 0)  # the tiny weights through the kernels too
    path = tiny_checkpoint(family, dtype=torch.bfloat16)
    eager, compiled = load_model(path, dtype="float32"), load_model(path, dtype="float32")
    for m in (eager, compiled):
        m.allocate_kv_cache(4, 64)
    compiled.enable_compiled_decode(max_batch=4)
    compiled.compiled.kernel = kernel
    want_logits, want_ids = run(eager, 3)
    got_logits, got_ids = run(compiled, 3)
    store, copies = compiled.store, compiled.compiled.narrow
    head = compiled.embed_tokens if compiled.spec.tie_word_embeddings else compiled.lm_head
    for w in (*store.gate_up, *store.down, compiled.layers[0].self_attn.o_proj.weight, head.weight,
              compiled.layers[0].self_attn.fused_weights()[0]):  # made by the steps, as they read them
        assert w in copies and w.dtype == torch.float32
        assert copies.get(w).dtype == torch.bfloat16 and torch.equal(copies.get(w).float(), w)
    assert compiled.compiled.steps == 6 and compiled.compiled.kernel is kernel
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    if family != "mixtral" or kernel:
        return
    # an fp32 checkpoint has no exact bf16 copy: the compiled step reads the fp32 weights
    fp32 = load_model(tiny_checkpoint("mixtral"))
    fp32.allocate_kv_cache(2, 16)
    fp32.enable_compiled_decode(max_batch=2)
    assert fp32.compiled.warm_up() is None  # a batch-1 and a batch-2 step
    assert all(w in fp32.compiled.narrow and fp32.compiled.narrow.get(w) is w for w in (*fp32.store.gate_up, fp32.lm_head.weight))


@pytest.mark.parametrize("dtype,cpp_wrapper",
                         [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_wide_batches_attend_through_sdpa_and_group_narrow_experts(tiny_checkpoint, dtype, cpp_wrapper, monkeypatch):
    """From `wide_from` decodes on (a CPU's third graph), attention goes through SDPA, and a bf16
    checkpoint's narrow experts under KERNEL_MIN_BYTES go through the AVX-512 kernel, grouped by
    expert: the same logits and expert choices as eager. Smaller batches keep the written-out
    attention and inductor's loop; the warm-up compiles every graph. Which kernels ran is counted
    through the Python wrapper (the profiler does not see the C++ wrapper's calls)."""
    if dtype == torch.bfloat16 and not bf16_gemv.available():
        pytest.skip(f"bf16 GEMV kernel unavailable here: {bf16_gemv._state['error']}")
    monkeypatch.setattr(compiled_module, "CPP_WRAPPER", cpp_wrapper)
    path = tiny_checkpoint("mixtral", dtype=dtype)
    eager, compiled = load_model(path, dtype="float32"), load_model(path, dtype="float32")
    for m in (eager, compiled):
        m.allocate_kv_cache(4, 64)
    assert all(not narrow.worth_the_kernel(w[0]) for w in (*compiled.store.gate_up, *compiled.store.down))
    compiled.enable_compiled_decode(max_batch=4)
    compiled.compiled.wide_from = 3  # run()'s three-decode steps are wide, its one-decode steps not
    assert compiled.compiled.warm_up() is None
    graphs = counters["stats"]["unique_graphs"]
    want_logits, want_ids = run(eager, 3)
    with torch.profiler.profile() as prof:
        got_logits, got_ids = run(compiled, 3)
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled the wide graph
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = compiled.spec.num_moe_layers
    assert compiled.compiled.steps == 6
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    if cpp_wrapper:
        return
    # per wide step and layer: one SDPA kernel call (the graph calls the CPU kernel itself; the eager
    # prefills call it through F.scaled_dot_product_attention), and with narrow experts, gate_up and
    # down through the widening kernel
    flash = calls.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0)
    assert flash - calls.get("aten::scaled_dot_product_attention", 0) == 3 * layers
    assert calls.get("moe_serve::bf16_grouped_gemm", 0) == (3 * 2 * layers if dtype == torch.bfloat16 else 0)


def test_warm_up_compiles_unseen_and_changes_nothing(tiny_checkpoint):
    """warm_up compiles both graphs before any request: no hook sees its throwaway decodes, and the
    cache rows they wrote do not change what the model computes afterwards."""
    path = tiny_checkpoint("qwen3_moe")
    eager, model = load_model(path), load_model(path)
    for m in (eager, model):
        m.allocate_kv_cache(4, 64)
    counter = ExpertLoadCounter(model.spec.num_moe_layers, model.spec.num_experts)
    model.hooks = counter
    assert model.enable_compiled_decode(max_batch=4, warm_up=True) is None
    assert model.compiled.steps == 0 and int(counter.counts.sum()) == 0
    graphs = counters["stats"]["unique_graphs"]
    want_logits, _ = run(eager, 2)
    got_logits, _ = run(model, 2)
    assert model.compiled.steps == 4
    assert counters["stats"]["unique_graphs"] == graphs  # the requests compiled nothing more
    for want, got in zip(want_logits, got_logits):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_batch", [4, None])
def test_llm_generate_compiled_equals_eager(tiny_qwen_dir, max_batch):
    """End to end through the engine: greedy continuations of requests decoded together are the eager
    ones, and the expert-load counter counts the same routing (the warm-up and, with no max batch set,
    the start-up timing of compiled against eager steps are not counted)."""
    prompts = ["The quick brown fox", "Mixture-of-experts models route", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(model=str(tiny_qwen_dir), max_model_len=64) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
        want_load = llm.expert_load()
    with LLM(model=str(tiny_qwen_dir), max_model_len=64, compile_decode=True, compile_max_batch=max_batch) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        compiled = llm.engine.model.compiled
        assert compiled.steps > 0 and compiled.failed is None
        assert (compiled.max_batch == 4) if max_batch else (set(compiled.tuned) <= set(TUNED_SIZES))
        assert (llm.expert_load() == want_load).all()
    assert got == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor's Triton kernels)")
@pytest.mark.parametrize("family", ["mixtral_window", "qwen2_moe"])
def test_compiled_decode_on_cuda_matches_eager(tiny_checkpoint, family):
    """The same check on a GPU, where inductor emits Triton kernels instead of C++."""
    path = tiny_checkpoint(family)
    eager, compiled = load_model(path, device="cuda"), load_model(path, device="cuda")
    for m in (eager, compiled):
        m.allocate_kv_cache(4, 64)
    assert compiled.enable_compiled_decode(max_batch=4) is None
    want_logits, want_ids = run(eager, 5)
    got_logits, got_ids = run(compiled, 5)
    assert compiled.compiled.failed is None and compiled.compiled.steps == 10
    for want, got in zip(want_logits, got_logits):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    for want, got in zip(want_ids, got_ids):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
