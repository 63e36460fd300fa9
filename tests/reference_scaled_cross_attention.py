"""A few-shot model's prototype cross-attention (SAP, semantic anchor purification, with a CLIP-style
clamped logit scale), transcribed in plain PyTorch.

This is the layer maskattn.scaled_cross_attention / nn.LearnableScaleCrossAttention replace:
learnable log-parameterised scale (init 25), capped at 100 inside the forward pass with
torch.clamp, row-max subtraction before the softmax, stats read back with .item(), and the scale
left out of weight decay. Masks and per-batch prototypes are the only additions (the original
has neither): masked keys are filled with -inf after the max subtraction.
"""

import torch
import torch.nn.functional as F
from torch import nn


def prototype_cross_attention(
    query, prototypes, values, logit_scale_log, logit_scale_max=100.0, key_mask=None, normalize=True
):
    """compute_cross_attention of the SAP module: (out, attn)."""
    if query.dim() == 2 and (prototypes.dim() == 3 or values.dim() == 3):
        # one query per sample against per-sample prototypes: the same with Lq = 1
        out, attn = prototype_cross_attention(
            query.unsqueeze(1), prototypes, values, logit_scale_log, logit_scale_max, key_mask, normalize
        )
        return out.squeeze(1), attn.squeeze(1)
    q = F.normalize(query, dim=-1) if normalize else query
    k = F.normalize(prototypes, dim=-1) if normalize else prototypes
    attn_logits = torch.matmul(q, k.transpose(-1, -2))
    scale = torch.exp(logit_scale_log).clamp(max=logit_scale_max)
    attn_logits_scaled = attn_logits * scale
    # numerical stability: subtract the row max
    attn_logits_scaled = attn_logits_scaled - attn_logits_scaled.max(dim=-1, keepdim=True)[0]
    if key_mask is not None:
        m = key_mask.bool()
        if query.dim() == 3:
            m = m.unsqueeze(-2)  # [B or 1, 1, Lk]
        attn_logits_scaled = attn_logits_scaled.masked_fill(~m, float("-inf"))
    attn = F.softmax(attn_logits_scaled, dim=-1)
    out = torch.matmul(attn, values)
    return out, attn


class SemanticAnchorPurification(nn.Module):
    """The SAP module: cross-attention of samples to class prototypes with stats."""

    def __init__(self, phy_dim, normalize=True):
        super().__init__()
        self.phy_dim = phy_dim
        self.normalize = normalize
        logit_scale_init = 25.0
        self.logit_scale_log = nn.Parameter(torch.log(torch.tensor(logit_scale_init)))
        self.logit_scale_max = 100.0

    def compute_cross_attention(self, query, prototypes, values=None, key_mask=None):
        values = prototypes if values is None else values
        return prototype_cross_attention(
            query, prototypes, values, self.logit_scale_log, self.logit_scale_max, key_mask, self.normalize
        )

    def forward(self, query, prototypes, values=None, key_mask=None):
        out, attn = self.compute_cross_attention(query, prototypes, values, key_mask)
        current_scale = torch.exp(self.logit_scale_log).clamp(max=self.logit_scale_max)
        scale_clipped = (torch.exp(self.logit_scale_log) >= self.logit_scale_max).float().item()
        stats = {
            "attn_entropy": (-(attn * torch.log(attn + 1e-8)).sum(dim=-1)).mean().item(),
            "attn_max": attn.max(dim=-1)[0].mean().item(),
            "logit_scale": current_scale.item(),
            "logit_scale_clipped": scale_clipped,
        }
        return out, attn, stats


class PrototypeClassifier(nn.Module):
    """Enough of the few-shot model's ExpB1Model for get_parameters(): a backbone, a head and the SAP module."""

    def __init__(self, dim=64, n_way=5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.sap_module = SemanticAnchorPurification(dim)
        self.head = nn.Linear(dim, n_way)

    def get_parameters(self):
        no_decay_params = [self.sap_module.logit_scale_log]
        decay_params = [p for p in self.parameters() if p is not self.sap_module.logit_scale_log]
        return [
            {"params": decay_params},
            {"params": no_decay_params, "weight_decay": 0.0},
        ]
