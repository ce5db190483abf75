// Shared pieces of the Nemotron 3 CPU decode kernels: the few-row GEMM (`rows_any`) over a load/multiply
// policy (fp32, bf16 weights widened to fp32, bf16 x bf16 through vdpbf16ps) and argument checks.
// Included by decode_kernels.cpp (the per-op kernels) and decode_blocks.cpp (whole decode blocks).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "team.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef NEMOTRON3_PREFETCH_HINT
#define NEMOTRON3_PREFETCH_HINT _MM_HINT_T0
#endif

namespace nemotron3 {


constexpr int kRowGroup = 8;  // input rows that share one pass over a weight row pair
// Software prefetch distance: 16 KB ahead of the rows being read (measured on a 2-core Xeon VM: 2 KB
// ahead left batch-1 decode ~15 % slower, 32 KB ahead was no better than 16 KB).
constexpr int64_t kPrefetchBytes = 16384;

using bf16 = c10::BFloat16;

// A value as a tensor of T holds it: rounded to bf16 for bf16 (as PyTorch's bf16 ops round their results).
inline float round_like(float v, const float*) { return v; }
inline float round_like(float v, const bf16*) { return static_cast<float>(bf16(v)); }
template <bool ROUND>
inline float round_if(float v) { return ROUND ? static_cast<float>(bf16(v)) : v; }

#if defined(__AVX512F__)
// How one kernel reads and multiplies its inputs. `Widen<WT>`: fp32 activations, fp32 or bf16 weights
// widened to fp32 (exact: bf16 bits are the top half of an fp32), 16 per FMA. `DotBf16`: bf16 activations
// and weights through `vdpbf16ps` (pairs multiplied exactly, summed in fp32), 32 per instruction; widening
// bf16 weights in the inner loop made the bf16 path compute-bound at ~16 GB/s.
template <typename WT>
struct Widen {
  using X = float;
  using W = WT;
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kStep = 16;
  static V load_x(const float* p) { return _mm512_loadu_ps(p); }
  static V load_x(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V load_w(const float* p) { return _mm512_loadu_ps(p); }
  static V load_w(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V load_w(const bf16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_w(Mask m, const bf16* p) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static __m512 madd(__m512 acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
  static V widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
};

#if defined(__AVX512BF16__)
#define NEMOTRON3_DPBF16 1
struct DotBf16 {
  using X = bf16;
  using W = bf16;
  using V = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t kStep = 32;
  static V load_x(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V load_x(Mask m, const bf16* p) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
  static V load_w(const bf16* p) { return load_x(p); }
  static V load_w(Mask m, const bf16* p) { return load_x(m, p); }
  static __m512 madd(__m512 acc, V w, V x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#else
#define NEMOTRON3_DPBF16 0
#endif

// y[m * ldy + o] = epilogue(sum_i x[m * ldx + i] * W[o * I + i] + bias[o]) for o in [o0, o1), m < M,
// accumulated in fp32 (the epilogue rounds to bf16 after bf16 weights, as PyTorch's bf16 GEMM output is).
// Two weight rows per pass, M accumulators each (2M <= 16 zmm registers); the weights 16 KB ahead are
// prefetched.
template <int M, bool RELU2, bool ROUND, typename P, typename YT>
void rows_kernel(const typename P::X* x, int64_t ldx, const typename P::W* W, int64_t I, int64_t o0, int64_t o1,
                 YT* y, int64_t ldy, const float* bias) {
  constexpr int64_t S = P::kStep;
  const int64_t full = I / S * S, rem = I - full;
  const typename P::Mask tail = static_cast<typename P::Mask>(rem ? (1ull << rem) - 1ull : 0ull);
  const int64_t ahead = std::max<int64_t>(2 * I, kPrefetchBytes / static_cast<int64_t>(sizeof(*W)));
  auto finish = [&](float v, int64_t o) {
    v = round_if<ROUND>(v + (bias ? bias[o] : 0.f));
    if (RELU2) v = v > 0.f ? round_if<ROUND>(v * v) : 0.f;
    return v;
  };
  int64_t o = o0;
  for (; o + 1 < o1; o += 2) {
    __m512 a0[M], a1[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    const auto* w0 = W + o * I;
    const auto* w1 = w0 + I;
    for (int64_t i = 0; i < full; i += S) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + ahead + i), NEMOTRON3_PREFETCH_HINT);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + ahead + i), NEMOTRON3_PREFETCH_HINT);
      const auto v0 = P::load_w(w0 + i), v1 = P::load_w(w1 + i);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const auto xv = P::load_x(x + m * ldx + i);
        a0[m] = P::madd(a0[m], v0, xv);
        a1[m] = P::madd(a1[m], v1, xv);
      }
    }
    if (rem) {
      const auto v0 = P::load_w(tail, w0 + full), v1 = P::load_w(tail, w1 + full);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const auto xv = P::load_x(tail, x + m * ldx + full);
        a0[m] = P::madd(a0[m], v0, xv);
        a1[m] = P::madd(a1[m], v1, xv);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      y[m * ldy + o] = static_cast<YT>(finish(_mm512_reduce_add_ps(a0[m]), o));
      y[m * ldy + o + 1] = static_cast<YT>(finish(_mm512_reduce_add_ps(a1[m]), o + 1));
    }
  }
  if (o < o1) {  // odd row count: the last row alone
    __m512 a0[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) a0[m] = _mm512_setzero_ps();
    const auto* w0 = W + o * I;
    for (int64_t i = 0; i < full; i += S) {
      const auto v0 = P::load_w(w0 + i);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) a0[m] = P::madd(a0[m], v0, P::load_x(x + m * ldx + i));
    }
    if (rem) {
      const auto v0 = P::load_w(tail, w0 + full);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) a0[m] = P::madd(a0[m], v0, P::load_x(tail, x + m * ldx + full));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) y[m * ldy + o] = static_cast<YT>(finish(_mm512_reduce_add_ps(a0[m]), o));
  }
}
#else
#define NEMOTRON3_DPBF16 0
// Portable version (no AVX-512 at build time): correct but slow, so the Python side does not enable the
// kernels then (`has_avx512`).
template <typename WT>
struct Widen {
  using X = float;
  using W = WT;
};

template <int M, bool RELU2, bool ROUND, typename P, typename YT>
void rows_kernel(const typename P::X* x, int64_t ldx, const typename P::W* W, int64_t I, int64_t o0, int64_t o1,
                 YT* y, int64_t ldy, const float* bias) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t i = 0; i < I; ++i) acc += static_cast<float>(x[m * ldx + i]) * static_cast<float>(W[o * I + i]);
      acc = round_if<ROUND>(acc + (bias ? bias[o] : 0.f));
      if (RELU2) acc = acc > 0.f ? round_if<ROUND>(acc * acc) : 0.f;
      y[m * ldy + o] = static_cast<YT>(acc);
    }
  }
}
#endif

