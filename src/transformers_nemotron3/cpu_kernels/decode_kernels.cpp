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

#include <torch/library.h>

#include <limits>

#include "decode_ops.h"
#include "gemm.h"

namespace nemotron3 {

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        bool relu2) {
  check_weight(weight, "weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "nemotron3_cpu.small_linear: x is ", x.scalar_type(),
              ", weight ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "nemotron3_cpu.small_linear: weight must be 2-D");
  const int64_t I = weight.size(1), O = weight.size(0);
  TORCH_CHECK(x.size(-1) == I, "nemotron3_cpu.small_linear: x has ", x.size(-1), " features, weight expects ", I);
  if (!weight.is_contiguous() || x.numel() > kMaxRows * I) {  // not what the kernel is for: ATen's GEMM
    at::Tensor y = at::linear(x, weight, bias);
    return relu2 ? y.relu_().square_() : y;
  }
  const bool bf = weight.scalar_type() == at::kBFloat16;
  const at::Tensor x2 = x.reshape({-1, I}).to(bf && NEMOTRON3_DPBF16 ? at::kBFloat16 : at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  const Floats b(bias);
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  at::Tensor y = at::empty(sizes, x.options());  // bf16 results are rounded in the kernel and stored as bf16
  auto run = [&](const auto* xp, const auto* wp, auto* yp) {
    parallel_rows(O, kGrain, [&](int64_t o0, int64_t o1) {
      if (relu2)
        rows_any<true>(xp, I, M, wp, I, o0, o1, yp, O, b.get());
      else
        rows_any<false>(xp, I, M, wp, I, o0, o1, yp, O, b.get());
    });
  };
  if (bf)
    run(x2.data_ptr<act_t<bf16>>(), weight.data_ptr<bf16>(), y.data_ptr<bf16>());
  else
    run(x2.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight) {
  check_weight(weight, "weight");
  const int64_t I = weight.size(1), O = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, I}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  if (!weight.is_contiguous() || M > kMaxRows) return at::linear(x2, weight.to(at::kFloat));
  at::Tensor y = at::empty({M, O}, x2.options());
  float* yp = y.data_ptr<float>();
  const float* xp = x2.data_ptr<float>();
  parallel_rows(O, kGrain, [&](int64_t o0, int64_t o1) {
    if (weight.scalar_type() == at::kBFloat16)
      rows_any<false, float, bf16, float, false>(xp, I, M, weight.data_ptr<bf16>(), I, o0, o1, yp, O, nullptr);
    else
      rows_any<false>(xp, I, M, weight.data_ptr<float>(), I, o0, o1, yp, O, nullptr);
  });
  return y;
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
  // in a decode step, the helpers start on their parts of the up products (rows of the used experts end to end)
  if (Team* team = Team::current(); team != nullptr && U > 0) {
    const int64_t threads = row_threads(U * F, kGrain), row = H * static_cast<int64_t>(sizeof(WT));
    const char* base = reinterpret_cast<const char*>(up.data_ptr<WT>());
    team->hint([&](int t) {
      const int64_t r = part_begin(U * F, kGrain, threads, t);
      return r >= U * F ? base : base + (used[r / F] * F + r % F) * row;
    }, base + E * F * row);
  }

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
  parallel_rows(U * F, kGrain, [&](int64_t a, int64_t b) {
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
  // down, then the weighted sum into acc: threads own output columns, so every thread visits every expert, in
  // chunks of 64 columns (16 made each expert's stream too short: tiny's batch-8 step 7.1 ms, 6.6 with 64)
  constexpr int64_t kDownChunk = 64;
  if (U > 0)  // the helpers' first chunks of the down products start with the first used expert
    hint_rows(dnp + used[0] * H * F, H, F * static_cast<int64_t>(sizeof(WT)), kDownChunk);
  parallel_rows(H, kDownChunk, [&](int64_t o0, int64_t o1) {
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
// group-normed y [b, d_inner] (input of out_proj). Without norm_w (undefined) the input is [b, conv_dim + h]
// (x B C | dt, no z) and the result is the scan output y + D x before gate and norm, float32 [b, d_inner]
// (the `sequence_mixer` seam of the mixer: the gated norm then runs in PyTorch). A = -exp(A_log) [h]; dt = clamp(softplus(dt + dt_bias), lo, hi).
// zxbcdt, conv_state and the result share a dtype, float32 or bfloat16; with bfloat16 the conv output, its
// bias add and SiLU are rounded to bf16 as the PyTorch step does; everything after runs in fp32 there too.
template <typename T>
at::Tensor mamba_step_impl(const at::Tensor& zxbcdt, at::Tensor& conv_state, const at::Tensor& conv_w,
                           const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const float* Ap,
                           const at::Tensor& D, at::Tensor& ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                           double dt_lo, double dt_hi) {
  const int64_t B = ssm.size(0), Hh = ssm.size(1), P = ssm.size(2), N = ssm.size(3);
  const int64_t d_inner = Hh * P, C = conv_state.size(1), K = conv_state.size(2), G = n_groups;
  const bool gated = norm_w.defined();
  const int64_t z_width = gated ? d_inner : 0;
  TORCH_CHECK(C == d_inner + 2 * G * N && zxbcdt.size(-1) == z_width + C + Hh && Hh % G == 0,
              "nemotron3_cpu.mamba_step: shapes do not match (conv_dim ", C, ", heads ", Hh, ", groups ", G, ")");
  TORCH_CHECK(conv_w.numel() == C * K, "nemotron3_cpu.mamba_step: conv weight has ", conv_w.numel(), " elements");
  const at::Tensor in = zxbcdt.reshape({B, -1}).contiguous();
  const Floats w(conv_w), cb(conv_b), dtb(dt_bias), Dc(D), nw(norm_w);
  at::Tensor out = at::empty({B, d_inner}, gated ? zxbcdt.options() : zxbcdt.options().dtype(at::kFloat));
  float* yout = gated ? nullptr : out.data_ptr<float>();
  const int64_t row = in.size(1), heads_per_group = Hh / G, group_width = heads_per_group * P;
  const T* inp = in.data_ptr<T>();
  const float* wp = w.get();
  const float* cbp = cb.get();
  const float* dtbp = dtb.get();
  const float* Dp = Dc.get();
  const float* nwp = nw.get();
  T* csp = conv_state.data_ptr<T>();
  float* sp = ssm.data_ptr<float>();
  T* op = gated ? out.data_ptr<T>() : nullptr;
  const float lo = static_cast<float>(dt_lo), hi = static_cast<float>(dt_hi);
  const T* tag = nullptr;  // selects round_like's rounding for T

  parallel_rows(B * G, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> xs(group_width), Bs(N), Cs(N), ys(group_width);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / G, g = u % G;
      const T* zrow = inp + b * row;
      const T* xbc = zrow + z_width;
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
          if (!gated) {
            yout[b * d_inner + h * P + p] = y;
            continue;
          }
          const float z = static_cast<float>(zrow[h * P + p]);
          y *= z / (1.f + std::exp(-z));  // gate: y * silu(z)
          ys[hh * P + p] = y;
          sumsq += y * y;
        }
      }
      if (!gated) continue;
      const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(group_width) + static_cast<float>(eps));
      const float* wrow = nwp + g * group_width;
      T* orow = op + b * d_inner + g * group_width;
      for (int64_t j = 0; j < group_width; ++j) orow[j] = static_cast<T>(ys[j] * inv * wrow[j]);
    }
  });
  return out;
}

at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                      const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const float* A,
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

at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                      const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                      const at::Tensor& D, at::Tensor ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                      double dt_lo, double dt_hi) {
  TORCH_CHECK(A.numel() == ssm.size(1), "nemotron3_cpu.mamba_step: A has ", A.numel(), " entries for ", ssm.size(1),
              " heads");
  const Floats a(A);
  return mamba_step(zxbcdt, conv_state, conv_w, conv_b, dt_bias, a.get(), D, ssm, norm_w, n_groups, eps, dt_lo, dt_hi);
}

template <typename XT, typename WT, typename OT>
void rms_norm_rows(const XT* xp, const WT* wp, OT* op, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const XT* xr = xp + r * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      OT* orow = op + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i)
        orow[i] = static_cast<OT>(static_cast<float>(xr[i]) * inv * static_cast<float>(wp[i]));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  check_weight(x, "x");
  check_weight(weight, "weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "nemotron3_cpu.rms_norm: weight has ", weight.numel(), " elements, x has ", D,
              " features");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "nemotron3_cpu.rms_norm: output dtype ",
              out_dtype, " (float32 or bfloat16 only)");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(out_dtype));
  const int64_t rows = xc.numel() / std::max<int64_t>(D, 1);
  const float e = static_cast<float>(eps);
  auto with_out = [&](const auto* xp, const auto* wp) {
    if (out_dtype == at::kBFloat16)
      rms_norm_rows(xp, wp, out.data_ptr<bf16>(), rows, D, e);
    else
      rms_norm_rows(xp, wp, out.data_ptr<float>(), rows, D, e);
  };
  auto with_w = [&](const auto* xp) {
    if (wc.scalar_type() == at::kBFloat16)
      with_out(xp, wc.data_ptr<bf16>());
    else
      with_out(xp, wc.data_ptr<float>());
  };
  if (xc.scalar_type() == at::kBFloat16)
    with_w(xc.data_ptr<bf16>());
  else
    with_w(xc.data_ptr<float>());
  return out;
}

