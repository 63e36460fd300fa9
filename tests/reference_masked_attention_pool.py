"""Pure-PyTorch transcription of a MIL patch classifier's ABMIL-style attention aggregator: the
reference for tests.

AttentionAggregator.forward, as that classifier writes it: scores from an MLP, masked_fill(mask == 0, -1e9),
softmax over N, bmm.
"""

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAggregator(nn.Module):
    def __init__(self, feature_dim, hidden_dim=128):
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, features, mask=None):
        attn_logits = self.attention_net(features)  # [B, N, 1]
        attn_logits = attn_logits.squeeze(-1)  # [B, N]
        if mask is not None:
            mask_value = -1e9
            attn_logits = attn_logits.masked_fill(mask == 0, mask_value)
        attn_weights = F.softmax(attn_logits, dim=1)
        aggregated = torch.bmm(attn_weights.unsqueeze(1), features).squeeze(1)
        return aggregated, attn_weights


def aggregator_pool(logits, features, mask=None):
    """The aggregator's pooling step on given logits ([B,N]); a fully padded bag gets uniform weights."""
    if mask is not None:
        logits = logits.masked_fill(mask == 0, -1e9)
    w = F.softmax(logits, dim=1)
    return torch.bmm(w.unsqueeze(1), features).squeeze(1), w


def reference_pool(logits, features, mask=None):
    """The contract (docs/design.md): the aggregator's math, but exact zeros for padding and for empty bags.

    logits [B,N] or [B,N,K]; computed in float64 so that it can judge low-precision kernels.
    """
    squeeze = logits.dim() == 2
    l = logits.double().unsqueeze(-1) if squeeze else logits.double()
    f = features.double()
    valid = torch.ones(l.shape[:2], dtype=torch.bool, device=l.device) if mask is None else (mask != 0)
    valid = valid.unsqueeze(-1).expand_as(l) & (l != float("-inf"))
    z = l.masked_fill(~valid, float("-inf"))
    w = torch.softmax(z, dim=1).nan_to_num(0.0)  # all -inf (no valid row) -> NaN -> 0
    w = torch.where(valid, w, torch.zeros_like(w))
    # padding content must not matter, not even NaN/inf: zero it before the product
    f = torch.where(valid.any(-1, keepdim=True), f, torch.zeros_like(f))
    pooled = torch.einsum("bnk,bnd->bkd", w, f)
    if squeeze:
        return pooled.squeeze(1), w.squeeze(-1)
    return pooled, w


def reference_pool_packed(logits, features, offsets):
    outs, ws = [], []
    o = offsets.tolist()
    for b in range(len(o) - 1):
        l, f = logits[o[b] : o[b + 1]], features[o[b] : o[b + 1]]
        p, w = reference_pool(l.unsqueeze(0), f.unsqueeze(0))
        outs.append(p[0])
        ws.append(w[0])
    pooled = (
        torch.stack(outs)
        if outs
        else features.new_zeros(
            (0,) + ((logits.shape[1],) if logits.dim() == 2 else ()) + (features.shape[1],)
        ).double()
    )
    weights = torch.cat(ws) if ws else logits.double()
    return pooled, weights
