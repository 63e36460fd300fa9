"""DistributedDataParallel over a model of SpatialAttentionPool + MaskedSelfAttention +
LearnableScaleCrossAttention (clamp="after_step", clamped by its optimizer hook): 2 gloo processes
on CPU, each with half of every batch, end with the same parameters as one process on the whole
batch. Same pattern as test_distributed.py."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist import join, leave, spawn_or_fail
from torch import nn

import maskattn

STEPS, B, C, H, W, K = 4, 6, 8, 5, 6, 4
MAX_SCALE = 12.0


class Model(nn.Module):
    """Feature map [B, C, H, W] + valid mask [B, H, W] -> attention over K learnable prototypes.

    The spatial gate pools the map (SpatialAttentionPool); the cells, as tokens, go through
    MaskedSelfAttention and a masked mean; their sum is the query of a cross-attention to the
    prototypes with a learnable scale (LearnableScaleCrossAttention)."""

    def __init__(self):
        super().__init__()
        self.spatial = maskattn.nn.SpatialAttentionPool(C, hidden=8)
        self.tokens = maskattn.nn.MaskedSelfAttention(C, num_heads=2)
        self.protos = nn.Parameter(torch.randn(K, C))
        # close to the cap: with the hook clamping after each step, the cap is really reached
        self.xattn = maskattn.nn.LearnableScaleCrossAttention(
            C, init_scale=11.5, max_scale=MAX_SCALE, clamp="after_step"
        )

    def forward(self, x, mask):
        pooled, _ = self.spatial(x, mask)  # [B, C]
        tok_mask = mask.flatten(1)
        y = self.tokens(x.flatten(2).transpose(1, 2), mask=tok_mask)  # [B, HW, C], 0 at padding
        ctx = y.sum(1) / tok_mask.sum(1, keepdim=True).clamp_min(1).to(y.dtype)
        out, attn = self.xattn(pooled + ctx, self.protos)  # attn [B, K]
        return out, attn


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, B, C, H, W, generator=g)
    mask = torch.rand(STEPS, B, H, W, generator=g) < 0.7
    mask[..., 0, 0] = True
    target = torch.randn(STEPS, B, C, generator=g)
    return x, mask, target


def train(model, x, mask, target, xattn):
    opt = torch.optim.SGD(maskattn.optim.param_groups(model, weight_decay=1e-3), lr=0.1, momentum=0.9)
    xattn.register_optimizer_hook(opt)
    scales = []
    for s in range(x.shape[0]):
        out, attn = model(x[s], mask[s])
        # Means over the samples: the average of the two halves' losses is the whole batch's loss.
        # The entropy term rewards confident attention, so the scale grows into its cap.
        entropy = -(attn * torch.log(attn + 1e-6)).sum(-1).mean()
        loss = entropy + 0.1 * (out - target[s]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        scales.append(float(xattn.logit_scale))
    return model, scales


def _worker(rank, world, port, out_dir):
    join(rank, world, port)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Model())
    x, mask, target = data()
    half = B // world
    sl = slice(rank * half, (rank + 1) * half)
    _, scales = train(model, x[:, sl], mask[:, sl], target[:, sl], model.module.xattn)
    torch.save({"state": model.module.state_dict(), "scales": scales}, os.path.join(out_dir, f"ddp{rank}.pt"))
    leave()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_single_process_for_every_module():
    with tempfile.TemporaryDirectory() as d:
        spawn_or_fail(_worker, d)
        ranks = [torch.load(os.path.join(d, f"ddp{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    single = Model()
    _, scales = train(single, *data(), single.xattn)
    for r in ranks:
        for k, v in single.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-5, msg=f"{k}")
        assert r["scales"] == pytest.approx(scales, rel=1e-5)
    # the comparison means something: every module's parameters moved, and the after_step hook
    # clamped the scale at the cap at least once (it would have gone past it otherwise)
    torch.manual_seed(0)
    fresh = Model().state_dict()
    for prefix in ("spatial.", "tokens.", "xattn.", "protos"):
        assert any(not torch.allclose(fresh[k], v) for k, v in single.state_dict().items() if k.startswith(prefix)), (
            prefix
        )
    assert max(scales) == pytest.approx(MAX_SCALE, rel=1e-5), scales
    assert float(single.xattn.logit_scale_log.detach()) <= math.log(MAX_SCALE) + 1e-6