at::Tensor add(const at::Tensor& h, const at::Tensor& o) {
  TORCH_CHECK(h.numel() == o.numel() && h.scalar_type() == o.scalar_type(), "nemotron3_cpu.add: ", h.sizes(), " ",
              h.scalar_type(), " vs ", o.sizes(), " ", o.scalar_type());
  if (!h.is_contiguous() || !o.is_contiguous() || (h.scalar_type() != at::kFloat && h.scalar_type() != at::kBFloat16))
    return h + o.view(h.sizes());
  at::Tensor out = at::empty(h.sizes(), h.options());
  const int64_t n = h.numel();
  if (h.scalar_type() == at::kBFloat16) {
    const bf16 *a = h.data_ptr<bf16>(), *b = o.data_ptr<bf16>();
    bf16* y = out.data_ptr<bf16>();
    for (int64_t i = 0; i < n; ++i) y[i] = bf16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  } else {
    const float *a = h.data_ptr<float>(), *b = o.data_ptr<float>();
    float* y = out.data_ptr<float>();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
  }
  return out;
}

void route(const at::Tensor& logits, const at::Tensor& correction_bias, int64_t score_function, int64_t top_k,
           int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling, at::Tensor& topk_idx,
           at::Tensor& weights) {
  check_f32(logits, "logits");
  const at::Tensor lg = logits.contiguous();
  const int64_t T = lg.size(0), E = lg.size(1), k = top_k;
  TORCH_CHECK(k >= 1 && k <= E && correction_bias.numel() == E && (n_group <= 1 || (E % n_group == 0 &&
              topk_group >= 1 && topk_group <= n_group && k <= topk_group * (E / n_group))),
              "nemotron3_cpu.route: top_k ", k, ", ", E, " experts, ", n_group, " groups, topk_group ", topk_group);
  topk_idx = at::empty({T, k}, lg.options().dtype(at::kLong));
  weights = at::empty({T, k}, lg.options());
  const Floats bias(correction_bias);
  const float* bp = bias.get();
  const float* lp = lg.data_ptr<float>();
  int64_t* ip = topk_idx.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> scores(E), choice(E), group_score(std::max<int64_t>(n_group, 1));
  std::vector<char> taken(E), group_kept(std::max<int64_t>(n_group, 1));
  // index of the largest value among the not-yet-taken (ties: lower index first)
  auto argmax = [&](const float* v, int64_t n, const char* skip) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e)
      if (!skip[e] && (best < 0 || v[e] > v[best])) best = e;
    return best;
  };
  for (int64_t t = 0; t < T; ++t) {
    const float* l = lp + t * E;
    if (score_function == 0) {  // sigmoid
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-l[e]));
    } else if (score_function == 1) {  // softmax
      const float mx = *std::max_element(l, l + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
    } else {  // topk_softmax: choose on the logits
      std::copy(l, l + E, scores.begin());
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + bp[e];
    if (n_group > 1) {  // keep the topk_group groups with the largest sum of their two best choices
      const int64_t per = E / n_group;
      for (int64_t g = 0; g < n_group; ++g) {
        const float* c = choice.data() + g * per;
        std::fill(taken.begin(), taken.begin() + per, 0);
        const int64_t a = argmax(c, per, taken.data());
        float s = c[a];
        if (per > 1) {
          taken[a] = 1;
          s += c[argmax(c, per, taken.data())];
        }
        group_score[g] = s;
      }
      std::fill(group_kept.begin(), group_kept.end(), 0);
      std::vector<char> gskip(n_group, 0);
      for (int64_t j = 0; j < topk_group; ++j) {
        const int64_t g = argmax(group_score.data(), n_group, gskip.data());
        gskip[g] = 1;
        group_kept[g] = 1;
      }
      for (int64_t e = 0; e < E; ++e)
        if (!group_kept[e / per]) choice[e] = neg_inf;
    }
    std::fill(taken.begin(), taken.end(), 0);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = argmax(choice.data(), E, taken.data());
      taken[e] = 1;
      ip[t * k + j] = e;
      wp[t * k + j] = scores[e];
      sum += scores[e];
    }
    float* w = wp + t * k;
    if (score_function == 2) {  // softmax over the chosen logits
      const float mx = *std::max_element(w, w + k);
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += (w[j] = std::exp(w[j] - mx));
      for (int64_t j = 0; j < k; ++j) w[j] /= s;
    } else if (norm_topk_prob) {
      const float denom = sum + 1e-20f;
      for (int64_t j = 0; j < k; ++j) w[j] /= denom;
    }
    for (int64_t j = 0; j < k; ++j) w[j] *= static_cast<float>(scaling);
  }
}

