import math

import pytest
import torch
from conftest import DEVICES as devices  # noqa: E402
from reference_scaled_cross_attention import SemanticAnchorPurification

import maskattn
from maskattn.nn import LearnableScaleCrossAttention


def episode(B=100, n_way=5, D=640, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_way, D, generator=g)
    labels = torch.randint(0, n_way, (B,), generator=g)
    query = protos[labels] + 1.5 * torch.randn(B, D, generator=g)  # samples near their class prototype
    return query.to(device), protos.to(device)


def pair(log_scale=None, **kw):
    sap = SemanticAnchorPurification(640)
    mine = LearnableScaleCrossAttention(640, **kw)
    if log_scale is not None:
        with torch.no_grad():
            sap.logit_scale_log.fill_(log_scale)
            mine.logit_scale_log.fill_(log_scale)
    return sap, mine


def test_init_matches_sap_parameter_exactly():
    sap, mine = pair()
    assert mine.logit_scale_log.dtype == torch.float32 and mine.logit_scale_log.dim() == 0
    assert torch.equal(sap.logit_scale_log.detach(), mine.logit_scale_log.detach())
    assert abs(mine.logit_scale.item() - 25.0) < 1e-5


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("log_scale", [None, math.log(150.0)])
def test_module_matches_sap_outputs_grads_and_stats(device, log_scale):
    sap, mine = pair(log_scale)
    sap.to(device), mine.to(device)
    q, p = episode(device=device)
    q1, p1 = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    q2, p2 = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
    o1, a1, st1 = sap(q1, p1)
    o2, a2 = mine(q2, p2)
    torch.testing.assert_close(o2, o1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a2, a1, atol=2e-6, rtol=1e-4)
    w = torch.randn(o1.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (o1 * w).sum().backward()
    (o2 * w).sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(p2.grad, p1.grad, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(mine.logit_scale_log.grad, sap.logit_scale_log.grad, atol=1e-5, rtol=1e-3)
    if log_scale is not None:
        assert mine.logit_scale_log.grad.item() == 0.0
    st2 = mine.stats
    assert set(st2) == {"attn_entropy", "attn_max", "logit_scale", "logit_scale_clipped"}
    for name, t in st2.items():
        assert isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad, name
        assert t.device.type == device, name
        assert abs(t.item() - st1[name]) < 1e-5 * max(1.0, abs(st1[name])), (name, t.item(), st1[name])
    # the stats show what the learnable scale is for: at scale 25 the attention is far from uniform
    assert st2["attn_entropy"].item() < math.log(5) and st2["attn_max"].item() > 1 / 5


def test_stats_do_not_sync(monkeypatch):
    _, mine = pair()
    q, p = episode()
    called = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: called.append(1) or 0.0)
    mine(q, p)
    assert not called


def test_values_and_key_mask():
    torch.manual_seed(0)
    m = LearnableScaleCrossAttention(16)
    q, protos, vals = torch.randn(4, 3, 16), torch.randn(4, 6, 16), torch.randn(4, 6, 8)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    out, attn = m(q, protos, vals, key_mask=mask)
    out2, attn2 = m(q, protos[:, :4], vals[:, :4])
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(attn[..., :4], attn2)
    assert out.shape == (4, 3, 8)
    # entropy ignores masked keys (weight exactly 0)
    assert abs(m.stats["attn_entropy"].item() - (-(attn2 * attn2.log()).sum(-1).mean().item())) < 1e-5


def test_forward_clamp_mode_gets_stuck_above_cap():
    # the SAP layer's mode: once past the cap the gradient is zero and the parameter never comes back
    _, mine = pair(math.log(120.0))
    opt = torch.optim.SGD(maskattn.optim.param_groups(mine, 5e-4), lr=1.0)
    q, p = episode(B=20)
    for _ in range(3):
        opt.zero_grad()
        out, _ = mine(q, p)
        out.square().mean().backward()
        opt.step()
    assert mine.logit_scale_log.item() == pytest.approx(math.log(120.0))
    assert mine.stats["logit_scale"].item() == 100.0 and mine.stats["logit_scale_clipped"].item() == 1.0


def test_after_step_clamp_mode():
    _, mine = pair(math.log(120.0), clamp="after_step")
    q, p = episode(B=20)
    out, _ = mine(q, p)
    # the forward pass is not clamped (open_clip), so the gradient reaches the parameter
    unclamped = maskattn.scaled_cross_attention(q, p, p, torch.tensor(math.log(120.0)), math.inf, None, True)[0]
    torch.testing.assert_close(out, unclamped)
    out.square().mean().backward()
    assert mine.logit_scale_log.grad.item() != 0
    assert mine.stats["logit_scale"].item() == pytest.approx(120.0, rel=1e-5)
    opt = torch.optim.SGD([mine.logit_scale_log], lr=0.0)
    handle = mine.register_optimizer_hook(opt)
    opt.step()
    assert mine.logit_scale_log.item() == pytest.approx(math.log(100.0), abs=1e-6)
    mine(q, p)
    assert mine.stats["logit_scale_clipped"].item() == 1.0  # at the cap despite exp(log(100)) rounding
    with torch.no_grad():
        mine.logit_scale_log.fill_(-1.0)
    mine.clamp_logit_scale_()
    assert mine.logit_scale_log.item() == 0.0
    handle.remove()
    with torch.no_grad():
        mine.logit_scale_log.fill_(9.0)
    opt.step()
    assert mine.logit_scale_log.item() == 9.0  # hook removed


def test_compile_fullgraph_module():
    torch.manual_seed(0)
    mine = LearnableScaleCrossAttention(32)
    q, p = torch.randn(10, 32), torch.randn(5, 32)

    def step(q, p):
        out, attn = mine(q, p)
        return out.sum(), mine.stats["attn_entropy"]

    cf = torch.compile(step, fullgraph=True)
    loss, ent = cf(q, p)
    loss.backward()
    g1 = mine.logit_scale_log.grad.clone()
    mine.logit_scale_log.grad = None
    loss2, ent2 = step(q, p)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(ent, ent2)
    torch.testing.assert_close(g1, mine.logit_scale_log.grad)


def test_module_errors():
    with pytest.raises(ValueError, match="clamp must be one of"):
        LearnableScaleCrossAttention(8, clamp="sometimes")
    with pytest.raises(ValueError, match="init_scale"):
        LearnableScaleCrossAttention(8, init_scale=0.0)
    m = LearnableScaleCrossAttention(8)
    with pytest.raises(ValueError, match=r"query must be \[B, Lq, 8\] or \[B, 8\]"):
        m(torch.randn(3, 7), torch.randn(5, 7))
