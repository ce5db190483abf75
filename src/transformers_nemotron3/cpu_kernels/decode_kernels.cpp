// CPU kernels for few-token (decode) steps of Nemotron 3, registered as torch.ops.nemotron3_cpu.*
//
// Why: at batch 1-16 every weight matrix is read once per step, so a step costs the time to stream the
// weights. MKL's sgemm reaches that speed only for one row; from 4 rows on it packs the weight first and
// runs at a third of the bandwidth. `small_linear` streams each weight row once for up to 8 input rows at
// a time, with a software prefetch 16 KB ahead. `moe_relu2` runs the routed experts of a few tokens
// (grouped by expert, the weighted sum added into the output), `mamba_step` a whole Mamba-2 decode step
// after the input projection (conv window, SSM update and readout, gated group RMSNorm) and `rms_norm` a
// norm, each in one parallel region instead of several small ATen ops. fp32, and bf16 for the GEMMs and the
// Mamba step (fp32 sums, bf16 roundings where PyTorch's bf16 ops round); results equal the PyTorch paths up
// to summation order, which modeling_tests/test_cpu_kernels.py checks kernel by kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRowGroup = 8;  // input rows that share one pass over a weight row pair
// Software prefetch distance: 16 KB ahead of the rows being read (measured on a 2-core Xeon VM: 2 KB
// ahead left batch-1 decode ~15 % slower, 32 KB ahead was no better than 16 KB).
constexpr int64_t kPrefetchBytes = 16384;

using bf16 = c10::BFloat16;

// What a product of bf16 weights hands on: the value rounded to bf16, as PyTorch's bf16 GEMM output is.
inline float round_like(float v, const float*) { return v; }
inline float round_like(float v, const bf16*) { return static_cast<float>(bf16(v)); }

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
template <int M, bool RELU2, typename P>
void rows_kernel(const typename P::X* x, int64_t ldx, const typename P::W* W, int64_t I, int64_t o0, int64_t o1,
                 float* y, int64_t ldy, const float* bias) {
  constexpr int64_t S = P::kStep;
  const int64_t full = I / S * S, rem = I - full;
  const typename P::Mask tail = static_cast<typename P::Mask>(rem ? (1ull << rem) - 1ull : 0ull);
  const int64_t ahead = std::max<int64_t>(2 * I, kPrefetchBytes / static_cast<int64_t>(sizeof(*W)));
  auto finish = [&](float v, int64_t o) {
    v = round_like(v + (bias ? bias[o] : 0.f), W);
    if (RELU2) v = v > 0.f ? round_like(v * v, W) : 0.f;
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
      _mm_prefetch(reinterpret_cast<const char*>(w0 + ahead + i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + ahead + i), _MM_HINT_T0);
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
      y[m * ldy + o] = finish(_mm512_reduce_add_ps(a0[m]), o);
      y[m * ldy + o + 1] = finish(_mm512_reduce_add_ps(a1[m]), o + 1);
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
    for (int m = 0; m < M; ++m) y[m * ldy + o] = finish(_mm512_reduce_add_ps(a0[m]), o);
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

template <int M, bool RELU2, typename P>
void rows_kernel(const typename P::X* x, int64_t ldx, const typename P::W* W, int64_t I, int64_t o0, int64_t o1,
                 float* y, int64_t ldy, const float* bias) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t i = 0; i < I; ++i) acc += static_cast<float>(x[m * ldx + i]) * static_cast<float>(W[o * I + i]);
      acc = round_like(acc + (bias ? bias[o] : 0.f), W);
      if (RELU2) acc = acc > 0.f ? round_like(acc * acc, W) : 0.f;
      y[m * ldy + o] = acc;
    }
  }
}
#endif