template <typename ET>
void attention_impl(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                    double scale, at::Tensor& out) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KV = keys.size(1);
  const int64_t group = H / KV, units = B * H * T, total = length + T;
  const ET* qp = q.data_ptr<ET>();
  const ET* kp = keys.data_ptr<ET>();
  const ET* vp = values.data_ptr<ET>();
  ET* op = out.data_ptr<ET>();
  const int64_t ks0 = keys.stride(0), ks1 = keys.stride(1), ks2 = keys.stride(2);
  const int64_t vs0 = values.stride(0), vs1 = values.stride(1), vs2 = values.stride(2);
  const float sc = static_cast<float>(scale);
  const ET* tag = nullptr;  // round_like: bf16 models round the probabilities as ATen's flash attention does
  // one unit per (sequence, head, token); few units of short context run on one thread
  const int64_t chunk = units * total * D < (1 << 16) ? units : 1;
  parallel_rows(units, chunk, [&](int64_t u0, int64_t u1) {
    std::vector<float> p(total), acc(D);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / (H * T), h = u / T % H, t = u % T, n = length + t + 1;  // causal: keys 0..length+t
      const ET* qr = qp + ((b * T + t) * H + h) * D;
      const ET* kb = kp + b * ks0 + (h / group) * ks1;
      const ET* vb = vp + b * vs0 + (h / group) * vs1;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const ET* kr = kb + j * ks2;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < D; ++i) d += static_cast<float>(qr[i]) * static_cast<float>(kr[i]);
        p[j] = d * sc;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp(p[j] - mx);
        sum += e;
        p[j] = round_like(e, tag);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const ET* vr = vb + j * vs2;
        const float w = p[j];
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) acc[i] += w * static_cast<float>(vr[i]);
      }
      ET* orow = op + ((b * T + t) * H + h) * D;
      for (int64_t i = 0; i < D; ++i) orow[i] = static_cast<ET>(acc[i] / sum);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && q.size(0) == keys.size(0) &&
                  q.size(3) == keys.size(3) && keys.size(1) > 0 && q.size(2) % keys.size(1) == 0 &&
                  length + q.size(1) <= keys.size(2) && keys.scalar_type() == q.scalar_type() &&
                  values.scalar_type() == q.scalar_type(),
              "nemotron3_cpu.decode_attention: q ", q.sizes(), " does not fit keys/values ", keys.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "nemotron3_cpu.decode_attention: float32 or bfloat16 only, got ", q.scalar_type());
  const at::Tensor qc = q.contiguous();
  // the cache's buffers are contiguous; anything else is read through a copy
  const at::Tensor kc = keys.stride(3) == 1 ? keys : keys.contiguous();
  const at::Tensor vc = values.stride(3) == 1 ? values : values.contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  if (q.scalar_type() == at::kBFloat16)
    attention_impl<bf16>(qc, kc, vc, length, scale, out);
  else
    attention_impl<float>(qc, kc, vc, length, scale, out);
  return out;
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace nemotron3

