// The Nemotron 3 CPU decode kernels as C++ functions (decode_kernels.cpp), for the whole-block kernels
// (decode_blocks.cpp) to call without going through the dispatcher. Python reaches them as
// torch.ops.nemotron3_cpu.* (schemas in decode_kernels.cpp).
#pragma once

#include <ATen/ATen.h>

namespace nemotron3 {

constexpr int64_t kMaxRows = 16;  // small_linear: input rows the kernel takes (beyond, ATen's GEMM is as fast)

// y = x W^T + b over the last dim of x (then squared ReLU if relu2); x [..., I], W [O, I], b [O] or None.
// float32, or bfloat16 (x, W, b bf16; fp32 sums; y rounded to bf16 as PyTorch's bf16 GEMM output is, and
// again after squaring). Non-contiguous weights or more than kMaxRows rows go to at::linear.
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        bool relu2);

// float32 x W^T for fp32 or bf16 W (bf16 widened exactly): ``F.linear(x.float(), W.float())`` without the copy.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight);

// acc[t] += sum_j weights[t, j] * down[e] relu2(up[e] x[t]), e = topk_idx[t, j] (non-gated relu^2 experts).
at::Tensor moe_relu2(const at::Tensor& x, const at::Tensor& up, const at::Tensor& down, const at::Tensor& topk_idx,
                     const at::Tensor& weights, at::Tensor acc);

// One Mamba-2 decode step between in_proj and out_proj (states updated in place); see decode_kernels.cpp.
// A = -exp(A_log) per head, as a tensor (the op) or as fp32 values.
at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                      const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const float* A,
                      const at::Tensor& D, at::Tensor ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                      double dt_lo, double dt_hi);
at::Tensor mamba_step(const at::Tensor& zxbcdt, at::Tensor conv_state, const at::Tensor& conv_w,
                      const c10::optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A,
                      const at::Tensor& D, at::Tensor ssm, const at::Tensor& norm_w, int64_t n_groups, double eps,
                      double dt_lo, double dt_hi);

// RMSNorm over the last dim in fp32 (x and weight fp32 or bf16), the result cast once to out_dtype:
// ``(x.float() * rsqrt(mean(x.float()^2) + eps) * weight.float()).to(out_dtype)``.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

// (h + o) in h's dtype, h and o of equal size (o any shape), rounded once as PyTorch's add of two bf16 tensors.
at::Tensor add(const at::Tensor& h, const at::Tensor& o);

// The routing of Nemotron3Router for T tokens from its fp32 logits [T, E]: scores (sigmoid, softmax, or the
// logits for topk_softmax), choice = scores + correction bias, group-limited top-k (n_group > 1), weights
// gathered from the scores (softmax over the k for topk_softmax, else normalised if norm_topk_prob), times
// scaling. Fills topk_idx [T, k] int64 and weights [T, k] fp32. Ties go to the lower expert index.
void route(const at::Tensor& logits, const at::Tensor& correction_bias, int64_t score_function, int64_t top_k,
           int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling, at::Tensor& topk_idx,
           at::Tensor& weights);

// Attention of the T new tokens of each sequence to the first length + T cached keys / values (causal among
// the new ones), as ATen's sdpa computes it (fp32 sums; bf16 models round the unnormalised probabilities to
// bf16 before the value sum): q [b, T, heads, d]; keys / values [b, kv_heads, capacity, d] with the new
// tokens' already written at length..; heads a multiple of kv_heads (GQA); float32 or bfloat16. Returns
// [b, T, heads, d].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                            double scale);

bool has_avx512();

}  // namespace nemotron3