template <bool RELU2, typename P>
auto rows_for(int m) {
  switch (m) {
    case 1: return rows_kernel<1, RELU2, P>;
    case 2: return rows_kernel<2, RELU2, P>;
    case 3: return rows_kernel<3, RELU2, P>;
    case 4: return rows_kernel<4, RELU2, P>;
    case 5: return rows_kernel<5, RELU2, P>;
    case 6: return rows_kernel<6, RELU2, P>;
    case 7: return rows_kernel<7, RELU2, P>;
    default: return rows_kernel<8, RELU2, P>;
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
template <bool RELU2, typename XT, typename WT>
void rows_any(const XT* x, int64_t ldx, int64_t M, const WT* W, int64_t I, int64_t o0, int64_t o1, float* y,
              int64_t ldy, const float* bias) {
  using P = typename policy_for<XT, WT>::type;
  constexpr int64_t kBlock = 16;
  for (int64_t b0 = o0; b0 < o1; b0 += kBlock) {
    const int64_t b1 = std::min(o1, b0 + kBlock);
    for (int64_t m0 = 0; m0 < M; m0 += kRowGroup) {
      const int mm = static_cast<int>(std::min<int64_t>(kRowGroup, M - m0));
      rows_for<RELU2, P>(mm)(x + m0 * ldx, ldx, W, I, b0, b1, y + m0 * ldy, ldy, bias);
    }
  }
}

// The activation type the GEMMs read for weights of type WT: bf16 where dpbf16 exists, fp32 otherwise.
template <typename WT>
using act_t = typename std::conditional<std::is_same<WT, bf16>::value && NEMOTRON3_DPBF16, bf16, float>::type;

void check_weight(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "nemotron3_cpu: ", name, " must be a float32 or bfloat16 CPU tensor, got ", t.scalar_type(), " on ",
              t.device());
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "nemotron3_cpu: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

constexpr int64_t kGrain = 16;  // fewer output rows than this run on one thread

}  // namespace

// y = x W^T + b over the last dim of x; x [..., I], W [O, I] contiguous, b [O] or None. float32, or bfloat16
// (x, W and b bf16, products accumulated in fp32, y rounded to bf16 as PyTorch's bf16 GEMM does).
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_weight(weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "nemotron3_cpu.small_linear: x is ", x.scalar_type(),
              ", weight ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "nemotron3_cpu.small_linear: weight must be 2-D contiguous");
  const int64_t I = weight.size(1), O = weight.size(0);
  TORCH_CHECK(x.size(-1) == I, "nemotron3_cpu.small_linear: x has ", x.size(-1), " features, weight expects ", I);
  const bool bf = weight.scalar_type() == at::kBFloat16;
  const at::Tensor x2 = x.reshape({-1, I}).to(bf && NEMOTRON3_DPBF16 ? at::kBFloat16 : at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  at::Tensor y = at::empty({M, O}, x2.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (bf) {
    using XT = act_t<bf16>;
    const XT* xp = x2.data_ptr<XT>();
    const bf16* wp = weight.data_ptr<bf16>();
    at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) { rows_any<false>(xp, I, M, wp, I, o0, o1, yp, O, bp); });
    return y.to(at::kBFloat16).view(sizes);
  }
  const float* xp = x2.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) { rows_any<false>(xp, I, M, wp, I, o0, o1, yp, O, bp); });
  return y.view(sizes);
}

template <typename WT>
void moe_relu2_impl(const at::Tensor& x, const at::Tensor& up, const at::Tensor& down, const at::Tensor& topk_idx,
                    const at::Tensor& weights, at::Tensor& acc);

// acc[t] += sum_j weights[t, j] * down[e] relu2(up[e] x[t]) with e = topk_idx[t, j] (non-gated relu^2 experts).
// x [T, H], up [E, F, H], down [E, H, F] (float32, or bfloat16 with x bf16: the hidden activation is rounded
// to bf16 as in PyTorch), topk_idx [T, k] int64, weights [T, k] fp32, acc [T, H] fp32.
at::Tensor moe_relu2(const at::Tensor& x, const at::Tensor& up, const at::Tensor& down, const at::Tensor& topk_idx,
                     const at::Tensor& weights, at::Tensor acc) {
  check_weight(up, "up");
  TORCH_CHECK(down.scalar_type() == up.scalar_type() && x.scalar_type() == up.scalar_type(),
              "nemotron3_cpu.moe_relu2: x, up and down must share a dtype");
  for (const at::Tensor* p : std::initializer_list<const at::Tensor*>{&weights, &acc}) check_f32(*p, "weights/acc");
  if (up.scalar_type() == at::kBFloat16)
    moe_relu2_impl<bf16>(x, up, down, topk_idx, weights, acc);
  else
    moe_relu2_impl<float>(x, up, down, topk_idx, weights, acc);
  return acc;
}

