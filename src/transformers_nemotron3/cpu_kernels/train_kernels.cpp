// CPU kernels for whole-sequence (training and prefill) steps, float32, forward and backward, registered as
// torch.ops.nemotron3_cpu.conv_silu{,_backward} (the Mamba-2 conv + SiLU), gated_rms_norm{,_backward} (the
// Mamba-2 gated group norm, and without a gate the blocks' RMSNorm) and relu2{,_backward} (squared ReLU).
//
// Why: between in_proj and out_proj a Mamba-2 layer runs, besides the scan, a depthwise causal conv + SiLU and
// a gated group RMSNorm. In PyTorch each is several elementwise passes over [b, l, channels] tensors (the conv
// one multiply-add per tap, forward and backward, plus the weight gradient's products and sums; the norm six
// ops forward and their backwards), each writing a fresh tensor. Here each is one pass forward and one
// backward, reading the inputs and writing the outputs once. The conv keeps no activation: its backward
// recomputes the pre-activation from the input (a view of in_proj's output, kept anyway). The norm keeps one
// inverse RMS per row and group.
//
// Results equal the PyTorch paths (`mamba2._DepthwiseCausalConv` + F.silu, `GatedRMSNorm`) up to summation
// order and exp rounding (modeling_tests/test_cpu_kernels.py checks values and gradients).

