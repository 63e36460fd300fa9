"""Pure-PyTorch references for masked_channel_attention_pool (PyG's feature-level gate).

``pyg_attentional_aggregation`` is the math of PyG's ``AttentionalAggregation`` with a ``gate_nn``
that outputs one logit per channel, as ``torch_geometric.utils.softmax`` and the sum aggregation
compute it without torch_scatter: a scatter max per (graph, channel), exp of the difference, a
scatter sum (plus PyG's 1e-16), the division, then a scatter sum of ``gate * x``.

``reference_channel_pool`` is the contract (docs/numerics.md) in float64: the same softmax per
(bag, channel) over the valid rows, but exact zeros for padding and for channels without a valid
finite logit, NaN where torch.softmax gives NaN, and features used only where the weight is nonzero.
"""

import torch


def pyg_attentional_aggregation(gate, x, batch, num_bags):
    """PyG's ``softmax(gate, batch)`` per column, then ``scatter(gate * x, batch, reduce='sum')``."""
    D = gate.shape[1]
    index = batch.view(-1, 1).expand_as(gate)
    gmax = gate.new_zeros(num_bags, D).scatter_reduce(0, index, gate.detach(), "amax", include_self=False)
    out = (gate - gmax.index_select(0, batch)).exp()
    out_sum = gate.new_zeros(num_bags, D).index_add(0, batch, out) + 1e-16
    w = out / out_sum.index_select(0, batch)
    return x.new_zeros(num_bags, x.shape[1]).index_add(0, batch, w * x), w


def reference_channel_pool(logits, features, mask=None):
    """logits, features [B, N, D]; mask [B, N] or None. Returns float64 (pooled [B, D], weights)."""
    l, f = logits.double(), features.double()
    if l.shape[1] == 0:  # no rows: amax has nothing to reduce
        return l.new_zeros(l.shape[0], l.shape[2]) + 0 * f.sum(1), l * 0
    valid = torch.ones(l.shape[:2], dtype=torch.bool, device=l.device) if mask is None else (mask != 0)
    valid = valid.unsqueeze(-1)
    z = l.masked_fill(~valid, float("-inf"))
    mx = z.amax(1, keepdim=True)  # NaN propagates: a NaN logit poisons its (bag, channel)
    empty = mx == float("-inf")  # no valid row, or only -inf logits
    e = torch.exp(z - torch.where(empty, 0.0, mx).detach())
    s = e.sum(1, keepdim=True)
    w = torch.where(valid, e / torch.where(empty, 1.0, s), 0.0)
    # a feature is used only where its weight is nonzero: padding content, even NaN, never reaches pooled
    pooled = (w * torch.where(w != 0, f, 0.0)).sum(1)
    return pooled, w


def reference_channel_pool_packed(logits, features, offsets):
    """logits, features [T, D]; offsets [B+1]. Per bag through reference_channel_pool."""
    o = offsets.tolist()
    D = features.shape[1]
    pooled, weights = [], []
    for b in range(len(o) - 1):
        p, w = reference_channel_pool(logits[o[b] : o[b + 1]].unsqueeze(0), features[o[b] : o[b + 1]].unsqueeze(0))
        pooled.append(p[0])
        weights.append(w[0])
    p = torch.stack(pooled) if pooled else features.new_zeros(0, D).double()
    w = torch.cat(weights) if weights else logits.double()
    return p, w
