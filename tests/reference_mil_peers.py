"""The attention pools of three MIL / graph libraries, rebuilt from their published definitions: the
references for AttentionPooling's converters.

Only the parameter layout (module names, shapes, bias or not) and the math of each forward matter
here; the classes are written from the libraries' documented definitions, in this file's own words:

- CLAM (Lu et al. 2021, mahmoodlab/CLAM ``models/model_clam.py``): ``Attn_Net`` (Linear, Tanh,
  optional Dropout(0.25), Linear), ``Attn_Net_Gated`` (``attention_a``: Linear + Tanh,
  ``attention_b``: Linear + Sigmoid, each followed by Dropout(0.25) when asked, ``attention_c``:
  Linear), and the ``attention_net`` Sequential of ``CLAM_SB`` / ``CLAM_MB`` that holds its fc layer
  at index 0 and the attention net at index 3. CLAM pools one bag ``[N, L]`` at a time:
  ``A = softmax(net(h).T, dim=1)`` ``[K, N]``, ``M = A @ h`` ``[K, L]``.
- torchmil (``torchmil.nn.attention.AttentionPool``): ``fc1`` and ``fc_gated`` are lazy linear
  wrappers holding the ``nn.Linear`` as ``.module``; ``fc2`` is Linear(att_dim, 1) without bias;
  ``act`` tanh / relu / gelu; padded batches ``[B, N, D]`` with a mask filled with ``-inf``.
- PyG (``torch_geometric.nn.aggr.AttentionalAggregation``): ``gate_nn`` maps rows ``[T, F]`` to
  ``[T, 1]``, a softmax over each graph's rows (given by the ``batch`` index), a scatter sum.
"""

from typing import Optional

import torch
from torch import nn

# ---------------------------------------------------------------- CLAM


class ClamAttnNet(nn.Module):
    """CLAM's ``Attn_Net(L, D, dropout, n_classes)``; ``forward(x [N, L]) -> (A [N, n_classes], x)``."""

    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        layers = [nn.Linear(L, D), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(D, n_classes))
        self.module = nn.Sequential(*layers)

    def forward(self, x):
        return self.module(x), x


class ClamAttnNetGated(nn.Module):
    """CLAM's ``Attn_Net_Gated(L, D, dropout, n_classes)``: ``c(a(x) * b(x))``."""

    def __init__(self, L=1024, D=256, dropout=False, n_classes=1):
        super().__init__()
        extra = [nn.Dropout(0.25)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), *extra)
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), *[nn.Dropout(0.25) for _ in extra])
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x) * self.attention_b(x)), x


class ClamHead(nn.Module):
    """The attention part of CLAM_SB / CLAM_MB: ``attention_net = Sequential(fc, ReLU, Dropout,
    attention net)`` and the single-bag pooling of their forward (classifiers left out)."""

    def __init__(self, embed_dim=1024, size1=512, size2=256, gate=True, dropout=0.0, n_classes=1):
        super().__init__()
        net_cls = ClamAttnNetGated if gate else ClamAttnNet
        self.attention_net = nn.Sequential(
            nn.Linear(embed_dim, size1),
            nn.ReLU(),
            nn.Dropout(dropout),
            net_cls(L=size1, D=size2, dropout=bool(dropout), n_classes=n_classes),
        )

    def forward(self, h):
        A, h = self.attention_net(h)  # A [N, K], h the fc output [N, size1]
        A = torch.transpose(A, 1, 0)  # [K, N]
        A_raw = A
        A = torch.softmax(A, dim=1)
        return A @ h, A, A_raw  # M [K, size1]


def clam_pool(net: nn.Module, h):
    """CLAM's pooling of one bag ``h [N, L]`` with an (ungated or gated) attention net:
    ``(M [K, L], A [K, N], A_raw [K, N])``."""
    A, h = net(h)
    A = A.transpose(0, 1)
    A_raw = A
    A = torch.softmax(A, dim=1)
    return A @ h, A, A_raw


# ---------------------------------------------------------------- torchmil


class TorchmilLazyLinear(nn.Module):
    """torchmil's lazy linear wrapper: the layer lives in ``.module`` (an ``nn.LazyLinear`` when
    ``in_features`` is None)."""

    def __init__(self, in_features: Optional[int], out_features: int, bias: bool = True):
        super().__init__()
        if in_features is None:
            self.module = nn.LazyLinear(out_features, bias=bias)
        else:
            self.module = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.module(x)


_TORCHMIL_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class TorchmilAttentionPool(nn.Module):
    """torchmil's ``AttentionPool(in_dim, att_dim, act, gated)``.

    ``forward(X [B, N, D], mask [B, N] = None, return_att=False)``: ``f = fc2(act(fc1 X) [*
    sigmoid(fc_gated X)])``, ``s = softmax(f masked with -inf)`` over N, ``z = X^T s`` ``[B, D]``.
    An empty bag gives NaN (the ``-inf`` fill), as the library's masked softmax does.
    """

    def __init__(self, in_dim=None, att_dim=128, act="tanh", gated=False):
        super().__init__()
        self.fc1 = TorchmilLazyLinear(in_dim, att_dim)
        self.fc2 = nn.Linear(att_dim, 1, bias=False)
        self.act_layer = _TORCHMIL_ACTS[act]()
        self.gated = gated
        if gated:
            self.fc_gated = TorchmilLazyLinear(in_dim, att_dim)
            self.act_gated = nn.Sigmoid()

    def forward(self, X, mask=None, return_att=False):
        H = self.act_layer(self.fc1(X))
        if self.gated:
            H = H * self.act_gated(self.fc_gated(X))
        f = self.fc2(H)  # [B, N, 1]
        if mask is not None:
            f = f.masked_fill(mask.unsqueeze(-1) == 0, float("-inf"))
        s = torch.softmax(f, dim=1)
        z = torch.bmm(X.transpose(1, 2), s).squeeze(-1)  # [B, D]
        if return_att:
            return z, f.squeeze(-1)
        return z


# ---------------------------------------------------------------- PyG


class PygAttentionalAggregation(nn.Module):
    """PyG's ``AttentionalAggregation(gate_nn, nn=None)`` with node-level gating, in plain torch.

    ``forward(x [T, F], index [T], dim_size)``: ``gate = gate_nn(x)`` ``[T, 1]``, a softmax of the
    gate over the rows of each graph (max subtracted per graph), ``out[g] = sum gate * x``.
    """

    def __init__(self, gate_nn: nn.Module, nn: Optional[nn.Module] = None):
        super().__init__()
        self.gate_nn = gate_nn
        self.nn = nn

    def forward(self, x, index, dim_size):
        gate = self.gate_nn(x)
        if gate.dim() == 1:
            gate = gate.unsqueeze(-1)
        if self.nn is not None:
            x = self.nn(x)
        idx = index.view(-1, 1).expand_as(gate)
        gmax = gate.new_full((dim_size, gate.shape[1]), float("-inf"))
        gmax = gmax.scatter_reduce(0, idx, gate.detach(), "amax", include_self=True)
        e = (gate - gmax.gather(0, idx)).exp()
        den = e.new_zeros((dim_size, gate.shape[1])).scatter_add(0, idx, e)
        w = e / den.gather(0, idx)
        out = x.new_zeros((dim_size, x.shape[1])).index_add(0, index, w * x)
        return out, w
