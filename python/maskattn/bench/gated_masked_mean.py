"""Suite "gated_masked_mean": the thermal-face classifier's spatial-attention pooling against maskattn.

SpatialAttentionPool forward+backward against that classifier's module (same weights), and the
pooling stage alone (op gated_masked_mean) against ``(features * gate).mean((2, 3))`` plus its
backward.
"""

from typing import List

import torch
from torch import nn

from ._harness import Row, maybe_compile, timeit

SUITE = "gated_masked_mean"


# ---------------------------------------------------------------- seed attention module


class SeedSpatialAttention(nn.Module):
    """Seed 004's attention branch: sigmoid gate (conv 3x3 -> ReLU -> conv 1x1) then global average pooling."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.attention_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 1), nn.Sigmoid()
        )

    def forward(self, features):
        attention = self.attention_conv(features)
        return (features * attention).mean((2, 3)), attention


def run(args) -> List[Row]:
    import maskattn

    rows: List[Row] = []
    dev = args.device
    shapes = [(4, 64, 7, 7)] if args.quick else [(32, 512, 7, 7), (32, 2048, 7, 7), (16, 512, 14, 14)]
    for B, C, H, W in shapes:
        case = f"B={B} C={C} {H}x{W}"
        torch.manual_seed(0)
        seed = SeedSpatialAttention(C).to(dev)
        ours = maskattn.nn.SpatialAttentionPool(C).to(dev)
        ours.load_state_dict(seed.state_dict())
        feats = torch.randn(B, C, H, W, device=dev, requires_grad=True)

        def fwd_bwd(mod):
            params = [feats, *mod.parameters()]

            def fn():
                pooled, att = mod(feats)
                return torch.autograd.grad(pooled.sum(), params)

            return fn

        mode = "module fwd+bwd"
        rows.append(Row(SUITE, case, mode, "seed eager", timeit(fwd_bwd(seed), dev, args.min_time) * 1e3))
        cseed = maybe_compile(seed, not args.no_compile)
        if cseed is not None:
            try:
                rows.append(Row(SUITE, case, mode, "seed compiled", timeit(fwd_bwd(cseed), dev, args.min_time) * 1e3))
            except Exception as e:  # pragma: no cover - toolchain dependent
                rows.append(Row(SUITE, case, mode, "seed compiled (failed)", float("nan"), notes=type(e).__name__))
        rows.append(Row(SUITE, case, mode, "maskattn", timeit(fwd_bwd(ours), dev, args.min_time) * 1e3))

        # Pooling stage alone: gate given (seed) or gate logits given (maskattn applies the sigmoid itself).
        mode = "pool stage fwd+bwd"
        logits = torch.randn(B, 1, H, W, device=dev, requires_grad=True)
        gate = torch.sigmoid(logits).detach().requires_grad_(True)
        nbytes = feats.numel() * feats.element_size() * 3  # read fwd, read + write bwd

        def seed_stage():
            return torch.autograd.grad((feats * gate).mean((2, 3)).sum(), [feats, gate])

        def seed_stage_sig():
            return torch.autograd.grad((feats * torch.sigmoid(logits)).mean((2, 3)).sum(), [feats, logits])

        def ours_stage():
            return torch.autograd.grad(maskattn.gated_masked_mean(feats, logits)[0].sum(), [feats, logits])

        t = timeit(seed_stage, dev, args.min_time)
        rows.append(
            Row(SUITE, case, mode, "seed eager", t * 1e3, nbytes / t / 1e9, notes="(features*gate).mean((2,3))")
        )
        t = timeit(seed_stage_sig, dev, args.min_time)
        rows.append(
            Row(
                SUITE,
                case,
                mode,
                "seed eager + sigmoid",
                t * 1e3,
                nbytes / t / 1e9,
                notes="(features*sigmoid(logits)).mean",
            )
        )
        cs = maybe_compile(lambda f, l: (f * torch.sigmoid(l)).mean((2, 3)), not args.no_compile)
        if cs is not None:
            try:
                t = timeit(lambda: torch.autograd.grad(cs(feats, logits).sum(), [feats, logits]), dev, args.min_time)
                rows.append(Row(SUITE, case, mode, "seed compiled + sigmoid", t * 1e3, nbytes / t / 1e9))
            except Exception as e:  # pragma: no cover
                rows.append(Row(SUITE, case, mode, "seed compiled (failed)", float("nan"), notes=type(e).__name__))
        t = timeit(ours_stage, dev, args.min_time)
        rows.append(
            Row(SUITE, case, mode, "maskattn", t * 1e3, nbytes / t / 1e9, notes="gated_masked_mean (sigmoid fused)")
        )
    return rows
