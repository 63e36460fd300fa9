#pragma once
// Shape contract of scaled_cross_attention and the device-agnostic driver both backends share.
//
// The op is  scale = min(exp(logit_scale_log), max_scale);  logits = scale * <q, k>  (q, k
// L2-normalised when `normalize`);  attn = softmax over valid keys;  out = attn @ value.
// Everything per query row (norm, Lk dot products, softmax, output row, and in the backward the
// softmax gradient and grad_query) runs in backend row kernels; the reductions over query rows
// (grad_key, grad_value, the scale's gradient) are library GEMMs / sums over their small outputs.
#include <ATen/ATen.h>

#include <optional>

namespace maskattn {

// Checked, normalised view of the arguments. Nothing large is copied except a query whose last
// dim is not unit-stride; keys and values (small: Lk rows) are made contiguous.
struct XattnArgs {
  at::Tensor q;     // [B, Lq, D], stride(-1) == 1, any other strides
  at::Tensor k;     // [Bk, Lk, D] contiguous, Bk == 1 (shared prototypes) or B
  at::Tensor v;     // [Bv, Lk, Dv] contiguous, Bv == 1 or B
  at::Tensor mask;  // bool [Bm, Lk] contiguous (Bm == 1 or B), or undefined
  at::Tensor lsl;   // 0-dim logit_scale_log
  int64_t B, Lq, Lk, D, Dv;
  bool q2d;       // query came in as [B, D]: outputs drop the Lq dim
  bool k2d, v2d;  // key / value came in shared ([Lk, D] / [Lk, Dv]): their grads are 2-D
};

// copy_rows = false leaves q, k and v as views (any strides) for further checks before the copies;
// copy_rows_readable then makes them what the kernels read.
XattnArgs check_xattn_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                             const at::Tensor& logit_scale_log, double max_scale,
                             const std::optional<at::Tensor>& key_mask, const char* op,
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
  at::Tensor (*row_norms)(const at::Tensor& x);
  // One pass per query row: logits, softmax, output row. out [R, Dv], attn [R, Lk] (input dtype).
  void (*fused_forward)(const XattnArgs& a, const at::Tensor& knrm, double max_scale, bool normalize,
                        const at::Tensor& out, const at::Tensor& attn);
  // GEMM path: raw dot products S [R, Lk] (see gemm_in_acc for its dtype) -> attn [R, Lk].
  void (*softmax_forward)(const XattnArgs& a, const at::Tensor& S, const at::Tensor& qnrm,
                          const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& attn);
  // One pass per row of the backward. Writes wqk [R, Lk] (acc): d loss / d <q_i, k_j> of the raw
  // vectors, p [R, Lk] (acc): dlogit * cos (sums to d loss / d scale), and dq [R, D] when defined.
  void (*fused_backward)(const XattnArgs& a, const at::Tensor& knrm, const at::Tensor& gout,
                         const at::Tensor& gattn, const at::Tensor& attn, double max_scale, bool normalize,
                         const at::Tensor& dq, const at::Tensor& wqk, const at::Tensor& p);
  // GEMM path backward: S raw dots [R, Lk], dA = gout @ v^T [R, Lk] (both per gemm_in_acc) -> wqk, p and
  // rowcoef [R] (acc; grad_query = wqk @ k - rowcoef * q).
  void (*softmax_backward)(const XattnArgs& a, const at::Tensor& S, const at::Tensor& dA,
                           const at::Tensor& gattn, const at::Tensor& attn, const at::Tensor& qnrm,
                           const at::Tensor& knrm, double max_scale, bool normalize, const at::Tensor& wqk,
                           const at::Tensor& p, const at::Tensor& rowcoef);
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

std::tuple<at::Tensor, at::Tensor> xattn_forward(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, const at::Tensor& logit_scale_log,
                                                 double max_scale, const std::optional<at::Tensor>& key_mask,
                                                 bool normalize, const XattnKernels& kern);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xattn_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_attn, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const at::Tensor& logit_scale_log, const at::Tensor& attn,
    double max_scale, bool normalize, std::array<bool, 4> output_mask, const XattnKernels& kern);

// F.normalize's eps: x / max(||x||, eps).
constexpr double kXattnNormEps = 1e-12;

}  // namespace maskattn
