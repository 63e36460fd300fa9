from typing import Optional

import torch
from torch import Tensor, nn

from .. import _validation as _v
from .._ops.masked_attention_pool import masked_attention_pool

_NAME = "AttentionPooling"


class AttentionPooling(nn.Module):
    """Attention-based MIL pooling (Ilse et al., 2018) over padded bags, fused.

    A drop-in for the hand-written ``AttentionAggregator``: an MLP scores every instance, a softmax
    over each bag's *valid* instances turns the scores into weights, and the bag is their weighted
    sum. Unlike ``masked_fill(mask == 0, -1e9)``, padding gets weight exactly 0 and a bag with no
    valid instance pools to zeros instead of averaging its padding.

    Args:
        in_dim: feature size D.
        hidden_dim: hidden size of the scoring MLP.
        gated: use the gated variant, ``w^T (tanh(V h) * sigmoid(U h))``.
        branches: K attention branches (multi-branch / multi-class MIL); outputs gain a K dim.
        dropout: dropout on the scoring MLP's hidden activations.

    With ``gated=False`` and ``dropout=0`` the parameters are ``attention_net.0`` (Linear D->hidden),
    ``attention_net.1`` (Tanh), ``attention_net.2`` (Linear hidden->K), so a checkpoint of the
    usual ``nn.Sequential(Linear, Tanh, Linear)`` aggregator loads unchanged.

    ``forward(features [B,N,D], mask [B,N] or None, return_scores=False)`` returns
    ``(pooled [B,D], weights [B,N])`` (``[B,K,D]`` and ``[B,N,K]`` when ``branches > 1``), plus the
    pre-softmax scores when ``return_scores=True`` (for heatmaps and top-k instance selection; they
    are computed anyway, so this costs nothing).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 128, gated: bool = False, branches: int = 1, dropout: float = 0.0
    ):
        super().__init__()
        in_dim = _v.as_int(in_dim, _NAME, "in_dim", min_value=1)
        hidden_dim = _v.as_int(hidden_dim, _NAME, "hidden_dim", min_value=1)
        branches = _v.as_int(branches, _NAME, "branches", min_value=1)
        gated = _v.as_bool(gated, _NAME, "gated")
        dropout = _v.as_probability(dropout, _NAME, "dropout")
        self.in_dim, self.hidden_dim, self.gated, self.branches = in_dim, hidden_dim, gated, branches
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        if gated:
            self.attention_v = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), *drop)
            self.attention_u = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid(), *drop)
            self.attention_w = nn.Linear(hidden_dim, branches)
        else:
            self.attention_net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.Tanh(), *drop, nn.Linear(hidden_dim, branches)
            )

    def scores(self, features: Tensor) -> Tensor:
        """Pre-softmax attention scores ``[B, N]`` (or ``[B, N, K]``)."""
        if self.gated:
            s = self.attention_w(self.attention_v(features) * self.attention_u(features))
        else:
            s = self.attention_net(features)
        return s.squeeze(-1) if self.branches == 1 else s

    def forward(self, features: Tensor, mask: Optional[Tensor] = None, return_scores: bool = False):
        _v.check_floating(features, _NAME, "features")
        if mask is not None:
            _v.check_mask(mask, _NAME, "mask")
        if features.dim() != 3 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"AttentionPooling: features must be [B, N, {self.in_dim}], got shape {tuple(features.shape)}"
            )
        x = features
        if mask is not None and mask.shape == features.shape[:2] and mask.device == features.device:
            # inf/NaN stored in padding rows is replaced by 0 before the scoring MLP: the pool
            # ignores those rows' scores, but their content would otherwise reach the MLP's
            # parameter gradients and the features' gradient through 0 * NaN (e.g. tanh'(NaN)).
            # Finite padding is left alone, so the returned scores stay mod.scores(features).
            # (A malformed mask skips this and reaches the op, whose error names it.)
            valid = mask if mask.dtype == torch.bool else mask != 0
            x = features.masked_fill(~valid.unsqueeze(-1) & ~torch.isfinite(features), 0)
        scores = self.scores(x)
        pooled, weights = masked_attention_pool(scores, features, mask)
        if return_scores:
            return pooled, weights, scores
        return pooled, weights

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, gated={self.gated}, branches={self.branches}"
