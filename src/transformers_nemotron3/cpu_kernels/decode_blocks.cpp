// Whole Nemotron 3 decode steps in one call: `decode_step` runs the embedding lookup, a run of Mamba-2,
// attention, MoE and MLP blocks (``h + mixer(RMSNorm(h))`` each), the final norm and the LM head.
//
// Why: with the products streaming the weights at memory speed (decode_kernels.cpp), about half of a small
// model's batch-1 step was still Python and small ATen ops (module calls, argument checks, casts, a dozen ops
// per block), each starting with cold caches right after the weights streamed through. Here the blocks run
// back to back in the order and with the roundings of the modules (RMSNorm in fp32 cast once to the model
// dtype, GEMM outputs rounded to bf16 in bf16 models, the router in fp32, attention through ATen's sdpa), so
// results equal the module path up to summation order; modeling_tests/test_cpu_decode_step.py checks that.

#include <torch/library.h>

#include "decode_ops.h"
#include "gemm.h"

namespace {

using bf16 = c10::BFloat16;
using c10::optional;

// h [b, T, H] -> h + o (o of the same size), in h's dtype as PyTorch's add rounds it
at::Tensor residual(const at::Tensor& h, const at::Tensor& o) { return nemotron3::add(h, o); }

// h [b, T, H]: T tokens per sequence, one Mamba step after another; with `recorded`, the conv and SSM states
// after each token are appended to it (speculative verification keeps them for rollback, as the module does
// for T > 1).
at::Tensor mamba_block(const at::Tensor& h, const at::Tensor& norm_w, double norm_eps, const at::Tensor& in_w,
                       const optional<at::Tensor>& in_b, at::Tensor conv_state, const at::Tensor& conv_w,
                       const optional<at::Tensor>& conv_b, const at::Tensor& dt_bias, const at::Tensor& A_log,
                       const at::Tensor& D, at::Tensor ssm, const at::Tensor& gnorm_w, int64_t n_groups,
                       double gnorm_eps, double dt_lo, double dt_hi, const at::Tensor& out_w,
                       const optional<at::Tensor>& out_b, std::vector<at::Tensor>* recorded) {
  nemotron3::hint_weight(in_w);
  const at::Tensor x = nemotron3::rms_norm(h, norm_w, norm_eps, h.scalar_type());
  const at::Tensor zxbcdt = nemotron3::small_linear(x, in_w, in_b, false);
  nemotron3::hint_weight(out_w);
  const nemotron3::Floats a_log(A_log);
  std::vector<float> A(A_log.numel());  // -exp(A_log.float()), as the mixer computes it
  for (size_t i = 0; i < A.size(); ++i) A[i] = -std::exp(a_log.get()[i]);
  TORCH_CHECK(static_cast<int64_t>(A.size()) == ssm.size(1), "nemotron3_cpu.decode_step: A_log has ", A.size(),
              " entries for ", ssm.size(1), " heads");
  const int64_t T = h.size(1);
  auto step = [&](const at::Tensor& z) {
    return nemotron3::mamba_step(z, conv_state, conv_w, conv_b, dt_bias, A.data(), D, ssm, gnorm_w, n_groups,
                                 gnorm_eps, dt_lo, dt_hi);
  };
  at::Tensor y;
  if (T == 1) {
    y = step(zxbcdt);
  } else {
    std::vector<at::Tensor> ys;
    for (int64_t t = 0; t < T; ++t) {
      ys.push_back(step(zxbcdt.select(1, t)));
      if (recorded != nullptr) {
        recorded->push_back(conv_state.clone());
        recorded->push_back(ssm.clone());
      }
    }
    y = at::stack(ys, 1);
  }
  return residual(h, nemotron3::small_linear(y, out_w, out_b, false));
}

// keys / values [b, kv_heads, capacity, head_dim] with `length` filled; the T new tokens' keys / values go to
// columns length.. (the caller has made room and advances the length). T > 1 attends causally, as the module's
// mask for a continuation does.
at::Tensor attention_block(const at::Tensor& h, const at::Tensor& norm_w, double norm_eps, const at::Tensor& q_w,
                           const optional<at::Tensor>& q_b, const at::Tensor& k_w, const optional<at::Tensor>& k_b,
                           const at::Tensor& v_w, const optional<at::Tensor>& v_b, const at::Tensor& o_w,
                           const optional<at::Tensor>& o_b, at::Tensor keys, at::Tensor values, int64_t length,
                           int64_t num_heads, int64_t head_dim, double scale) {
  TORCH_CHECK(h.dim() == 3, "nemotron3_cpu.attention_block: h must be [b, T, hidden]");
  const int64_t b = h.size(0), T = h.size(1), kv_heads = keys.size(1), total = length + T;
  TORCH_CHECK(keys.size(0) == b && keys.size(3) == head_dim && total <= keys.size(2) &&
                  values.sizes() == keys.sizes(), "nemotron3_cpu.attention_block: the key/value buffers do not fit");
  nemotron3::hint_weight(q_w);
  const at::Tensor x = nemotron3::rms_norm(h, norm_w, norm_eps, h.scalar_type());
  const at::Tensor q = nemotron3::small_linear(x, q_w, q_b, false).view({b, T, num_heads, head_dim});
  nemotron3::hint_weight(k_w);
  const at::Tensor k = nemotron3::small_linear(x, k_w, k_b, false).view({b, T, kv_heads, head_dim}).transpose(1, 2);
  nemotron3::hint_weight(v_w);
  const at::Tensor v = nemotron3::small_linear(x, v_w, v_b, false).view({b, T, kv_heads, head_dim}).transpose(1, 2);
  nemotron3::hint_weight(o_w);
  keys.narrow(2, length, T).copy_(k);
  values.narrow(2, length, T).copy_(v);
  // what the module's sdpa computes (causal among several new tokens), without ATen's OpenMP regions (team.h)
  const at::Tensor out = nemotron3::decode_attention(q, keys, values, length, scale);  // [b, T, heads, d]
  return residual(h, nemotron3::small_linear(out.reshape({b, T, -1}), o_w, o_b, false));
}

// Returns (h + moe(RMSNorm(h)), router logits [T, E] fp32). Non-gated relu^2 experts, routed at full width or,
// with fc1_w / fc2_w (LatentMoE), in the latent width between those projections; shared expert relu^2 MLP or
// none (undefined weights). The router follows Nemotron3Router step for step (nemotron3::route).
std::tuple<at::Tensor, at::Tensor> moe_block(
    const at::Tensor& h, const at::Tensor& norm_w, double norm_eps, const at::Tensor& router_w,
    const at::Tensor& correction_bias, int64_t score_function, int64_t top_k, int64_t n_group, int64_t topk_group,
    bool norm_topk_prob, double scaling, const optional<at::Tensor>& shared_up_w,
    const optional<at::Tensor>& shared_up_b, const optional<at::Tensor>& shared_down_w,
    const optional<at::Tensor>& shared_down_b, const optional<at::Tensor>& fc1_w, const optional<at::Tensor>& fc1_b,
    const optional<at::Tensor>& fc2_w, const optional<at::Tensor>& fc2_b, const at::Tensor& up,
    const at::Tensor& down) {
  const int64_t width = h.size(-1);
  nemotron3::hint_weight(router_w);
  const at::Tensor x = nemotron3::rms_norm(h, norm_w, norm_eps, h.scalar_type()).view({-1, width});
  const int64_t tokens = x.size(0);
  const at::Tensor logits = nemotron3::linear_f32(x, router_w);
  at::Tensor topk_idx, weights;
  nemotron3::route(logits, correction_bias, score_function, top_k, n_group, topk_group, norm_topk_prob, scaling,
                   topk_idx, weights);
  const bool shared = shared_up_w.has_value() && shared_up_w->defined();
  auto shared_expert = [&] {
    nemotron3::hint_weight(*shared_up_w);
    const at::Tensor u = nemotron3::small_linear(x, *shared_up_w, shared_up_b, true);
    nemotron3::hint_weight(*shared_down_w);
    return nemotron3::small_linear(u, *shared_down_w, shared_down_b, false);
  };
  if (fc1_w.has_value() && fc1_w->defined()) {  // LatentMoE, as Nemotron3MoE: fc2(routed sum in h's dtype) + shared
    nemotron3::hint_weight(*fc1_w);
    const at::Tensor xl = nemotron3::small_linear(x, *fc1_w, fc1_b, false);
    const at::Tensor acc = nemotron3::moe_relu2(xl, up, down, topk_idx, weights,
                                                at::zeros({tokens, xl.size(-1)}, x.options().dtype(at::kFloat)));
    nemotron3::hint_weight(*fc2_w);
    at::Tensor out = nemotron3::small_linear(acc.to(h.scalar_type()), *fc2_w, fc2_b, false).contiguous();
    if (shared) out = nemotron3::add(out, shared_expert().contiguous());
    return {residual(h, out), logits};
  }
  if (h.scalar_type() == at::kFloat) {  // fp32: the routed sum goes straight into the shared expert's output
    at::Tensor acc = shared ? shared_expert().contiguous() : at::zeros({tokens, width}, x.options());
    return {residual(h, nemotron3::moe_relu2(x, up, down, topk_idx, weights, acc)), logits};
  }
  // bf16, as the module adds: routed sum (fp32) cast to bf16, + the shared expert's bf16 output, + h
  TORCH_CHECK(h.scalar_type() == at::kBFloat16, "nemotron3_cpu.decode_step: float32 or bfloat16 only");
  const at::Tensor acc = nemotron3::moe_relu2(x, up, down, topk_idx, weights,
                                              at::zeros({tokens, width}, x.options().dtype(at::kFloat)));
  at::Tensor out = at::empty(h.sizes(), h.options());
  const at::Tensor sh = shared ? shared_expert().contiguous() : at::Tensor();
  const at::Tensor hc = h.contiguous();
  const float* ap = acc.data_ptr<float>();
  const bf16* hp = hc.data_ptr<bf16>();
  const bf16* sp = shared ? sh.data_ptr<bf16>() : nullptr;
  bf16* op = out.data_ptr<bf16>();
  for (int64_t i = 0; i < tokens * width; ++i) {
    float m = static_cast<float>(bf16(ap[i]));
    if (sp) m = static_cast<float>(bf16(m + static_cast<float>(sp[i])));
    op[i] = bf16(static_cast<float>(hp[i]) + m);
  }
  return {out, logits};
}

// h + down(relu2(up(RMSNorm(h)))): a dense MLP block (`-` layers)
at::Tensor mlp_block(const at::Tensor& h, const at::Tensor& norm_w, double norm_eps, const at::Tensor& up_w,
                     const optional<at::Tensor>& up_b, const at::Tensor& down_w, const optional<at::Tensor>& down_b) {
  nemotron3::hint_weight(up_w);
  const at::Tensor x = nemotron3::rms_norm(h, norm_w, norm_eps, h.scalar_type());
  const at::Tensor u = nemotron3::small_linear(x, up_w, up_b, true);
  nemotron3::hint_weight(down_w);
  return residual(h, nemotron3::small_linear(u, down_w, down_b, false));
}

// Reads a decode plan's flat argument lists in order (layout: see decode_step below).
struct Cursor {
  const c10::List<optional<at::Tensor>>& tensors;
  at::ArrayRef<double> floats;
  at::ArrayRef<int64_t> ints;
  const c10::List<at::Tensor>& states;
  size_t t = 0, f = 0, i = 0, s = 0;
  optional<at::Tensor> opt() {
    TORCH_CHECK(t < tensors.size(), "nemotron3_cpu.decode_step: the plan has too few tensors");
    return tensors.get(t++);
  }
  at::Tensor req() {
    optional<at::Tensor> v = opt();
    TORCH_CHECK(v.has_value() && v->defined(), "nemotron3_cpu.decode_step: a required plan tensor is None");
    return *v;
  }
  double flt() {
    TORCH_CHECK(f < floats.size(), "nemotron3_cpu.decode_step: the plan has too few floats");
    return floats[f++];
  }
  int64_t integer() {
    TORCH_CHECK(i < ints.size(), "nemotron3_cpu.decode_step: the plan has too few ints");
    return ints[i++];
  }
  at::Tensor state() {
    TORCH_CHECK(s < states.size(), "nemotron3_cpu.decode_step: too few cache states");
    return states.get(s++);
  }
};

enum BlockKind : int64_t { kMamba = 0, kAttention = 1, kMoE = 2, kMLP = 3 };

// One decode step (b * T <= 16 tokens, usually T = 1) through a run of blocks, then optionally the final norm
// and the LM head. `kinds` names each block; the blocks' arguments follow one another in `tensors` / `floats` /
// `ints`:
//   Mamba-2:   tensors norm_w in_w in_b conv_w conv_b dt_bias A_log D gnorm_w out_w out_b;
//              floats norm_eps gnorm_eps dt_lo dt_hi; ints n_groups; states conv ssm
//   attention: tensors norm_w q_w q_b k_w k_b v_w v_b o_w o_b; floats norm_eps scale;
//              ints num_heads head_dim; states keys values (room for T more columns), kv_lengths[j]
//   MoE:       tensors norm_w router_w correction_bias shared_up_w shared_up_b shared_down_w shared_down_b
//              fc1_w fc1_b fc2_w fc2_b (LatentMoE; undefined otherwise) up down; floats norm_eps scaling;
//              ints score_function top_k n_group topk_group norm_topk_prob
//   MLP:       tensors norm_w up_w up_b down_w down_b; floats norm_eps (relu^2)
// `h` is the input hidden state [b, T, H], or with `input_ids` [b, T] given, the embedding matrix to look them
// up in. Returns (hidden [b, T, H] after the last block, [final-normed hidden] when final_norm_w is given,
// [logits [b, T, V] fp32] when lm_w is given too, router logits of the MoE blocks, and with `record` and T > 1
// the conv and SSM states of each Mamba block after each token: layer by layer, token by token, conv then ssm).
using StepResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                              std::vector<at::Tensor>, std::vector<at::Tensor>>;

StepResult step_blocks(const at::Tensor& h_or_embeddings, const optional<at::Tensor>& input_ids, at::IntArrayRef kinds,
            const c10::List<optional<at::Tensor>>& tensors, at::ArrayRef<double> floats, at::IntArrayRef ints,
            const c10::List<at::Tensor>& states, at::IntArrayRef kv_lengths, const optional<at::Tensor>& final_norm_w,
            double final_eps, const optional<at::Tensor>& lm_w, bool record) {
  at::Tensor h = h_or_embeddings;
  if (input_ids.has_value() && input_ids->defined()) {
    TORCH_CHECK(input_ids->dim() == 2, "nemotron3_cpu.decode_step: input_ids must be [b, T]");
    h = h_or_embeddings.index_select(0, input_ids->reshape({-1})).view({input_ids->size(0), input_ids->size(1), -1});
  }
  TORCH_CHECK(h.dim() == 3, "nemotron3_cpu.decode_step: hidden states must be [b, T, hidden]");
  std::vector<at::Tensor> recorded;
  Cursor c{tensors, floats, ints, states};
  std::vector<at::Tensor> router_logits;
  size_t kv = 0;
  for (const int64_t kind : kinds) {
    if (kind == kMamba) {
      const at::Tensor norm_w = c.req(), in_w = c.req();
      const optional<at::Tensor> in_b = c.opt();
      const at::Tensor conv_w = c.req();
      const optional<at::Tensor> conv_b = c.opt();
      const at::Tensor dt_bias = c.req(), A_log = c.req(), D = c.req(), gnorm_w = c.req(), out_w = c.req();
      const optional<at::Tensor> out_b = c.opt();
      const double norm_eps = c.flt(), gnorm_eps = c.flt(), lo = c.flt(), hi = c.flt();
      const at::Tensor conv = c.state(), ssm = c.state();
      h = mamba_block(h, norm_w, norm_eps, in_w, in_b, conv, conv_w, conv_b, dt_bias, A_log, D, ssm, gnorm_w,
                      c.integer(), gnorm_eps, lo, hi, out_w, out_b, record && h.size(1) > 1 ? &recorded : nullptr);
    } else if (kind == kAttention) {
      const at::Tensor norm_w = c.req(), q_w = c.req();
      const optional<at::Tensor> q_b = c.opt();
      const at::Tensor k_w = c.req();
      const optional<at::Tensor> k_b = c.opt();
      const at::Tensor v_w = c.req();
      const optional<at::Tensor> v_b = c.opt();
      const at::Tensor o_w = c.req();
      const optional<at::Tensor> o_b = c.opt();
      const double norm_eps = c.flt(), scale = c.flt();
      const int64_t heads = c.integer(), head_dim = c.integer();
      const at::Tensor keys = c.state(), values = c.state();
      TORCH_CHECK(kv < kv_lengths.size(), "nemotron3_cpu.decode_step: too few kv_lengths");
      h = attention_block(h, norm_w, norm_eps, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, keys, values, kv_lengths[kv++],
                          heads, head_dim, scale);
    } else if (kind == kMoE) {
      const at::Tensor norm_w = c.req(), router_w = c.req(), bias = c.req();
      const optional<at::Tensor> su_w = c.opt(), su_b = c.opt(), sd_w = c.opt(), sd_b = c.opt();
      const optional<at::Tensor> f1_w = c.opt(), f1_b = c.opt(), f2_w = c.opt(), f2_b = c.opt();
      const at::Tensor up = c.req(), down = c.req();
      const double norm_eps = c.flt(), scaling = c.flt();
      const int64_t score = c.integer(), top_k = c.integer(), n_group = c.integer(), topk_group = c.integer();
      const bool norm_topk = c.integer() != 0;
      auto out = moe_block(h, norm_w, norm_eps, router_w, bias, score, top_k, n_group, topk_group, norm_topk, scaling,
                           su_w, su_b, sd_w, sd_b, f1_w, f1_b, f2_w, f2_b, up, down);
      h = std::get<0>(out);
      router_logits.push_back(std::get<1>(out));
    } else if (kind == kMLP) {
      const at::Tensor norm_w = c.req(), up_w = c.req();
      const optional<at::Tensor> up_b = c.opt();
      const at::Tensor down_w = c.req();
      const optional<at::Tensor> down_b = c.opt();
      h = mlp_block(h, norm_w, c.flt(), up_w, up_b, down_w, down_b);
    } else {
      TORCH_CHECK(false, "nemotron3_cpu.decode_step: unknown block kind ", kind);
    }
  }
  TORCH_CHECK(c.t == tensors.size() && c.f == floats.size() && c.i == ints.size() && c.s == states.size() &&
                  kv == kv_lengths.size(), "nemotron3_cpu.decode_step: the plan has arguments left over");
  std::vector<at::Tensor> normed, logits;
  if (final_norm_w.has_value() && final_norm_w->defined()) {
    if (lm_w.has_value() && lm_w->defined()) nemotron3::hint_weight(*lm_w);
    normed.push_back(nemotron3::rms_norm(h, *final_norm_w, final_eps, h.scalar_type()));
    if (lm_w.has_value() && lm_w->defined())
      logits.push_back(nemotron3::small_linear(normed[0], *lm_w, {}, false).to(at::kFloat));
  }
  return {h, normed, logits, router_logits, recorded};
}

// The op: step_blocks on a team of the OpenMP threads (team.h), whose helpers read ahead through the serial parts.
StepResult decode_step(const at::Tensor& h_or_embeddings, const optional<at::Tensor>& input_ids, at::IntArrayRef kinds,
                       const c10::List<optional<at::Tensor>>& tensors, at::ArrayRef<double> floats, at::IntArrayRef ints,
                       const c10::List<at::Tensor>& states, at::IntArrayRef kv_lengths,
                       const optional<at::Tensor>& final_norm_w, double final_eps, const optional<at::Tensor>& lm_w,
                       bool record) {
  StepResult result;
  nemotron3::with_team([&] {
    result = step_blocks(h_or_embeddings, input_ids, kinds, tensors, floats, ints, states, kv_lengths, final_norm_w,
                         final_eps, lm_w, record);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nemotron3_cpu, m) {
  m.def("decode_step(Tensor h_or_embeddings, Tensor? input_ids, int[] kinds, Tensor?[] tensors, float[] floats, "
        "int[] ints, Tensor(a!)[] states, int[] kv_lengths, Tensor? final_norm_w, float final_eps, Tensor? lm_w, "
        "bool record) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(nemotron3_cpu, CPU, m) {
  m.impl("decode_step", decode_step);
}
