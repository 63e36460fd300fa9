// CPU kernels of gated_attention_scores and its backward.
//
// Rows are independent: a thread takes a run of rows and, for each, computes the H products
// act(v) * sigmoid(u) into a buffer that stays in L1, then the K dot products with weight. The
// backward recomputes the activations instead of saving them (two [M, H] tensors fewer to keep for
// autograd, and one read of v_pre / u_pre instead of three of stored activations) and writes both
// gradients in the same pass. The weight and bias gradients are sums over rows: each fixed block
// of rows (its size a function of M alone) writes a partial, and the partials are added pairwise
// in a fixed order, so the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/cpu_vec.h"
#include "common/parallel.h"
#include "common/stable.h"
#include "common/stable_args.h"
#include "gated_attention_scores.h"

namespace maskattn {
namespace {

template <typename T>
inline T act_fn(T v, GateAct act, T* d) {
  if (act == GateAct::kTanh) {
    const T a = std::tanh(v);
    *d = T(1) - a * a;
    return a;
  }
  if (act == GateAct::kRelu) {
    *d = v > T(0) ? T(1) : T(0);
    return v < T(0) ? T(0) : v;  // NaN stays NaN, as torch.relu
  }
  const T c = T(0.5) * (T(1) + std::erf(v * T(0.70710678118654752440)));
  *d = c + v * std::exp(T(-0.5) * v * v) * T(0.39894228040143267794);
  return v * c;
}

template <typename T>
inline T sigmoid(T u) {
  return T(1) / (T(1) + std::exp(-u));
}

// One row in acc_t, as cpu::gate_row_f32 (which float32, and the half types converted to float32,
// take): p = act(v + bv) * sigmoid(u + bu) and, given c = dL/dp, the two input gradients; null
// outputs are skipped. float64 takes the libm functions.
template <typename acc_t>
inline void gate_row(const acc_t* v, const acc_t* u, const acc_t* bv, const acc_t* bu, const acc_t* c,
                     int64_t H, GateAct act, acc_t* gv, acc_t* gu, acc_t* p) {
  if constexpr (std::is_same_v<acc_t, float>) {
    cpu::gate_row_f32(v, u, bv, bu, c, H, static_cast<int>(act), gv, gu, p);
  } else {
    for (int64_t j = 0; j < H; ++j) {
      acc_t d;
      const acc_t x = v[j] + (bv ? bv[j] : acc_t(-0.0));
      const acc_t a = act_fn(x, act, &d), s = sigmoid(u[j] + (bu ? bu[j] : acc_t(-0.0)));
      if (p) p[j] = a * s;
      if (!gv && !gu) continue;
      const acc_t cs = c[j] * s;
      // relu: a select, as torch's threshold_backward (0 at v <= 0 whatever cs is; NaN v passes cs)
      if (gv) gv[j] = act == GateAct::kRelu ? (x <= acc_t(0) ? acc_t(0) : cs) : cs * d;
      if (gu) gu[j] = cs * a * (acc_t(1) - s);
    }
  }
}

// A row of scalar_t as acc_t: the row itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* row, int64_t H, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    for (int64_t j = 0; j < H; ++j) buf[j] = static_cast<acc_t>(row[j]);
    return buf;
  }
}

// A parameter (weight, a bias) in the accumulation dtype, or undefined; ptr() reads it.
st::Tensor acc_param(const st::Tensor& t, st::ScalarType acc) {
  return t.defined() ? acc_contiguous(t, acc) : t;
}

