"""The thermal-face classifier's spatial-attention pooling against maskattn.

SpatialAttentionPool forward+backward against that classifier's attention module (same weights),
and the pooling stage alone (op gated_masked_mean, which applies the sigmoid itself) against
``(features * torch.sigmoid(logits)).mean((2, 3))`` plus its backward.
"""

import torch
from torch import nn

from ._harness import BASELINE, COMPILED, MASKATTN, REFERENCE, Case, Impl, Layer, maybe_compile

MODULE = Layer("thermal-face spatial attention, conv gate + mean", "maskattn.nn.SpatialAttentionPool")
STAGE = Layer("thermal-face gated mean, (features * sigmoid(logits)).mean", "maskattn.gated_masked_mean")


class ThermalFaceSpatialAttention(nn.Module):
    """The classifier's attention branch: sigmoid gate (conv 3x3 -> ReLU -> conv 1x1) then global average pooling."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.attention_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 1), nn.Sigmoid()
        )

    def forward(self, features):
        attention = self.attention_conv(features)
        return (features * attention).mean((2, 3)), attention


def gated_mean(features, logits):
    return (features * torch.sigmoid(logits)).mean((2, 3))


def cases(args):
    import maskattn

    dev = args.device
    shapes = [(4, 64, 7, 7)] if args.quick else [(32, 512, 7, 7), (32, 2048, 7, 7), (16, 512, 14, 14)]
    stage_c = maybe_compile(gated_mean, not args.no_compile)
    for B, C, H, W in shapes:
        case = f"B={B} C={C} {H}x{W}"
        torch.manual_seed(0)
        theirs = ThermalFaceSpatialAttention(C).to(dev)
        ours = maskattn.nn.SpatialAttentionPool(C).to(dev)
        ours.load_state_dict(theirs.state_dict())
        theirs_c = maybe_compile(theirs, not args.no_compile)
        feats = torch.randn(B, C, H, W, device=dev, requires_grad=True)

        def fwd_bwd(mod):
            params = [feats, *mod.parameters()]

            def fn():
                pooled, att = mod(feats)
                return torch.autograd.grad(pooled.sum(), params)

            return fn

        name = "thermal-face spatial attention"

        def fwd(mod):
            def fn():
                with torch.no_grad():
                    return mod(feats)

            return fn

        impls = [Impl(f"{name} (eager)", fwd(theirs), BASELINE)]
        if theirs_c is not None:
            impls.append(Impl(f"{name} (compiled)", fwd(theirs_c), COMPILED))
        impls.append(Impl("maskattn.nn.SpatialAttentionPool", fwd(ours), MASKATTN))
        yield Case(MODULE, case, "fwd", impls, detail="module")

        impls = [Impl(f"{name} (eager)", fwd_bwd(theirs), BASELINE)]
        if theirs_c is not None:
            impls.append(Impl(f"{name} (compiled)", fwd_bwd(theirs_c), COMPILED))
        impls.append(Impl("maskattn.nn.SpatialAttentionPool", fwd_bwd(ours), MASKATTN))
        yield Case(MODULE, case, "fwd+bwd", impls, detail="module, grads of features and weights")

        # The pooling stage alone, from the gate logits (maskattn applies the sigmoid itself).
        logits = torch.randn(B, 1, H, W, device=dev, requires_grad=True)
        gate = torch.sigmoid(logits).detach().requires_grad_(True)
        nbytes = feats.numel() * feats.element_size() * 3  # read fwd, read + write bwd
        name = "(features * sigmoid(logits)).mean"
        impls = [
            Impl(
                f"{name} (eager)",
                lambda: torch.autograd.grad(gated_mean(feats, logits).sum(), [feats, logits]),
                BASELINE,
            )
        ]
        if stage_c is not None:
            impls.append(
                Impl(
                    f"{name} (compiled)",
                    lambda: torch.autograd.grad(stage_c(feats, logits).sum(), [feats, logits]),
                    COMPILED,
                )
            )
        impls.append(
            Impl(
                "maskattn.gated_masked_mean",
                lambda: torch.autograd.grad(maskattn.gated_masked_mean(feats, logits)[0].sum(), [feats, logits]),
                MASKATTN,
            )
        )
        impls.append(
            Impl(
                "(features * gate).mean, gate given (eager)",
                lambda: torch.autograd.grad((feats * gate).mean((2, 3)).sum(), [feats, gate]),
                REFERENCE,
            )
        )
        yield Case(STAGE, case, "fwd+bwd", impls, detail="pooling stage", bytes_moved=nbytes)
        del feats, logits, gate, theirs, ours, theirs_c