namespace {

// The registered ops (schemas below); internal callers use the nemotron3:: functions directly.
at::Tensor small_linear_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return nemotron3::small_linear(x, weight, bias, false);
}

at::Tensor mamba_step_op(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                         const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                         const at::Tensor& D, at::Tensor ssm, const c10::optional<at::Tensor>& norm_w,
                         int64_t n_groups, double eps, double dt_lo, double dt_hi) {
  return nemotron3::mamba_step(zxbcdt, conv_state, conv_w, conv_b, dt_bias, A, D, ssm,
                               norm_w.has_value() ? *norm_w : at::Tensor(), n_groups, eps, dt_lo, dt_hi);
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return nemotron3::rms_norm(x, weight, eps, at::kFloat);
}

}  // namespace

TORCH_LIBRARY(nemotron3_cpu, m) {
  m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("moe_relu2(Tensor x, Tensor up, Tensor down, Tensor topk_idx, Tensor weights, Tensor(a!) acc) -> Tensor(a!)");
  m.def("mamba_step(Tensor zxbcdt, Tensor(a!) conv_state, Tensor conv_w, Tensor? conv_b, Tensor dt_bias, Tensor A, "
        "Tensor D, Tensor(b!) ssm, Tensor? norm_w, int n_groups, float eps, float dt_lo, float dt_hi) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("has_avx512() -> bool", nemotron3::has_avx512);
}

TORCH_LIBRARY_IMPL(nemotron3_cpu, CPU, m) {
  m.impl("small_linear", small_linear_op);
  m.impl("moe_relu2", nemotron3::moe_relu2);
  m.impl("mamba_step", mamba_step_op);
  m.impl("rms_norm", rms_norm_op);
}