#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nemotron3 {
namespace {

constexpr int64_t kLanes = 16;      // floats per vector
constexpr int64_t kBlock = 64;      // channels per work item of the conv (4 vectors)
constexpr int64_t kMaxTaps = 16;    // conv kernel widths the kernels take

#if defined(__AVX512F__)
using Vec = __m512;
inline __mmask16 tail_mask(int64_t n) { return n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
inline Vec load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store(float* p, Vec v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline Vec splat(float v) { return _mm512_set1_ps(v); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec max0(Vec v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // NaN stays NaN, as torch.relu
// exp(x), Cephes' single-precision polynomial after x = n ln2 + r, |r| <= ln2/2 (within ~2 ulp of expf)
inline Vec vexp(Vec x) {
  x = _mm512_max_ps(_mm512_min_ps(x, splat(88.3762626647949f)), splat(-87.3365478515625f));
  const Vec n = _mm512_roundscale_ps(mul(x, splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm512_fnmadd_ps(n, splat(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, splat(-2.12194440e-4f), r);
  Vec p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, splat(1.f)));
  return _mm512_scalef_ps(p, n);
}
inline Vec sigmoid(Vec x) { return _mm512_div_ps(splat(1.f), add(splat(1.f), vexp(sub(zero(), x)))); }
inline Vec rsqrt_exact(Vec x) { return _mm512_div_ps(splat(1.f), _mm512_sqrt_ps(x)); }
#else  // portable fallback (the kernels are only switched on where AVX-512 is present; this keeps them building)
struct Vec {
  float v[kLanes];
};
using Mask = int64_t;
inline Mask tail_mask(int64_t n) { return std::min<int64_t>(n, kLanes); }
inline Vec load(const float* p, Mask m) {
  Vec r{};
  for (int64_t i = 0; i < m; ++i) r.v[i] = p[i];
  return r;
}
inline void store(float* p, Vec v, Mask m) {
  for (int64_t i = 0; i < m; ++i) p[i] = v.v[i];
}
inline Vec splat(float x) {
  Vec r;
  for (auto& e : r.v) e = x;
  return r;
}
inline Vec zero() { return splat(0.f); }
#define NEMOTRON3_ELEMENTWISE(name, expr)    \
  inline Vec name(Vec a, Vec b) {           \
    Vec r;                                  \
    for (int64_t i = 0; i < kLanes; ++i) {  \
      const float x = a.v[i], y = b.v[i];   \
      r.v[i] = (expr);                      \
    }                                       \
    return r;                               \
  }
NEMOTRON3_ELEMENTWISE(mul, x * y)
NEMOTRON3_ELEMENTWISE(add, x + y)
NEMOTRON3_ELEMENTWISE(sub, x - y)
#undef NEMOTRON3_ELEMENTWISE
inline Vec fma(Vec a, Vec b, Vec c) { return add(mul(a, b), c); }
inline Vec max0(Vec a) {
  for (auto& e : a.v) e = e < 0.f ? 0.f : e;
  return a;
}
inline float hsum(Vec a) {
  float s = 0.f;
  for (float e : a.v) s += e;
  return s;
}
inline Vec sigmoid(Vec a) {
  for (auto& e : a.v) e = 1.f / (1.f + std::exp(-e));
  return a;
}
inline Vec rsqrt_exact(Vec a) {
  for (auto& e : a.v) e = 1.f / std::sqrt(e);
  return a;
}
#endif

void check_rows(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "nemotron3_cpu: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dims && t.stride(-1) == 1, "nemotron3_cpu: ", name, " must have ", dims,
              " dims and unit stride in the last one");
}

// Per token t of row b: which taps j (input t - j) stay inside the sequence, as a bit set.
struct Taps {
  const int64_t* seq;  // [B, L] or nullptr
  int64_t L, K;
  uint32_t at(int64_t b, int64_t t) const {
    uint32_t bits = 0;
    for (int64_t j = 0; j < K && j <= t; ++j)
      if (seq == nullptr || seq[b * L + t] == seq[b * L + t - j]) bits |= 1u << j;
    return bits;
  }
};

struct ConvArgs {
  int64_t B, L, C, K, x_row, x_batch;
  const float* x;
  const float* wt;    // [K, C]: wt[j * C + c] multiplies the input j positions back (j = 0: this token)
  const float* bias;  // [C] or nullptr
  Taps taps;
};

ConvArgs conv_args(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& seq_idx) {
  check_rows(x, "x", 3);
  check_rows(wt, "weight", 2);
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), K = wt.size(0);
  TORCH_CHECK(wt.is_contiguous() && wt.size(1) == C && K >= 1 && K <= kMaxTaps,
              "nemotron3_cpu.conv_silu: weight must be [K, channels] contiguous with K <= ", kMaxTaps);
  TORCH_CHECK(x.stride(1) >= C, "nemotron3_cpu.conv_silu: rows of x overlap");
  if (bias.has_value()) {
    check_rows(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == C, "nemotron3_cpu.conv_silu: bias has ", bias->size(0), " channels, x ", C);
  }
  if (seq_idx.has_value())
    TORCH_CHECK(seq_idx->scalar_type() == at::kLong && seq_idx->is_contiguous() && seq_idx->size(0) == B &&
                    seq_idx->size(1) == L,
                "nemotron3_cpu.conv_silu: seq_idx must be contiguous int64 [batch, length]");
  return {B, L, C, K, x.stride(1), x.stride(0), x.data_ptr<float>(), wt.data_ptr<float>(),
          bias.has_value() ? bias->data_ptr<float>() : nullptr,
          Taps{seq_idx.has_value() ? seq_idx->data_ptr<int64_t>() : nullptr, L, K}};
}

// pre-activation of tokens t, channels [c, c + 16) (masked by m)
template <typename M>
inline Vec conv_at(const ConvArgs& a, int64_t b, int64_t t, int64_t c, uint32_t taps, M m) {
  Vec acc = a.bias ? load(a.bias + c, m) : zero();
  const float* xt = a.x + b * a.x_batch + t * a.x_row + c;
  for (int64_t j = 0; j < a.K; ++j)
    if (taps >> j & 1u) acc = fma(load(a.wt + j * a.C + c, m), load(xt - j * a.x_row, m), acc);
  return acc;
}

}  // namespace

// out = silu(depthwise causal conv(x) + bias): x [B, L, C] (rows may be strided, as a slice of in_proj's
// output), weight transposed to [K, C]; packed sequences (seq_idx [B, L]) never see each other. [B, L, C].
at::Tensor conv_silu(const at::Tensor& x, const at::Tensor& wt, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& seq_idx) {
  const ConvArgs a = conv_args(x, wt, bias, seq_idx);
  at::Tensor out = at::empty({a.B, a.L, a.C}, x.options());
  float* op = out.data_ptr<float>();
  const int64_t blocks = (a.C + kBlock - 1) / kBlock;
  at::parallel_for(0, a.B * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kBlock, c1 = std::min(a.C, c0 + kBlock);
      for (int64_t t = 0; t < a.L; ++t) {
        const uint32_t taps = a.taps.at(b, t);
        float* orow = op + (b * a.L + t) * a.C;
        for (int64_t c = c0; c < c1; c += kLanes) {
          const auto m = tail_mask(c1 - c);
          const Vec pre = conv_at(a, b, t, c, taps, m);
          store(orow + c, mul(pre, sigmoid(pre)), m);
        }
      }
    }
  });
  return out;
}

// Gradients of `conv_silu` from the output gradient g [B, L, C]: (gx [B, L, C], gweight [K, C], gbias [C]; an
// empty tensor without bias). The pre-activation is recomputed from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_silu_backward(const at::Tensor& g, const at::Tensor& x,
                                                                  const at::Tensor& wt,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  const c10::optional<at::Tensor>& seq_idx) {
  const ConvArgs a = conv_args(x, wt, bias, seq_idx);
  check_rows(g, "grad", 3);
  TORCH_CHECK(g.size(0) == a.B && g.size(1) == a.L && g.size(2) == a.C, "nemotron3_cpu.conv_silu_backward: grad "
              "shape ", g.sizes(), " does not match x");
  at::Tensor gx = at::empty({a.B, a.L, a.C}, x.options());
  // per batch row, summed at the end: one writer for every partial sum
  at::Tensor gw_parts = at::empty({a.B, a.K, a.C}, x.options());
  at::Tensor gb_parts = at::empty({a.B, a.C}, x.options());
  const float* gp = g.data_ptr<float>();
  const int64_t g_row = g.stride(1), g_batch = g.stride(0);
  float* gxp = gx.data_ptr<float>();
  float* gwp = gw_parts.data_ptr<float>();
  float* gbp = gb_parts.data_ptr<float>();
  const int64_t blocks = (a.C + kBlock - 1) / kBlock, K = a.K;
  constexpr int64_t V = kBlock / kLanes;
  at::parallel_for(0, a.B * blocks, 1, [&](int64_t i0, int64_t i1) {
    float ring[kMaxTaps * kBlock];  // gradient of the pre-activation at t .. t + K - 1 (row t % K)
    uint32_t ring_taps[kMaxTaps];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, c0 = (i % blocks) * kBlock, c1 = std::min(a.C, c0 + kBlock);
      Vec gw_acc[kMaxTaps][V];
      Vec gb_acc[V];
      for (int64_t v = 0; v < V; ++v) {
        gb_acc[v] = zero();
        for (int64_t j = 0; j < K; ++j) gw_acc[j][v] = zero();
      }
      for (int64_t t = a.L - 1; t >= 0; --t) {
        const uint32_t taps = a.taps.at(b, t);
        ring_taps[t % K] = taps;
        float* slot = ring + (t % K) * kBlock;
        const float* xt = a.x + b * a.x_batch + t * a.x_row;
        const float* gt = gp + b * g_batch + t * g_row;
        float* gxt = gxp + (b * a.L + t) * a.C;
        for (int64_t v = 0; v < V && c0 + v * kLanes < c1; ++v) {
          const int64_t c = c0 + v * kLanes;
          const auto m = tail_mask(c1 - c);
          const Vec pre = conv_at(a, b, t, c, taps, m);
          const Vec s = sigmoid(pre);
          // d silu / d pre = s (1 + pre (1 - s))
          const Vec d = mul(s, fma(pre, sub(splat(1.f), s), splat(1.f)));
          const Vec gpre = mul(load(gt + c, m), d);
          store(slot + v * kLanes, gpre, m);
          gb_acc[v] = add(gb_acc[v], gpre);
          for (int64_t j = 0; j < K; ++j)
            if (taps >> j & 1u) gw_acc[j][v] = fma(gpre, load(xt + c - j * a.x_row, m), gw_acc[j][v]);
          // gx[t] = sum_j w_j gpre[t + j], over the outputs t + j that read x[t]
          Vec acc = zero();
          for (int64_t j = 0; j < K && t + j < a.L; ++j)
            if (ring_taps[(t + j) % K] >> j & 1u)
              acc = fma(load(a.wt + j * a.C + c, m), load(ring + ((t + j) % K) * kBlock + v * kLanes, m), acc);
          store(gxt + c, acc, m);
        }
      }
      for (int64_t v = 0; v < V && c0 + v * kLanes < c1; ++v) {
        const int64_t c = c0 + v * kLanes;
        const auto m = tail_mask(c1 - c);
        for (int64_t j = 0; j < K; ++j) store(gwp + (b * K + j) * a.C + c, gw_acc[j][v], m);
        store(gbp + b * a.C + c, gb_acc[v], m);
      }
    }
  });
  at::Tensor gw = gw_parts.sum(0);
  at::Tensor gb = a.bias ? gb_parts.sum(0) : at::empty({0}, x.options());
  return {gx, gw, gb};
}

