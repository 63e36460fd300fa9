"""Pure-PyTorch reference for gated_attention_scores: the last three steps of CLAM's gated attention
net (``Attn_Net_Gated``, tests/reference_mil_peers.py: ``attention_c(attention_a(x) *
attention_b(x))``) after its two input Linear layers, with torchmil's activation choices."""

import torch
import torch.nn.functional as F

ACTS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu}


def reference_gated_attention_scores(v_pre, u_pre, weight, bias=None, act="tanh", v_bias=None, u_bias=None):
    v = v_pre if v_bias is None else v_pre + v_bias
    u = u_pre if u_bias is None else u_pre + u_bias
    return F.linear(ACTS[act](v) * torch.sigmoid(u), weight, bias)


def reference_activation(v, act="tanh"):
    """``(act(v), act'(v))``, the derivative taken by autograd through torch's own activation."""
    t = v.detach().clone().requires_grad_()
    a = ACTS[act](t)
    (da,) = torch.autograd.grad(a.sum(), t)
    return a.detach(), da