template <typename WT>
void moe_relu2_impl(const at::Tensor& x, const at::Tensor& up, const at::Tensor& down, const at::Tensor& topk_idx,
                    const at::Tensor& weights, at::Tensor& acc) {
  TORCH_CHECK(up.is_contiguous() && down.is_contiguous() && acc.is_contiguous(),
              "nemotron3_cpu.moe_relu2: expert weights and acc must be contiguous");
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong, "nemotron3_cpu.moe_relu2: topk_idx must be int64");
  const int64_t T = x.size(0), H = x.size(1), E = up.size(0), F = up.size(1), k = topk_idx.size(1);
  TORCH_CHECK(up.size(2) == H && down.size(0) == E && down.size(1) == H && down.size(2) == F &&
                  acc.size(0) == T && acc.size(1) == H && weights.size(0) == T && weights.size(1) == k,
              "nemotron3_cpu.moe_relu2: shapes do not match");
  using XT = act_t<WT>;
  const at::ScalarType xt = std::is_same<XT, bf16>::value ? at::kBFloat16 : at::kFloat;
  const at::Tensor xc = x.to(xt).contiguous();
  const at::Tensor idx = topk_idx.contiguous();
  const at::Tensor wts = weights.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wtp = wts.data_ptr<float>();
  const int64_t R = T * k;

  // routes sorted by expert: route r -> (token, weight); start/count per used expert
  std::vector<int64_t> count(E, 0);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < E, "nemotron3_cpu.moe_relu2: expert index ", ip[r], " out of range");
    ++count[ip[r]];
  }
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), token(R);
  std::vector<float> scale(R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t pos = fill[ip[r]]++;
    token[pos] = r / k;
    scale[pos] = wtp[r];
  }
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) used.push_back(e);
  const int64_t U = static_cast<int64_t>(used.size());

  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor xg = at::empty({R, H}, xc.options());  // token rows in expert order
  at::Tensor hg = at::empty({R, F}, f32);           // relu2(up x) per route
  at::Tensor hx = std::is_same<XT, float>::value ? hg : at::empty({R, F}, xc.options());  // as the down GEMM reads it
  at::Tensor og = at::empty({R, H}, f32);           // down h per route (before weighting)
  const XT* xp = xc.data_ptr<XT>();
  XT* xgp = xg.data_ptr<XT>();
  float* hgp = hg.data_ptr<float>();
  XT* hxp = hx.data_ptr<XT>();
  float* ogp = og.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) std::copy(xp + token[r] * H, xp + (token[r] + 1) * H, xgp + r * H);
  const WT* upp = up.data_ptr<WT>();
  const WT* dnp = down.data_ptr<WT>();
  float* accp = acc.data_ptr<float>();

  // up + relu2: rows of all used experts laid end to end, split across threads
  at::parallel_for(0, U * F, kGrain, [&](int64_t a, int64_t b) {
    for (int64_t u = a / F; u < U && u * F < b; ++u) {
      const int64_t e = used[u];
      const int64_t f0 = std::max(a, u * F) - u * F, f1 = std::min(b, (u + 1) * F) - u * F;
      rows_any<true>(xgp + start[e] * H, H, count[e], upp + e * F * H, H, f0, f1, hgp + start[e] * F, F, nullptr);
      if constexpr (!std::is_same<XT, float>::value) {  // hand the (bf16-exact) activations on as bf16
        for (int64_t r = start[e]; r < start[e] + count[e]; ++r)
          for (int64_t f = f0; f < f1; ++f) hxp[r * F + f] = static_cast<XT>(hgp[r * F + f]);
      }
    }
  });
  // down, then the weighted sum into acc: threads own output columns, so every thread visits every expert
  at::parallel_for(0, H, kGrain, [&](int64_t o0, int64_t o1) {
    for (int64_t u = 0; u < U; ++u) {
      const int64_t e = used[u];
      rows_any<false>(hxp + start[e] * F, F, count[e], dnp + e * H * F, F, o0, o1, ogp + start[e] * H, H, nullptr);
    }
    for (int64_t r = 0; r < R; ++r) {
      float* dst = accp + token[r] * H;
      const float* src = ogp + r * H;
      const float s = scale[r];
      for (int64_t o = o0; o < o1; ++o) dst[o] += s * src[o];
    }
  });
}

