"""A CPU kernel for the compiled decode step: fp32 rows times bf16 weights, widened as they load.

    grouped_gemm: y[s:t] = x[s:t] @ w[e].T   w bf16 [E, O, I], x fp32 [M, I] sorted by expert,
                  for s, t = offsets[e], offsets[e + 1] (long [E + 1])       -> fp32 [M, O]

A bf16 checkpoint computed in fp32 has fp32 weights whose every value is a bf16 value (narrow.py):
the products of x with the bf16 copies are the fp32 products, from half the bytes. Inductor's fused
widen-and-reduce loop for this is compute-bound on this repository's 2-core AVX-512 CPU; this loop
(zero-extend each bf16 to 32 bits, shift it into an fp32's high half, FMA into four rows'
accumulators, each load of a weight row used for up to four rows of x) reads a 512 MB matrix at
22-23 GB/s against inductor's 17, the machine reading 21-25 (benches/bf16_gemv.py). Sums run in
another order than the reduction's: equal within fp32 rounding.

Built on first use with torch's C++ extension loader (g++, ninja; ~25 s, then cached in
TORCH_EXTENSIONS_DIR) and only on a CPU with AVX-512 (`available()`; else the compiled step keeps
inductor's loop). It is registered as the operator `moe_serve::bf16_grouped_gemm` (C++, no Python in
between), which the compiled graph calls as an extern kernel. Each weight row is read once for all its
expert's rows (register tiles of 4 weight rows x up to 4 rows): one row (batch 1, or a dense weight
as one expert) is bandwidth-bound; 32 rows over 8 experts are compute-bound, 2-2.6x the fp32 matmuls
per expert.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

static inline __m512 widen16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is an fp32's high half)
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

static inline float widen1(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One tile: NR weight rows (stride I) x NT rows of x (stride I) -> y (stride O); accumulators in registers.
template <int NR, int NT>
static inline void tile(const uint16_t* w, const float* x, float* y, int64_t I, int64_t O) {
  const int64_t I16 = I / 16 * 16;
  __m512 acc[NR][NT];
  for (int j = 0; j < NR; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < I16; i += 16) {
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * I + i);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = widen16(w + j * I + i);
      for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_fmadd_ps(wv, xv[t], acc[j][t]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int t = 0; t < NT; ++t) {
      float s = _mm512_reduce_add_ps(acc[j][t]);
      for (int64_t i = I16; i < I; ++i) s += widen1(w[j * I + i]) * x[t * I + i];
      y[t * O + j] = s;
    }
}

template <int NR>
static inline void tile_rows(int64_t nt, const uint16_t* w, const float* x, float* y, int64_t I, int64_t O) {
  switch (nt) {
    case 4: tile<NR, 4>(w, x, y, I, O); break;
    case 3: tile<NR, 3>(w, x, y, I, O); break;
    case 2: tile<NR, 2>(w, x, y, I, O); break;
    default: tile<NR, 1>(w, x, y, I, O); break;
  }
}

// y[s:t] = x[s:t] @ w[e].T for each expert e's rows s = offsets[e], t = offsets[e + 1]: each weight row is
// read from memory once for all of its expert's rows (tiles of 4 weight rows x 4 rows of x, in registers).
torch::Tensor grouped_gemm(const torch::Tensor& w, const torch::Tensor& x_in, const torch::Tensor& offsets) {
  const torch::Tensor x = x_in.contiguous();
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(), "w: contiguous bf16 [E, O, I]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.size(1) == w.size(2), "x: fp32 [M, I]");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == torch::kLong && offsets.size(0) == w.size(0) + 1,
              "offsets: long [E + 1]");
  const int64_t E = w.size(0), O = w.size(1), I = w.size(2), M = x.size(0);
  const torch::Tensor off = offsets.contiguous();
  const int64_t* op = off.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[E] == M, "offsets: from 0 to the rows of x");
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(op[e] <= op[e + 1], "offsets: not ascending at expert ", e);
  auto y = torch::empty({M, O}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<int64_t> active;  // experts with rows: the threads split their work evenly, whichever they are
  for (int64_t e = 0; e < E; ++e)
    if (op[e] < op[e + 1]) active.push_back(e);
  const int64_t blocks = (O + 3) / 4;
  at::parallel_for(0, int64_t(active.size()) * blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t e = active[job / blocks], o0 = job % blocks * 4, n = std::min<int64_t>(4, O - o0);
      const uint16_t* we = wp + (e * O + o0) * I;
      for (int64_t t0 = op[e]; t0 < op[e + 1]; t0 += 4) {
        const int64_t m = std::min<int64_t>(4, op[e + 1] - t0);
        const float* xt = xp + t0 * I;
        float* yt = yp + t0 * O + o0;
        switch (n) {
          case 4: tile_rows<4>(m, we, xt, yt, I, O); break;
          case 3: tile_rows<3>(m, we, xt, yt, I, O); break;
          case 2: tile_rows<2>(m, we, xt, yt, I, O); break;
          default: tile_rows<1>(m, we, xt, yt, I, O); break;
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY(moe_serve, m) { m.def("bf16_grouped_gemm(Tensor w, Tensor x, Tensor offsets) -> Tensor"); }
TORCH_LIBRARY_IMPL(moe_serve, CPU, m) { m.impl("bf16_grouped_gemm", &grouped_gemm); }
"""

_state: dict[str, object] = {}  # "built": True once the operator is registered, or "error": why it is not


def available() -> bool:
    """Whether the kernel runs here: an AVX-512 CPU and a build that succeeded (built now if need be)."""
    if "built" in _state or "error" in _state:
        return "built" in _state
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        _state["error"] = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, not AVX512"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            # a library of its own (no Python module): the op is registered with the dispatcher, so the
            # compiled graph calls the C++ function without a Python frame in between
            load_inline("moe_serve_bf16_gemv", cpp_sources=_SOURCE, is_python_module=False,
                        extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"], extra_ldflags=["-fopenmp"])
            torch.library.register_fake("moe_serve::bf16_grouped_gemm")(_fake)
            _state["built"] = True
        except Exception as exc:  # noqa: BLE001 - no compiler, no ninja: the compiled step keeps inductor's loop
            _state["error"] = f"{type(exc).__name__}: {exc}"
    if "error" in _state:
        log.info("bf16 GEMV kernel unavailable, compiled decode widens in inductor's loop: %s",
                 str(_state["error"]).splitlines()[0])
    return "built" in _state


def grouped_gemm(w: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert: y[s:t] = x[s:t] @ w[e].T for s, t = offsets[e], offsets[e + 1]; w bf16
    [E, O, I], x fp32 [M, I], offsets long [E + 1] -> fp32 [M, O]. Each weight row is read once for
    all of its expert's rows (needs `available()`)."""
    return torch.ops.moe_serve.bf16_grouped_gemm(w, x, offsets)


def _fake(w: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # shapes for tracing
    return x.new_empty((x.shape[0], w.shape[1]))
