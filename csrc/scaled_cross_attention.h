#pragma once
// Shape contract of scaled_cross_attention and the device-agnostic driver both backends share.
//
// The op is  scale = min(exp(logit_scale_log), max_scale);  logits = scale * <q, k>  (q, k
// L2-normalised when `normalize`);  attn = softmax over valid keys;  out = attn @ value.
// Everything per query row (norm, Lk dot products, softmax, output row, and in the backward the
// softmax gradient and grad_query) runs in backend row kernels; the reductions over query rows
// (grad_key, grad_value, the scale's gradient) are library GEMMs and backend sums over their small
// outputs.
#include <optional>
#include <tuple>
#include <vector>

#include "common/stable.h"

namespace maskattn {

// Checked, normalised view of the arguments. Nothing large is copied except a query whose last
// dim is not unit-stride; keys and values (small: Lk rows) are made contiguous.
struct XattnArgs {
  st::Tensor q;     // [B, Lq, D], stride(-1) == 1, any other strides
  st::Tensor k;     // [Bk, Lk, D] contiguous, Bk == 1 (shared prototypes) or B
  st::Tensor v;     // [Bv, Lk, Dv] contiguous, Bv == 1 or B
  st::Tensor mask;  // bool [Bm, Lk] contiguous (Bm == 1 or B), or undefined
  st::Tensor lsl;   // 0-dim logit_scale_log
  int64_t B, Lq, Lk, D, Dv;
  bool q2d;       // query came in as [B, D]: outputs drop the Lq dim
  bool k2d, v2d;  // key / value came in shared ([Lk, D] / [Lk, Dv]): their grads are 2-D
  // exp(lsl) as ATen computes it, made once per call by xattn_lsl_exp (it is ATen's exp, not ours,
  // so that the scale is rounded exactly as the eager composition rounds it).
  mutable std::optional<st::Tensor> lsl_exp;
};

// 0-dim exp(logit_scale_log) in lsl's dtype, on lsl's device (one boxed dispatcher call, the
// first time per call of the op).
const st::Tensor& xattn_lsl_exp(const XattnArgs& a);

// copy_rows = false leaves q, k and v as views (any strides) for further checks before the copies;
// copy_rows_readable then makes them what the kernels read.
XattnArgs check_xattn_inputs(const st::Tensor& query, const st::Tensor& key, const st::Tensor& value,
                             const st::Tensor& logit_scale_log, double max_scale,
                             const std::optional<st::Tensor>& key_mask, const char* op,
                             bool copy_rows = true);
void copy_rows_readable(XattnArgs& a);

// Row kernels a backend provides. All [R, .] tensors are contiguous with R = B * Lq rows; row r
// is batch r / Lq. Keys / values / mask with batch size 1 are shared by every row. "nrm" tensors
// hold L2 norms in the accumulation type (undefined when !normalize); kernels turn them into
// 1 / max(norm, eps) exactly as F.normalize does. Scale: each kernel computes
// min(exp(lsl), max_scale) itself (on the GPU from device memory, so there is no host sync).
struct XattnKernels {
  // Largest Lk the one-pass row kernels take; above it the GEMM path runs.
  int64_t max_fused_keys;
  // L2 norm of every row of x [N, M, D] (stride(-1) == 1) -> acc [N * M].
  st::Tensor (*row_norms)(const st::Tensor& x);
  // One pass per query row: logits, softmax, output row. out [R, Dv], attn [R, Lk] (input dtype).
  void (*fused_forward)(const XattnArgs& a, const st::Tensor& knrm, double max_scale, bool normalize,
                        const st::Tensor& out, const st::Tensor& attn);
  // GEMM path: raw dot products S [R, Lk] (see gemm_in_acc for its dtype) -> attn [R, Lk].
  void (*softmax_forward)(const XattnArgs& a, const st::Tensor& S, const st::Tensor& qnrm,
                          const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& attn);
  // One pass per row of the backward. Writes wqk [R, Lk] (acc): d loss / d <q_i, k_j> of the raw
  // vectors, p [R, Lk] (acc): dlogit * cos (sums to d loss / d scale), and dq [R, D] when defined.
  void (*fused_backward)(const XattnArgs& a, const st::Tensor& knrm, const st::Tensor& gout,
                         const st::Tensor& gattn, const st::Tensor& attn, double max_scale, bool normalize,
                         const st::Tensor& dq, const st::Tensor& wqk, const st::Tensor& p);
  // GEMM path backward: S raw dots [R, Lk], dA = gout @ v^T [R, Lk] (both per gemm_in_acc) -> wqk, p and
  // rowcoef [R] (acc; grad_query = wqk @ k - rowcoef * q).
  void (*softmax_backward)(const XattnArgs& a, const st::Tensor& S, const st::Tensor& dA,
                           const st::Tensor& gattn, const st::Tensor& attn, const st::Tensor& qnrm,
                           const st::Tensor& knrm, double max_scale, bool normalize, const st::Tensor& wqk,
                           const st::Tensor& p, const st::Tensor& rowcoef);
  // Whether attn [R, Lk] may hold a zero weight, i.e. a key some row does not weigh (on the CPU a
  // cheap pass over attn; on CUDA that would be a host sync, so it answers yes without looking).
  bool (*may_have_dead_rows)(const st::Tensor& attn);
  // The values for attn @ v, in dtype `dt` (the GEMM's), contiguous, with every row that no query
  // of its sample weighs (masked keys, -inf logits) set to zero, so that a NaN or inf stored there
  // cannot reach the GEMM result through 0 * NaN. A shared v ([1, Lk, Dv]) read by B > 1 samples
  // can only be cleared in place where a row is dead for every sample; a row dead for some samples
  // only would still leak into those. If such a row holds a non-finite value, the result is a
  // per-sample copy [B, Lk, Dv] cleared per sample. Finding out reads one flag back from the
  // device. On CUDA that is a sync, paid only when the mask differs per sample (rows dead for some
  // samples only otherwise need non-finite logits as well), and while a CUDA graph is being
  // captured the copy is made without asking.
  st::Tensor (*cleared_values)(const XattnArgs& a, const st::Tensor& attn, st::ScalarType dt);
  // x [N, M, D] contiguous with every non-finite entry replaced by 0.
  st::Tensor (*finite_keys)(const st::Tensor& x);
  // g - x * coef per row, computed in the accumulation type and returned in x's dtype: g [N * M, D]
  // contiguous (x's dtype or its accumulation type), x [N, M, D] (stride(-1) == 1), coef [N * M] (acc).
  // The result has g's sizes.
  st::Tensor (*minus_product)(const st::Tensor& g, const st::Tensor& x, const st::Tensor& coef);
  // F.normalize's projection coefficient of grad_key per key (acc [Bk * Lk]):
  // knrm >= eps ? scale / max(knrm, eps)^2 * colsum : 0, where colsum [Bk * Lk] (acc) sums p over the
  // rows of each key's batch (ATen's sum, by the driver) and scale = min(exp(lsl), max_scale) in
  // lsl's dtype.
  st::Tensor (*key_coef)(const XattnArgs& a, const st::Tensor& colsum, const st::Tensor& knrm,
                         double max_scale);
  // d loss / d logit_scale_log (0-dim, lsl's dtype): exp(lsl) <= max_scale ? psum * exp(lsl) : 0,
  // with psum (0-dim acc: sum(p), ATen's, by the driver) rounded to lsl's dtype first, as
  // torch.clamp's backward gives it.
  st::Tensor (*scale_grad)(const XattnArgs& a, const st::Tensor& psum, double max_scale);
  // Whether the driver may read a value back from the device now (false while a CUDA graph is
  // being captured, where a sync is an error).
  bool (*may_sync)();
  // Whether the GEMM path runs its GEMMs in the accumulation type (float32 for half types; then
  // S and dA reach the row kernels in it) or in the input dtype. Rounding S to bfloat16 costs
  // scale * 2^-9 in every logit (0.2 at the usual cap of 100), which the one-pass rows do not
  // pay; and on a CPU without bf16 instructions the float32 GEMM is also the fast one. On CUDA
  // the GEMMs stay in the input dtype (cuBLAS half-precision GEMMs) until a float-output GEMM is
  // measured there.
  bool gemm_in_acc;
};

std::tuple<st::Tensor, st::Tensor> xattn_forward(const st::Tensor& query, const st::Tensor& key,
                                                 const st::Tensor& value, const st::Tensor& logit_scale_log,
                                                 double max_scale, const std::optional<st::Tensor>& key_mask,
                                                 bool normalize, const XattnKernels& kern);

// output_mask is the schema's bool[4], which arrives as a list of any length; it is checked here.
std::tuple<st::Tensor, st::Tensor, st::Tensor, st::Tensor> xattn_backward(
    const st::Tensor& grad_out, const std::optional<st::Tensor>& grad_attn, const st::Tensor& query,
    const st::Tensor& key, const st::Tensor& value, const st::Tensor& logit_scale_log, const st::Tensor& attn,
    double max_scale, bool normalize, const std::vector<bool>& output_mask, const XattnKernels& kern);

// F.normalize's eps: x / max(||x||, eps).
constexpr double kXattnNormEps = 1e-12;

// Calls f(scalar_t{}) for the floating dtype t. THO_DISPATCH_V2 takes its body as a macro
// argument, where a top-level comma would split it: the kernels' bodies are generic lambdas.
template <typename F>
void dispatch_floating(st::ScalarType t, const F& f) {
  THO_DISPATCH_V2(t, "scaled_cross_attention", AT_WRAP([&] { f(scalar_t{}); }), AT_EXPAND(AT_FLOATING_TYPES),
                  st::ScalarType::Half, st::ScalarType::BFloat16);
}

// Calls f(acc_t{}) for an accumulation-type tensor (float32 or float64).
template <typename F>
void dispatch_acc(st::ScalarType t, const F& f) {
  if (t == st::ScalarType::Double) {
    f(double{});
  } else {
    MASKATTN_CHECK(t == st::ScalarType::Float, "scaled_cross_attention: internal error: accumulation in ",
                   torch::headeronly::toString(t));
    f(float{});
  }
}

}  // namespace maskattn