// One Mamba-2 decode step after in_proj. zxbcdt [b, d_inner + conv_dim + h] (z | x B C | dt);
// conv_state [b, conv_dim, K] and ssm [b, h, p, n] (fp32) are updated in place; returns the gated,
// group-normed y [b, d_inner] (input of out_proj). A = -exp(A_log) [h]; dt = clamp(softplus(dt + dt_bias), lo, hi).
// zxbcdt, conv_state and the result share a dtype, float32 or bfloat16; with bfloat16 the conv output, its
// bias add and SiLU are rounded to bf16 as the PyTorch step does; everything after runs in fp32 there too.
template <typename T>
at::Tensor mamba_step_impl(const at::Tensor& zxbcdt, at::Tensor& conv_state, const at::Tensor& conv_w,
                           const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                           const at::Tensor& D, at::Tensor& ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                           double dt_lo, double dt_hi) {
  const int64_t B = ssm.size(0), Hh = ssm.size(1), P = ssm.size(2), N = ssm.size(3);
  const int64_t d_inner = Hh * P, C = conv_state.size(1), K = conv_state.size(2), G = n_groups;
  TORCH_CHECK(C == d_inner + 2 * G * N && zxbcdt.size(-1) == d_inner + C + Hh && Hh % G == 0,
              "nemotron3_cpu.mamba_step: shapes do not match (conv_dim ", C, ", heads ", Hh, ", groups ", G, ")");
  const at::Tensor in = zxbcdt.reshape({B, -1}).contiguous();
  const at::Tensor w = conv_w.reshape({C, K}).to(at::kFloat).contiguous();
  at::Tensor cb;
  const float* cbp = nullptr;
  if (conv_b.has_value() && conv_b->defined()) {
    cb = conv_b->to(at::kFloat).contiguous();
    cbp = cb.data_ptr<float>();
  }
  const at::Tensor dtb = dt_bias.to(at::kFloat).contiguous(), Ac = A.to(at::kFloat).contiguous();
  const at::Tensor Dc = D.to(at::kFloat).contiguous(), nw = norm_w.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, d_inner}, zxbcdt.options());
  const int64_t row = in.size(1), heads_per_group = Hh / G, group_width = heads_per_group * P;
  const T* inp = in.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  const float* dtbp = dtb.data_ptr<float>();
  const float* Ap = Ac.data_ptr<float>();
  const float* Dp = Dc.data_ptr<float>();
  const float* nwp = nw.data_ptr<float>();
  T* csp = conv_state.data_ptr<T>();
  float* sp = ssm.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const float lo = static_cast<float>(dt_lo), hi = static_cast<float>(dt_hi);
  const T* tag = nullptr;  // selects round_like's rounding for T

  at::parallel_for(0, B * G, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> xs(group_width), Bs(N), Cs(N), ys(group_width);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / G, g = u % G;
      const T* zrow = inp + b * row;
      const T* xbc = zrow + d_inner;
      const T* dtrow = xbc + C;
      // conv window shift + depthwise conv + SiLU for this group's x, B and C channels
      auto conv = [&](int64_t c) {
        T* st = csp + (b * C + c) * K;
        for (int64_t j = 0; j + 1 < K; ++j) st[j] = st[j + 1];
        st[K - 1] = xbc[c];
        float v = 0.f;
        for (int64_t j = 0; j < K; ++j) v += static_cast<float>(st[j]) * wp[c * K + j];
        v = round_like(v, tag);
        if (cbp) v = round_like(v + cbp[c], tag);
        return round_like(v / (1.f + std::exp(-v)), tag);
      };
      for (int64_t j = 0; j < group_width; ++j) xs[j] = conv(g * group_width + j);
      for (int64_t j = 0; j < N; ++j) Bs[j] = conv(d_inner + g * N + j);
      for (int64_t j = 0; j < N; ++j) Cs[j] = conv(d_inner + G * N + g * N + j);
      float sumsq = 0.f;
      for (int64_t hh = 0; hh < heads_per_group; ++hh) {
        const int64_t h = g * heads_per_group + hh;
        float dt = static_cast<float>(dtrow[h]) + dtbp[h];
        dt = dt > 20.f ? dt : std::log1p(std::exp(dt));  // softplus (beta 1, threshold 20)
        dt = std::min(std::max(dt, lo), hi);
        const float dA = std::exp(dt * Ap[h]);
        for (int64_t p = 0; p < P; ++p) {
          const float xv = xs[hh * P + p];
          const float dx = dt * xv;
          float* s = sp + ((b * Hh + h) * P + p) * N;
          float y = 0.f;
#pragma omp simd reduction(+ : y)
          for (int64_t n = 0; n < N; ++n) {
            const float v = s[n] * dA + dx * Bs[n];
            s[n] = v;
            y += v * Cs[n];
          }
          y += Dp[h] * xv;
          const float z = static_cast<float>(zrow[h * P + p]);
          y *= z / (1.f + std::exp(-z));  // gate: y * silu(z)
          ys[hh * P + p] = y;
          sumsq += y * y;
        }
      }
      const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(group_width) + static_cast<float>(eps));
      const float* wrow = nwp + g * group_width;
      T* orow = op + b * d_inner + g * group_width;
      for (int64_t j = 0; j < group_width; ++j) orow[j] = static_cast<T>(ys[j] * inv * wrow[j]);
    }
  });
  return out;
}

