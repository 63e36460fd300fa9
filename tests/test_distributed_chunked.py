"""One bag split across 2 gloo processes (maskattn.distributed.merge_across_ranks): every rank gets
the one-process pooled vector, log-sum-exp and (for its rows) weights, and the gradients of the
features and of the scoring network equal the one-process ones, for an uneven split and for a
rank with no rows at all, under both gradient rules."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist import join, leave, spawn_or_fail
from torch import nn

import maskattn

N, D, H, WORLD, CHUNK = 29, 6, 5, 2, 4
# (rows of rank 0, gradient rule, branches)
CASES = [(13, "sum", None), (13, "mean", 2), (N, "sum", 2), (0, "mean", None)]


class Scorer(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.a, self.b, self.c, self.k = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, k or 1), k

    def forward(self, x):
        s = self.c(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))
        return s.squeeze(-1) if self.k is None else s


def _data(k):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    gp = torch.randn((D,) if k is None else (k, D), generator=g, dtype=torch.float64)
    gw = torch.randn((N,) if k is None else (N, k), generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return Scorer(k).double(), x, gp, gw


def _loss(pooled, lse, w, gp, gw, local_scale):
    # a term every rank computes alike from the merged state, and a term of this rank's weights only
    return (pooled * gp).sum() + 0.3 * lse.sum() + local_scale * (w * w * gw).sum()


def _worker(rank, world, port, out_dir):
    join(rank, world, port)
    for i, (split, grads, k) in enumerate(CASES):
        scorer, x, gp, gw = _data(k)
        lo, hi = (0, split) if rank == 0 else (split, N)
        xr = x[lo:hi].clone().requires_grad_()
        pooled_r, _, scores_r, lse_r = maskattn.chunked_attention_pool(
            scorer, xr, CHUNK, return_scores=True, return_lse=True
        )
        pooled, lse = maskattn.distributed.merge_across_ranks(pooled_r, lse_r, grads=grads)
        w = maskattn.attention_pool_weights(scores_r[None], lse[None])[0]
        # "sum": the gradient of the sum of the ranks' losses, which DDP's average turns into that
        # of their mean; "mean": the replicated term alone (a per-rank term would be counted 1/W)
        _loss(pooled, lse, w, gp, gw[lo:hi], 1.0 if grads == "sum" else 0.0).backward()
        param_grads = {}
        for name, p in scorer.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            param_grads[name] = g / world if grads == "sum" else g  # DDP averages
        torch.save(
            {
                "pooled": pooled.detach(),
                "lse": lse.detach(),
                "w": w.detach(),
                "x_grad": xr.grad,
                "params": param_grads,
                "rows": (lo, hi),
            },
            os.path.join(out_dir, f"case{i}_rank{rank}.pt"),
        )
    leave()


def _one_process(split, grads, k):
    scorer, x, gp, gw = _data(k)
    xf = x.clone().requires_grad_()
    s = scorer(xf)
    pooled, w = maskattn.masked_attention_pool(s[None], xf[None])
    pooled, w = pooled[0], w[0]
    lse = torch.logsumexp(s, 0)
    # the objective DDP optimises: the mean over ranks of each rank's loss
    local = (w * w * gw).sum() / WORLD if grads == "sum" else 0.0
    ((pooled * gp).sum() + 0.3 * lse.sum() + local).backward()
    return pooled.detach(), lse.detach(), w.detach(), xf.grad, {n: p.grad for n, p in scorer.named_parameters()}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_one_bag_split_across_two_ranks_matches_one_process():
    with tempfile.TemporaryDirectory() as d:
        spawn_or_fail(_worker, d)
        got = {(i, r): torch.load(os.path.join(d, f"case{i}_rank{r}.pt")) for i in range(len(CASES)) for r in range(2)}
    tol = dict(atol=1e-10, rtol=1e-10)
    for i, (split, grads, k) in enumerate(CASES):
        pooled, lse, w, x_grad, params = _one_process(split, grads, k)
        assert x_grad.abs().sum() > 0 and all(g.abs().sum() > 0 for g in params.values())
        for r in range(2):
            res, what = got[(i, r)], f"case {i} ({split}, {grads}, K={k}) rank {r}"
            lo, hi = res["rows"]
            torch.testing.assert_close(res["pooled"], pooled, **tol, msg=lambda m: f"{what} pooled: {m}")
            torch.testing.assert_close(res["lse"], lse, **tol, msg=lambda m: f"{what} lse: {m}")
            torch.testing.assert_close(res["w"], w[lo:hi], **tol, msg=lambda m: f"{what} weights: {m}")
            # "sum" hands each rank world x the gradient of the mean objective (DDP divides only
            # the parameters'); "mean" hands it the gradient itself
            scale = WORLD if grads == "sum" else 1
            torch.testing.assert_close(res["x_grad"], scale * x_grad[lo:hi], **tol, msg=lambda m: f"{what} x: {m}")
            for name, g in params.items():
                torch.testing.assert_close(res["params"][name], g, **tol, msg=lambda m: f"{what} {name}: {m}")
        # every rank got bitwise the same merged result
        assert torch.equal(got[(i, 0)]["pooled"], got[(i, 1)]["pooled"])