template <bool RELU2, bool ROUND, typename P, typename YT>
auto rows_for(int m) {
  switch (m) {
    case 1: return rows_kernel<1, RELU2, ROUND, P, YT>;
    case 2: return rows_kernel<2, RELU2, ROUND, P, YT>;
    case 3: return rows_kernel<3, RELU2, ROUND, P, YT>;
    case 4: return rows_kernel<4, RELU2, ROUND, P, YT>;
    case 5: return rows_kernel<5, RELU2, ROUND, P, YT>;
    case 6: return rows_kernel<6, RELU2, ROUND, P, YT>;
    case 7: return rows_kernel<7, RELU2, ROUND, P, YT>;
    default: return rows_kernel<8, RELU2, ROUND, P, YT>;
  }
}

// The kernel policy for activations XT and weights WT: dpbf16 for bf16 x bf16 where the CPU has it.
template <typename XT, typename WT>
struct policy_for {
  using type = Widen<WT>;
};
#if NEMOTRON3_DPBF16
template <>
struct policy_for<bf16, bf16> {
  using type = DotBf16;
};
#endif

// Rows [o0, o1) of y = x W^T (+ b) for any M. Weight row pairs outermost so each pair serves every group
// of 8 input rows while it is in L1 (blocks of 16 rows keep the prefetch running ahead).
template <bool RELU2, typename XT, typename WT, typename YT, bool ROUND = std::is_same<WT, bf16>::value>
void rows_any(const XT* x, int64_t ldx, int64_t M, const WT* W, int64_t I, int64_t o0, int64_t o1, YT* y,
              int64_t ldy, const float* bias) {
  using P = typename policy_for<XT, WT>::type;
  constexpr int64_t kBlock = 16;
  for (int64_t b0 = o0; b0 < o1; b0 += kBlock) {
    const int64_t b1 = std::min(o1, b0 + kBlock);
    for (int64_t m0 = 0; m0 < M; m0 += kRowGroup) {
      const int mm = static_cast<int>(std::min<int64_t>(kRowGroup, M - m0));
      rows_for<RELU2, ROUND, P, YT>(mm)(x + m0 * ldx, ldx, W, I, b0, b1, y + m0 * ldy, ldy, bias);
    }
  }
}