at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                      const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                      const at::Tensor& D, at::Tensor ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                      double dt_lo, double dt_hi) {
  check_weight(zxbcdt, "zxbcdt");
  check_f32(ssm, "ssm");
  TORCH_CHECK(conv_state.scalar_type() == zxbcdt.scalar_type(), "nemotron3_cpu.mamba_step: conv_state is ",
              conv_state.scalar_type(), ", zxbcdt ", zxbcdt.scalar_type());
  TORCH_CHECK(conv_state.is_contiguous() && ssm.is_contiguous(), "nemotron3_cpu.mamba_step: states must be contiguous");
  if (zxbcdt.scalar_type() == at::kBFloat16)
    return mamba_step_impl<bf16>(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm, norm_w, n_groups, eps,
                                 dt_lo, dt_hi);
  return mamba_step_impl<float>(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm, norm_w, n_groups, eps, dt_lo,
                                dt_hi);
}

// RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight; x [..., D], weight [D].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "nemotron3_cpu.rms_norm: weight has ", weight.numel(), " elements, x has ", D,
              " features");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t rows = xc.numel() / std::max<int64_t>(D, 1);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      float* orow = op + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) orow[i] = xr[i] * inv * wp[i];
    }
  });
  return out;
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(nemotron3_cpu, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("moe_relu2(Tensor x, Tensor up, Tensor down, Tensor topk_idx, Tensor weights, Tensor(a!) acc) -> Tensor(a!)");
  m.def("mamba_step(Tensor zxbcdt, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, Tensor A, "
        "Tensor D, Tensor(b!) ssm, Tensor norm_w, int n_groups, float eps, float dt_lo, float dt_hi) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("has_avx512() -> bool", has_avx512);
}

TORCH_LIBRARY_IMPL(nemotron3_cpu, CPU, m) {
  m.impl("small_linear", small_linear);
  m.impl("moe_relu2", moe_relu2);
  m.impl("mamba_step", mamba_step);
  m.impl("rms_norm", rms_norm);
}
