"""Per-bag loop references for maskattn.topk_per_bag.

- ``clam_topk``: CLAM's own calls, one bag at a time (``torch.topk(A, k)[1][-1]`` for the most
  attended instances, ``torch.topk(-A, k, dim=1)[1][-1]`` for the least), over the bag's valid
  positions only. ``torch.topk`` leaves the order of ties unspecified: compare with it on distinct
  scores.
- ``stable_topk``: the documented tie rule (lower position first), from a stable sort of each
  bag's valid scores.

Both return Python lists ``out[b][j] = (positions, values)`` per bag b and branch j, at most k long.
"""

import torch


def _bags(scores, mask):
    """Yield (b, j, valid positions, their scores) over bags and branches of padded scores."""
    s = scores if scores.dim() == 3 else scores.unsqueeze(-1)
    b, n, kk = s.shape
    m = torch.ones(b, n, dtype=torch.bool) if mask is None else (mask.cpu() != 0)
    for i in range(b):
        pos = m[i].nonzero().flatten()
        for j in range(kk):
            yield i, j, pos, s[i, :, j].cpu()[pos]


def _collect(scores, mask, pick):
    s = scores if scores.dim() == 3 else scores.unsqueeze(-1)
    out = [[None] * s.shape[2] for _ in range(s.shape[0])]
    for i, j, pos, vals in _bags(scores, mask):
        sel = pick(vals)
        out[i][j] = (pos[sel].tolist(), vals[sel].double().tolist())
    return out


def clam_topk(scores, k, mask=None, largest=True):
    def pick(vals):
        kk = min(k, vals.numel())
        a = vals.double().unsqueeze(0)  # [1, n], CLAM's A after the transpose
        if largest:
            return torch.topk(a, kk)[1][-1]
        return torch.topk(-a, kk, dim=1)[1][-1]

    return _collect(scores, mask, pick)


def stable_topk(scores, k, mask=None, largest=True):
    def pick(vals):
        order = torch.sort(vals.double(), descending=largest, stable=True).indices
        return order[:k]

    return _collect(scores, mask, pick)
