#pragma once
// Shape contract of gated_attention_scores (the scoring head of gated attention MIL: CLAM's
// Attn_Net_Gated, Ilse et al.'s gated ABMIL), shared by all backends.
#include <optional>
#include <string>
#include <vector>

#include "common/stable.h"

namespace maskattn {

// The hidden branch's activation.
enum class GateAct : int { kTanh = 0, kRelu = 1, kGelu = 2 };

GateAct parse_gate_act(const std::string& act, const char* op);

// v_pre / u_pre ([..., H]) as M rows of H elements, each row contiguous, rows rs elements apart.
// `data` is the tensor the rows live in: the input itself when its leading dims merge into one
// strided dim with unit-stride rows, else a contiguous copy.
struct GateRows {
  st::Tensor data;
  int64_t M = 0, H = 0, rs = 0;
};

GateRows gate_rows(const st::Tensor& t);

struct GateInputs {
  GateRows v, u;
  st::Tensor weight;  // [K, H], contiguous
  st::Tensor bias;    // [K], contiguous, or undefined
  // [H] each, contiguous, or undefined: the input layers' biases, added to v_pre / u_pre here so that
  // those layers run as plain GEMMs (no bias copy into their outputs, no bias-gradient pass)
  st::Tensor v_bias, u_bias;
  int64_t K = 0;
  GateAct act = GateAct::kTanh;
  std::vector<int64_t> out_sizes;  // v_pre's sizes with the last one replaced by K
};

GateInputs check_gate_inputs(const st::Tensor& v_pre, const st::Tensor& u_pre, const st::Tensor& weight,
                             const std::optional<st::Tensor>& bias, const std::string& act,
                             const std::optional<st::Tensor>& v_bias, const std::optional<st::Tensor>& u_bias,
                             const char* op, const st::Tensor* grad = nullptr);

// The backward op's checked arguments and allocated outputs, the same for every device.
struct GateBackward {
  GateInputs in;
  bool need_v = false, need_u = false, need_w = false, need_b = false, need_vb = false, need_ub = false;
  st::Tensor grad;  // [M, K] in the accumulation dtype, contiguous (opcheck passes expanded ones)
  // empty [0] where not asked for; grad_v_bias / grad_u_bias [H] are grad_v / grad_u summed over rows
  st::Tensor grad_v, grad_u, grad_weight, grad_bias, grad_v_bias, grad_u_bias;
};

GateBackward prepare_gate_backward(const st::Tensor& grad, const st::Tensor& v_pre, const st::Tensor& u_pre,
                                   const st::Tensor& weight, const std::string& act,
                                   const std::optional<st::Tensor>& v_bias,
                                   const std::optional<st::Tensor>& u_bias,
                                   const std::vector<bool>& output_mask);

}  // namespace maskattn