namespace {

struct NormArgs {
  int64_t rows, D, G, W, y_row, z_row;  // W = D / G channels per group
  const float* y;
  const float* z;  // nullptr: no gate (a plain RMSNorm of y)
  const float* w;
};

NormArgs norm_args(const at::Tensor& y, const c10::optional<at::Tensor>& z, const at::Tensor& weight,
                   int64_t group_size) {
  check_rows(y, "y", 2);
  check_rows(weight, "weight", 1);
  const int64_t rows = y.size(0), D = y.size(1);
  TORCH_CHECK(weight.size(0) == D && group_size > 0 && D % group_size == 0, "nemotron3_cpu.gated_rms_norm: y ",
              y.sizes(), ", weight ", weight.sizes(), " and group size ", group_size, " do not match");
  if (z.has_value()) {
    check_rows(*z, "z", 2);
    TORCH_CHECK(z->size(0) == rows && z->size(1) == D, "nemotron3_cpu.gated_rms_norm: z ", z->sizes(),
                " does not match y ", y.sizes());
  }
  return {rows, D, D / group_size, group_size, y.stride(0), z.has_value() ? z->stride(0) : 0, y.data_ptr<float>(),
          z.has_value() ? z->data_ptr<float>() : nullptr, weight.data_ptr<float>()};
}

// the gated input v = y silu(z) of channels [c, c + 16) (y itself without a gate), and silu(z) / its sigmoid
template <typename M>
inline Vec gated(const NormArgs& a, const float* yr, const float* zr, int64_t c, M m, Vec* silu = nullptr,
                 Vec* sg = nullptr) {
  const Vec yv = load(yr + c, m);
  if (a.z == nullptr) return yv;
  const Vec zv = load(zr + c, m);
  const Vec s = sigmoid(zv);
  const Vec si = mul(zv, s);
  if (silu) *silu = si;
  if (sg) *sg = s;
  return mul(yv, si);
}

}  // namespace