template <typename acc_t>
const acc_t* ptr(const st::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

st::Tensor gated_attention_scores_cpu(const st::Tensor& v_pre, const st::Tensor& u_pre,
                                      const st::Tensor& weight, const std::optional<st::Tensor>& bias,
                                      std::string act, const std::optional<st::Tensor>& v_bias,
                                      const std::optional<st::Tensor>& u_bias) {
  const GateInputs in =
      check_gate_inputs(v_pre, u_pre, weight, bias, act, v_bias, u_bias, "gated_attention_scores");
  const st::Device dev = v_pre.device();
  st::Tensor out =
      st::empty(in.out_sizes.data(), static_cast<int64_t>(in.out_sizes.size()), v_pre.scalar_type(), dev);
  const int64_t M = in.v.M, H = in.v.H, K = in.K;
  if (M == 0 || K == 0) return out;

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    const st::ScalarType acc = st::acc_dtype(v_pre.scalar_type());
    const st::Tensor w = acc_param(in.weight, acc), b = acc_param(in.bias, acc),
                     bv = acc_param(in.v_bias, acc), bu = acc_param(in.u_bias, acc);
    const acc_t *wp = ptr<acc_t>(w), *bp = ptr<acc_t>(b), *bvp = ptr<acc_t>(bv), *bup = ptr<acc_t>(bu);
    const scalar_t* vd = in.v.data.const_data_ptr<scalar_t>();
    const scalar_t* ud = in.u.data.const_data_ptr<scalar_t>();
    const int64_t vrs = in.v.rs, urs = in.u.rs;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, M, grain_for(H * (K + 8)), [&](int64_t m0, int64_t m1) {
      std::vector<acc_t> p(H), vb(std::is_same_v<scalar_t, acc_t> ? 0 : H), ub(vb.size());
      for (int64_t m = m0; m < m1; ++m) {
        const acc_t* v = as_acc<scalar_t, acc_t>(vd + m * vrs, H, vb.data());
        const acc_t* u = as_acc<scalar_t, acc_t>(ud + m * urs, H, ub.data());
        gate_row<acc_t>(v, u, bvp, bup, nullptr, H, in.act, nullptr, nullptr, p.data());
        for (int64_t k = 0; k < K; ++k) {
          const acc_t s = cpu::dot_any(p.data(), wp + k * H, H) + (bp ? bp[k] : acc_t(0));
          o[m * K + k] = static_cast<scalar_t>(s);
        }
      }
    });
  };
  THO_DISPATCH_V2(v_pre.scalar_type(), "gated_attention_scores_cpu", AT_WRAP([&] { body(scalar_t{}); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return out;
}

// Rows per block of the parameter gradient sums: at least 256 (a partial is K * H + K + 2 * H
// values) and at most 1,024 blocks.
int64_t rows_per_block(int64_t M) {
  return std::max<int64_t>(256, (M + 1023) / 1024);
}

std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor, st::Tensor, st::Tensor>
gated_attention_scores_backward_cpu(const st::Tensor& grad, const st::Tensor& v_pre, const st::Tensor& u_pre,
                                    const st::Tensor& weight, std::string act,
                                    const std::optional<st::Tensor>& v_bias,
                                    const std::optional<st::Tensor>& u_bias, std::vector<bool> output_mask) {
  GateBackward g = prepare_gate_backward(grad, v_pre, u_pre, weight, act, v_bias, u_bias, output_mask);
  const GateInputs& in = g.in;
  const int64_t M = in.v.M, H = in.v.H, K = in.K;
  // grad_v / grad_u rows are computed when they, or their column sums (the hidden biases'
  // gradients), are asked for
  const bool rows_v = g.need_v || g.need_vb, rows_u = g.need_u || g.need_ub;
  auto result = [&] {
    return std::make_tuple(g.grad_v, g.grad_u, g.grad_weight, g.grad_bias, g.grad_v_bias, g.grad_u_bias);
  };
  if (!rows_v && !rows_u && !g.need_w && !g.need_b) return result();

  auto body = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = st::acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc_t>;
    const st::ScalarType acc = st::acc_dtype(v_pre.scalar_type());
    const st::Tensor w = acc_param(in.weight, acc), bv = acc_param(in.v_bias, acc),
                     bu = acc_param(in.u_bias, acc);
    const acc_t *wp = ptr<acc_t>(w), *bvp = ptr<acc_t>(bv), *bup = ptr<acc_t>(bu);
    const acc_t* gr = g.grad.const_data_ptr<acc_t>();
    const scalar_t* vd = in.v.data.const_data_ptr<scalar_t>();
    const scalar_t* ud = in.u.data.const_data_ptr<scalar_t>();
    const int64_t vrs = in.v.rs, urs = in.u.rs;
    scalar_t* gvd = g.need_v ? g.grad_v.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gud = g.need_u ? g.grad_u.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t R = rows_per_block(M), nb = M > 0 ? (M + R - 1) / R : 0;
    auto partials = [&](bool need, int64_t n) { return std::vector<acc_t>(need ? nb * n : 0, acc_t(0)); };
    std::vector<acc_t> pw = partials(g.need_w, K * H), pb = partials(g.need_b, K),
                       pvb = partials(g.need_vb, H), pub = partials(g.need_ub, H);
    torch::stable::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> c(H), p(H), vb(same ? 0 : H), ub(same ? 0 : H);
      // rows of grad_v / grad_u in acc_t where they are not written straight into the output
      std::vector<acc_t> gvb(rows_v && (!same || !gvd) ? H : 0), gub(rows_u && (!same || !gud) ? H : 0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        acc_t* pwb = g.need_w ? pw.data() + blk * K * H : nullptr;
        acc_t* pbb = g.need_b ? pb.data() + blk * K : nullptr;
        acc_t* pvbb = g.need_vb ? pvb.data() + blk * H : nullptr;
        acc_t* pubb = g.need_ub ? pub.data() + blk * H : nullptr;
        for (int64_t m = blk * R; m < std::min(M, (blk + 1) * R); ++m) {
          const acc_t* gm = gr + m * K;
          if (pbb)
            for (int64_t k = 0; k < K; ++k) pbb[k] += gm[k];
          if (!rows_v && !rows_u && !pwb) continue;
          const acc_t* v = as_acc<scalar_t, acc_t>(vd + m * vrs, H, vb.data());
          const acc_t* u = as_acc<scalar_t, acc_t>(ud + m * urs, H, ub.data());
          acc_t* gv = nullptr;
          acc_t* gu = nullptr;
          if (rows_v || rows_u) {
            // c = dL/d(act(v) * sigmoid(u)) = sum_k grad[m, k] * weight[k]
            std::fill(c.begin(), c.end(), acc_t(-0.0));  // -0 + x is x for every x
            for (int64_t k = 0; k < K; ++k) {
              const acc_t gk = gm[k];
              const acc_t* wk = wp + k * H;
              for (int64_t j = 0; j < H; ++j) c[j] += gk * wk[j];
            }
            gv = rows_v ? gvb.data() : nullptr;
            gu = rows_u ? gub.data() : nullptr;
            if constexpr (same) {  // written straight into the outputs where they are asked for
              if (gvd) gv = gvd + m * H;
              if (gud) gu = gud + m * H;
            }
          }
          gate_row<acc_t>(v, u, bvp, bup, c.data(), H, in.act, gv, gu, pwb ? p.data() : nullptr);
          if constexpr (!same) {
            for (int64_t j = 0; gvd && j < H; ++j) gvd[m * H + j] = static_cast<scalar_t>(gv[j]);
            for (int64_t j = 0; gud && j < H; ++j) gud[m * H + j] = static_cast<scalar_t>(gu[j]);
          }
          if (pvbb)
            for (int64_t j = 0; j < H; ++j) pvbb[j] += gv[j];
          if (pubb)
            for (int64_t j = 0; j < H; ++j) pubb[j] += gu[j];
          if (pwb) {
            for (int64_t k = 0; k < K; ++k) {
              const acc_t gk = gm[k];
              acc_t* __restrict__ pk = pwb + k * H;
              for (int64_t j = 0; j < H; ++j) pk[j] += gk * p[j];
            }
          }
        }
      }
    });
    // The blocks' partials added pairwise in a fixed order.
    auto reduce = [&](std::vector<acc_t>& part, int64_t n, scalar_t* out) {
      if (nb > 0) cpu::pairwise_reduce_inplace(part.data(), nb, n, n);
      for (int64_t e = 0; e < n; ++e) out[e] = static_cast<scalar_t>(nb > 0 ? part[e] : acc_t(0));
    };
    if (g.need_w) reduce(pw, K * H, g.grad_weight.mutable_data_ptr<scalar_t>());
    if (g.need_b) reduce(pb, K, g.grad_bias.mutable_data_ptr<scalar_t>());
    if (g.need_vb) reduce(pvb, H, g.grad_v_bias.mutable_data_ptr<scalar_t>());
    if (g.need_ub) reduce(pub, H, g.grad_u_bias.mutable_data_ptr<scalar_t>());
  };
  THO_DISPATCH_V2(v_pre.scalar_type(), "gated_attention_scores_backward_cpu",
                  AT_WRAP([&] { body(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half,
                  st::ScalarType::BFloat16);
  return result();
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("gated_attention_scores", TORCH_BOX(&maskattn::gated_attention_scores_cpu));
  m.impl("_gated_attention_scores_backward", TORCH_BOX(&maskattn::gated_attention_scores_backward_cpu));
}
