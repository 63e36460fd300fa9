"""DistributedDataParallel over maskattn modules: 2 gloo processes on CPU end with the same
parameters as one process on the whole batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from _dist import join, leave, spawn_or_fail
from torch import nn

import maskattn

STEPS, B, N, D = 3, 8, 12, 16


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = maskattn.nn.AttentionPooling(D, 8, gated=True)
        self.head = nn.Linear(D, 1)

    def forward(self, x, mask):
        pooled, _ = self.pool(x, mask)
        return self.head(pooled).squeeze(-1)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, B, N, D, generator=g)
    mask = torch.rand(STEPS, B, N, generator=g) < 0.7
    mask[..., 0] = True
    y = torch.randn(STEPS, B, generator=g)
    return x, mask, y


def train(model, x, mask, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(x.shape[0]):
        loss = ((model(x[s], mask[s]) - y[s]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _worker(rank, world, port, out_dir):
    join(rank, world, port)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Model())
    x, mask, y = data()
    half = B // world
    sl = slice(rank * half, (rank + 1) * half)
    train(model, x[:, sl], mask[:, sl], y[:, sl])
    if rank == 0:
        torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    leave()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_single_process():
    with tempfile.TemporaryDirectory() as d:
        spawn_or_fail(_worker, d)
        ddp_state = torch.load(os.path.join(d, "ddp.pt"))
    torch.manual_seed(0)
    single = train(Model(), *data())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-6, rtol=1e-5, msg=k)
    # and the parameters did move, so the comparison means something
    torch.manual_seed(0)
    fresh = Model().state_dict()
    assert any(not torch.allclose(fresh[k], v) for k, v in single.state_dict().items())