// out = rmsnorm over each group of (y * silu(z)) * weight; y, z [rows, D] (rows may be strided). Returns
// (out [rows, D], inverse RMS [rows, G]) — the second is what the backward needs.
std::tuple<at::Tensor, at::Tensor> gated_rms_norm(const at::Tensor& y, const c10::optional<at::Tensor>& z,
                                                  const at::Tensor& weight, int64_t group_size, double eps) {
  const NormArgs a = norm_args(y, z, weight, group_size);
  at::Tensor out = at::empty({a.rows, a.D}, y.options());
  at::Tensor inv = at::empty({a.rows, a.G}, y.options());
  float* op = out.data_ptr<float>();
  float* ip = inv.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, a.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* yr = a.y + r * a.y_row;
      const float* zr = a.z ? a.z + r * a.z_row : nullptr;
      float* orow = op + r * a.D;
      for (int64_t gi = 0; gi < a.G; ++gi) {
        const int64_t g0 = gi * a.W, g1 = g0 + a.W;
        Vec ss = zero();
        for (int64_t c = g0; c < g1; c += kLanes) {  // v = y silu(z), kept in out until scaled
          const auto m = tail_mask(g1 - c);
          const Vec v = gated(a, yr, zr, c, m);
          store(orow + c, v, m);
          ss = fma(v, v, ss);
        }
        const float scale = 1.f / std::sqrt(hsum(ss) / static_cast<float>(a.W) + e);
        ip[r * a.G + gi] = scale;
        for (int64_t c = g0; c < g1; c += kLanes) {
          const auto m = tail_mask(g1 - c);
          store(orow + c, mul(mul(load(orow + c, m), splat(scale)), load(a.w + c, m)), m);
        }
      }
    }
  });
  return {out, inv};
}

