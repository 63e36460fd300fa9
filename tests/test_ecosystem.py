"""maskattn inside the PyTorch training stack: compiled training steps, no graph breaks, dynamic
shapes without a recompile per step, torch.export (CUDA graphs: test_ecosystem_modules.py)."""

import pytest
import torch
from torch import nn

import maskattn


class MIL(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.pool = maskattn.nn.AttentionPooling(d, 8, gated=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x, mask):
        pooled, weights = self.pool(x, mask)
        return self.head(pooled), weights


def _batch(B, N, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[:, 0] = True
    y = torch.randint(0, 2, (B,), generator=g)
    return x, mask, y


def _step(model, opt, x, mask, y):
    logits, _ = model(x, mask)
    loss = nn.functional.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = MIL()
    compiled = MIL()
    compiled.load_state_dict(eager.state_dict())
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    step_c = torch.compile(_step, fullgraph=False)
    fwd_c = torch.compile(compiled, fullgraph=True)
    for s in range(3):
        x, mask, y = _batch(4, 10, seed=s)
        le = _step(eager, opt_e, x, mask, y)
        lc = step_c(fwd_c, opt_c, x, mask, y)
        torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=n)


def test_no_graph_breaks():
    model = MIL()
    x, mask, _ = _batch(2, 7)
    explain = torch._dynamo.explain(model)(x, mask)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_dynamic_bag_sizes_do_not_recompile_every_step():
    torch._dynamo.reset()
    model = MIL()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for N in (5, 9, 13, 21, 34):
        x, mask, _ = _batch(3, N)
        logits, w = fn(x, mask)
        assert w.shape == (3, N)
    assert counter.frame_count == 1


def test_torch_export_matches_eager():
    model = MIL().eval()
    x, mask, _ = _batch(3, 11)
    ep = torch.export.export(model, (x, mask))
    out = ep.module()(x, mask)
    ref = model(x, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    x2, mask2, _ = _batch(3, 11, seed=5)
    torch.testing.assert_close(ep.module()(x2, mask2)[0], model(x2, mask2)[0])


def test_deterministic_algorithms_mode_gives_identical_results():
    torch.use_deterministic_algorithms(True)
    try:
        l = torch.randn(2, 3000, requires_grad=True)
        f = torch.randn(2, 3000, 64, requires_grad=True)
        outs = []
        for _ in range(2):
            p, w = maskattn.masked_attention_pool(l, f)
            g = torch.autograd.grad(p.sum(), (l, f))
            outs.append((p, w) + g)
        for a, b in zip(*outs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_rules_for_every_differentiable_op(dtype):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 7, generator=g)
    keymask = torch.rand(2, 1, 1, 7, generator=g) < 0.7
    q = torch.randn(2, 4, 8, generator=g)
    protos = torch.randn(3, 8, generator=g)
    scale = torch.tensor(2.5, requires_grad=True)
    feats = torch.randn(2, 6, 4, 4, generator=g)
    gate = torch.randn(2, 1, 4, 4, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        y = maskattn.masked_softmax(scores, keymask)
        out, attn = maskattn.scaled_cross_attention(q, protos, protos, scale, normalize=True)
        pooled, _ = maskattn.gated_masked_mean(feats, gate)
    assert y.dtype == dtype and out.dtype == dtype and attn.dtype == dtype and pooled.dtype == dtype
    torch.testing.assert_close(
        y.float(), torch.softmax(scores.masked_fill(~keymask, float("-inf")), -1), atol=2e-2, rtol=2e-2
    )
    out.float().sum().backward()
    assert scale.grad is not None and scale.grad.dtype == torch.float32  # the scale was left in float32


@pytest.mark.parametrize(
    "name",
    [
        "_masked_softmax_backward",
        "_scaled_cross_attention_backward",
        "_gated_masked_mean_backward",
        "_gated_attention_scores_backward",
        "_masked_attention_pool_backward",
    ],
)
def test_every_backward_op_refuses_double_backward(name):
    kernel = torch._C._dispatch_get_registrations_for_dispatch_key("Autograd")
    assert f"maskattn::{name}" in kernel