// The activation type the GEMMs read for weights of type WT: bf16 where dpbf16 exists, fp32 otherwise.
template <typename WT>
using act_t = typename std::conditional<std::is_same<WT, bf16>::value && NEMOTRON3_DPBF16, bf16, float>::type;

// A small parameter vector read as fp32: the tensor's own memory when it is contiguous fp32, else a copy
// converted here (no ATen call on the decode path).
class Floats {
 public:
  Floats() = default;
  explicit Floats(const at::Tensor& t) { init(t); }
  explicit Floats(const c10::optional<at::Tensor>& t) {
    if (t.has_value()) init(*t);
  }
  const float* get() const { return p_; }

 private:
  void init(const at::Tensor& t) {
    if (!t.defined()) return;
    if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
      p_ = t.data_ptr<float>();
      return;
    }
    const at::Tensor c = t.scalar_type() == at::kBFloat16 ? t.contiguous() : t.to(at::kFloat).contiguous();
    copy_.resize(c.numel());
    if (c.scalar_type() == at::kBFloat16) {
      const bf16* s = c.data_ptr<bf16>();
      for (size_t i = 0; i < copy_.size(); ++i) copy_[i] = static_cast<float>(s[i]);
    } else {
      const float* s = c.data_ptr<float>();
      std::copy(s, s + copy_.size(), copy_.begin());
    }
    p_ = copy_.data();
  }
  const float* p_ = nullptr;
  std::vector<float> copy_;
};

inline void check_weight(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "nemotron3_cpu: ", name, " must be a float32 or bfloat16 CPU tensor, got ", t.scalar_type(), " on ",
              t.device());
}

inline void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "nemotron3_cpu: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

constexpr int64_t kGrain = 16;  // fewer output rows than this run on one thread

// The first row of part t when [0, n) is cut into `threads` equal parts on chunk boundaries.
inline int64_t part_begin(int64_t n, int64_t chunk, int64_t threads, int64_t t) {
  return t >= threads ? n : std::min(n, (n * t / threads + chunk - 1) / chunk * chunk);
}

// The threads a product of n rows in chunks of `chunk` runs on: the decode step's team when the calling
// thread has it open (team.h), else ATen's (OpenMP) threads; one thread for fewer than two chunks; at most
// Team::kMaxThreads (parallel_rows keeps a counter per thread).
inline int64_t row_threads(int64_t n, int64_t chunk) {
  const Team* team = Team::current();
  const int64_t avail = team != nullptr ? team->size() : at::get_num_threads();
  return n < 2 * chunk ? 1 : std::min<int64_t>({avail, n / chunk, Team::kMaxThreads});
}

// fn(o0, o1) over [0, n) in chunks of `chunk`, on all threads: thread t starts on the t-th of equal parts
// (`part_begin`) and, when that runs dry, takes chunks from the parts after it, so that whichever thread the
// memory system serves faster does more of a memory-bound product instead of waiting for the other at the
// end. Each chunk is taken by exactly one thread.
template <typename F>
void parallel_rows(int64_t n, int64_t chunk, const F& fn) {
  const int64_t threads = row_threads(n, chunk);
  if (threads <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  std::atomic<int64_t> next[Team::kMaxThreads];
  for (int64_t t = 0; t < threads; ++t) next[t].store(part_begin(n, chunk, threads, t), std::memory_order_relaxed);
  auto work = [&](int64_t t) {
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t part = (t + k) % threads, end = part_begin(n, chunk, threads, part + 1);
      for (int64_t o0; (o0 = next[part].fetch_add(chunk, std::memory_order_relaxed)) < end;)
        fn(o0, std::min(o0 + chunk, end));
    }
  };
  if (Team* team = Team::current()) {
    team->run([&](int t) {
      if (t < threads) work(t);
    });
  } else {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) work(t);
    });
  }
}

// Within a decode step: the next product reads `rows` rows of `row_bytes` from `base` (split as
// parallel_rows with `chunk` splits them); the team's helpers start reading their parts now.
inline void hint_rows(const void* base, int64_t rows, int64_t row_bytes, int64_t chunk = kGrain) {
  Team* team = Team::current();
  if (team == nullptr || base == nullptr) return;
  const int64_t threads = row_threads(rows, chunk);
  const char* b = static_cast<const char*>(base);
  team->hint([&](int t) { return b + part_begin(rows, chunk, threads, t) * row_bytes; }, b + rows * row_bytes);
}

// hint_rows for a [rows, features] weight matrix.
inline void hint_weight(const at::Tensor& w) {
  if (Team::current() != nullptr && w.defined() && w.dim() == 2 && w.is_contiguous())
    hint_rows(w.data_ptr(), w.size(0), w.size(1) * w.element_size());
}

}  // namespace nemotron3