// Gradients of `gated_rms_norm` from g [rows, D]: (gy, gz [rows, D], gweight [D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_rms_norm_backward(const at::Tensor& g, const at::Tensor& y,
                                                                       const c10::optional<at::Tensor>& z,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& inv, int64_t group_size) {
  const NormArgs a = norm_args(y, z, weight, group_size);
  check_rows(g, "grad", 2);
  TORCH_CHECK(g.size(0) == a.rows && g.size(1) == a.D && inv.is_contiguous() && inv.numel() == a.rows * a.G,
              "nemotron3_cpu.gated_rms_norm_backward: shapes do not match");
  at::Tensor gy = at::empty({a.rows, a.D}, y.options());
  at::Tensor gz = a.z ? at::empty({a.rows, a.D}, y.options()) : at::empty({0}, y.options());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, a.rows / 16));
  at::Tensor gw_parts = at::zeros({chunks, a.D}, y.options());  // per chunk of rows, summed at the end
  const float* gp = g.data_ptr<float>();
  const int64_t g_row = g.stride(0);
  const float* ip = inv.data_ptr<float>();
  float* gyp = gy.data_ptr<float>();
  float* gzp = a.z ? gz.data_ptr<float>() : nullptr;
  float* gwp = gw_parts.data_ptr<float>();
  const float inv_w = 1.f / static_cast<float>(a.W);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float* gw_acc = gwp + k * a.D;
      for (int64_t r = k * a.rows / chunks; r < (k + 1) * a.rows / chunks; ++r) {
        const float* yr = a.y + r * a.y_row;
        const float* zr = a.z ? a.z + r * a.z_row : nullptr;
        const float* gr = gp + r * g_row;
        for (int64_t gi = 0; gi < a.G; ++gi) {
          const int64_t g0 = gi * a.W, g1 = g0 + a.W;
          const float s = ip[r * a.G + gi];
          // n = v s (normalised), gn = g w; dv = s (gn - n mean(gn n))
          Vec dot = zero();
          for (int64_t c = g0; c < g1; c += kLanes) {
            const auto m = tail_mask(g1 - c);
            const Vec n = mul(gated(a, yr, zr, c, m), splat(s));
            const Vec gv = load(gr + c, m);
            store(gw_acc + c, fma(gv, n, load(gw_acc + c, m)), m);
            dot = fma(mul(gv, load(a.w + c, m)), n, dot);
          }
          const float mean_dot = hsum(dot) * inv_w;
          for (int64_t c = g0; c < g1; c += kLanes) {
            const auto m = tail_mask(g1 - c);
            Vec silu = zero(), sg = zero();
            const Vec n = mul(gated(a, yr, zr, c, m, &silu, &sg), splat(s));
            const Vec gn = mul(load(gr + c, m), load(a.w + c, m));
            const Vec dv = mul(splat(s), sub(gn, mul(n, splat(mean_dot))));
            if (a.z == nullptr) {
              store(gyp + r * a.D + c, dv, m);
              continue;
            }
            store(gyp + r * a.D + c, mul(dv, silu), m);
            // d silu / dz = sg (1 + z (1 - sg))
            const Vec zv = load(zr + c, m);
            store(gzp + r * a.D + c, mul(mul(dv, load(yr + c, m)), mul(sg, fma(zv, sub(splat(1.f), sg), splat(1.f)))),
                  m);
          }
        }
      }
    }
  });
  return {gy, gz, gw_parts.sum(0)};
}

namespace {

// out[i] = f(relu(x[i]), g[i]) over contiguous float32 x (and g, when given), one pass
template <typename F>
at::Tensor map_relu(const at::Tensor& x, const at::Tensor* g, const char* name, F f) {
  check_rows(x, "x", x.dim());
  TORCH_CHECK(x.is_contiguous() && (g == nullptr || (g->is_contiguous() && g->numel() == x.numel() &&
                                                     g->scalar_type() == at::kFloat)),
              "nemotron3_cpu.", name, ": inputs must be contiguous float32 tensors of one size");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = g ? g->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += kLanes) {
      const auto m = tail_mask(i1 - i);
      store(op + i, f(max0(load(xp + i, m)), gp ? load(gp + i, m) : zero()), m);
    }
  });
  return out;
}

}  // namespace

// Squared ReLU, relu(x)^2, and its gradient 2 relu(x) grad, each one pass (contiguous float32).
at::Tensor relu2(const at::Tensor& x) {
  return map_relu(x, nullptr, "relu2", [](Vec r, Vec) { return mul(r, r); });
}

at::Tensor relu2_backward(const at::Tensor& g, const at::Tensor& x) {
  return map_relu(x, &g, "relu2_backward", [](Vec r, Vec gv) { return mul(add(r, r), gv); });
}

}  // namespace nemotron3

TORCH_LIBRARY_FRAGMENT(nemotron3_cpu, m) {
  m.def("conv_silu(Tensor x, Tensor weight_t, Tensor? bias, Tensor? seq_idx) -> Tensor");
  m.def("conv_silu_backward(Tensor grad, Tensor x, Tensor weight_t, Tensor? bias, Tensor? seq_idx) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("gated_rms_norm(Tensor y, Tensor? z, Tensor weight, int group_size, float eps) -> (Tensor, Tensor)");
  m.def("gated_rms_norm_backward(Tensor grad, Tensor y, Tensor? z, Tensor weight, Tensor inv, int group_size) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("relu2(Tensor x) -> Tensor");
  m.def("relu2_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(nemotron3_cpu, CPU, m) {
  m.impl("conv_silu", nemotron3::conv_silu);
  m.impl("conv_silu_backward", nemotron3::conv_silu_backward);
  m.impl("gated_rms_norm", nemotron3::gated_rms_norm);
  m.impl("gated_rms_norm_backward", nemotron3::gated_rms_norm_backward);
  m.impl("relu2", nemotron3::relu2);
  m.impl("relu2_backward", nemotron3::relu2_backward);
}
