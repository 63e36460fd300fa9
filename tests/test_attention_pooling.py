"""nn.AttentionPooling at the model level: every bag layout (padded + mask, packed + offsets / batch,
one bag), scoring of valid instances only, the routing switch, options (act, bias_last, dropout
placement, a linear scorer), torch.compile, and the converters from CLAM, torchmil and PyG checked
against those libraries' layouts rebuilt in tests/reference_mil_peers.py."""

import pytest
import torch
from conftest import DEVICES
from reference_mil_peers import (
    ClamAttnNet,
    ClamAttnNetGated,
    ClamHead,
    PygAttentionalAggregation,
    TorchmilAttentionPool,
    clam_pool,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import maskattn
from maskattn.nn import AttentionPooling

NAN, INF = float("nan"), float("inf")
F64 = dict(atol=1e-12, rtol=1e-12)

CONFIGS = [
    dict(gated=False, branches=1),
    dict(gated=True, branches=1),
    dict(gated=True, branches=3, act="relu"),
    dict(gated=False, branches=2, act="gelu", bias_last=False),
    dict(hidden_dim=None, branches=1),
]


def _mod(device, D=12, hidden=8, **kw):
    torch.manual_seed(0)
    if "hidden_dim" in kw:
        hidden = kw.pop("hidden_dim")
    return AttentionPooling(D, hidden, **kw).to(device).double()


def _bags(device, sizes=(5, 1, 0, 9, 3), D=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=torch.float64).to(device) for n in sizes]


def _per_bag_reference(mod, bags):
    """Every bag alone, in plain torch: softmax of the MLP scores of its rows, weighted sum."""
    pooled, weights = [], []
    for x in bags:
        s = mod._score_rows(x)  # [n, K]
        w = torch.softmax(s, dim=0) if len(x) else s
        p = w.transpose(0, 1) @ x  # [K, D]
        pooled.append(p.squeeze(0) if mod.branches == 1 else p)
        weights.append(w.squeeze(-1) if mod.branches == 1 else w)
    return torch.stack(pooled), weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_every_layout_gives_the_per_bag_result(device, cfg):
    mod = _mod(device, **cfg).eval()
    bags = _bags(device)
    ref_p, ref_w = _per_bag_reference(mod, bags)
    lengths = [len(b) for b in bags]
    # packed + offsets, packed + batch
    x = torch.cat(bags)
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    for kw in (dict(offsets=offsets), dict(batch=maskattn.batch_from_offsets(offsets, x.shape[0]), num_bags=5)):
        p, w, s = mod(x, return_scores=True, **kw)
        torch.testing.assert_close(p, ref_p, **F64)
        torch.testing.assert_close(w, torch.cat(ref_w), **F64)
        torch.testing.assert_close(s, mod.scores(x), **F64)
    # padded + mask, with the padding route and the sync-free route
    feats, mask = maskattn.pad_sequences(bags)
    for pack in (None, True, False):
        mod.pack_padding = pack
        p, w, s = mod(feats, mask, return_scores=True)
        torch.testing.assert_close(p, ref_p, **F64)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(w[b, :n], ref_w[b], **F64)
            torch.testing.assert_close(s[b, :n], mod.scores(bags[b]), **F64)
        assert (w[~mask] == 0).all() and (s[~mask] == 0).all()
    # one bag [N, D]
    for b, x1 in enumerate(bags):
        p, w = mod(x1)
        assert p.shape == ref_p[b].shape and w.shape == ref_w[b].shape
        torch.testing.assert_close(p, ref_p[b], **F64)
        torch.testing.assert_close(w, ref_w[b], **F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_padded_routes_agree_forward_and_backward(device, mask_dtype):
    mod = _mod(device, gated=True, branches=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 11, 12, generator=g, dtype=torch.float64).to(device)
    mask = torch.rand(4, 11, generator=g) < 0.5
    mask[0] = True  # a full bag
    mask[2] = False  # an empty bag
    mask = mask.to(device=device, dtype=mask_dtype)
    gp = torch.randn(4, 2, 12, generator=g, dtype=torch.float64).to(device)
    gw = torch.randn(4, 11, 2, generator=g, dtype=torch.float64).to(device)
    results = []
    for pack in (True, False):
        mod.pack_padding = pack
        mod.zero_grad()
        xx = x.clone().requires_grad_()
        p, w = mod(xx, mask)
        ((p * gp).sum() + (w * gw).sum()).backward()
        results.append((p, w, xx.grad, [q.grad.clone() for q in mod.parameters()]))
    (p0, w0, gx0, gq0), (p1, w1, gx1, gq1) = results
    torch.testing.assert_close(p0, p1, **F64)
    torch.testing.assert_close(w0, w1, **F64)
    torch.testing.assert_close(gx0, gx1, **F64)
    for a, b in zip(gq0, gq1):
        torch.testing.assert_close(a, b, **F64)
    valid = mask != 0
    assert (gx0[~valid] == 0).all() and (p0[2] == 0).all() and (w0[2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_padded_input_scores_only_valid_rows(device):
    mod = _mod(device, gated=True)
    seen = []
    mod.attention_v[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[:-1].numel()))
    x = torch.randn(3, 10, 12, dtype=torch.float64, device=device)
    mask = torch.zeros(3, 10, dtype=torch.bool, device=device)
    mask[0, :7], mask[1, :2] = True, True
    mod(x, mask)
    assert seen == [9]  # the valid rows only
    mod.pack_padding = False
    mod(x, mask)
    assert seen[-1] == 30  # the sync-free route scores every row
    mod.pack_padding = None
    mod(x, torch.ones(3, 10, device=device))  # no padding: nothing to gather
    assert seen[-1] == 30


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_first", [False, True])
def test_padded_forward_writes_no_full_feature_tensor(device, channels_first):
    mod = _mod(device, D=16, gated=True)
    B, N, D = 3, 40, 16
    x = torch.randn(B, D, N, dtype=torch.float64, device=device).transpose(1, 2) if channels_first else None
    if x is None:
        x = torch.randn(B, N, D, dtype=torch.float64, device=device)
    mask = torch.rand(B, N, device=device) < 0.5
    with _Shapes() as rec:
        p, w = mod(x, mask)
    big = [f for f, shape in rec.outputs if shape == (B, N, D) or shape == (B * N, D)]
    # the contiguous input is viewed as [B*N, D] (a view, no data written); nothing else is that large
    assert all("view" in f for f in big), big
    mod.pack_padding = False
    with _Shapes() as rec:
        p2, w2 = mod(x, mask)
    assert any(shape == (B, N, D) and "view" not in f for f, shape in rec.outputs)  # the sync-free pass
    torch.testing.assert_close(p, p2, **F64)
    torch.testing.assert_close(w, w2, **F64)
    mod.pack_padding = None
    with _Shapes() as rec:  # a mask without padding: neither a gather nor a rewrite
        mod(x, torch.ones(B, N, device=device))
    big = [f for f, shape in rec.outputs if shape in ((B, N, D), (B * N, D))]
    assert not [f for f in big if "where" in f or "index" in f], big


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pack", [None, False])
def test_nonfinite_padding_never_reaches_the_mlp(device, pack):
    mod = _mod(device, gated=True, branches=2)
    mod.pack_padding = pack
    x = torch.randn(3, 9, 12, dtype=torch.float64, device=device)
    mask = torch.rand(3, 9, device=device) < 0.6
    mask[:, 0], mask[2] = True, False

    def run(xx):
        mod.zero_grad()
        xx = xx.clone().requires_grad_()
        p, w, s = mod(xx, mask, return_scores=True)
        (p.square().sum() + w.sum() + s.sum()).backward()
        return p, w, s, xx.grad, [q.grad.clone() for q in mod.parameters()]

    ref = run(x)
    for bad in (NAN, INF, -INF):
        x2 = x.clone()
        x2[~mask] = bad
        out = run(x2)
        for a, b in zip(out[:4], ref[:4]):
            assert torch.equal(a, b), bad
        for a, b in zip(out[4], ref[4]):
            assert torch.equal(a, b), bad


@pytest.mark.parametrize("device", DEVICES)
def test_single_bag_with_mask_and_empty_inputs(device):
    mod = _mod(device, gated=True, branches=2)
    x = torch.randn(7, 12, dtype=torch.float64, device=device)
    m = torch.tensor([1, 0, 1, 1, 0, 0, 1], device=device)
    p, w = mod(x, m)
    pr, wr = mod(x[m != 0])
    assert p.shape == (2, 12) and w.shape == (7, 2)
    torch.testing.assert_close(p, pr, **F64)
    torch.testing.assert_close(w[m != 0], wr, **F64)
    assert (w[m == 0] == 0).all()
    # a bag of no instance, padded, packed and alone: zeros
    p, w = mod(x[:0])
    assert p.shape == (2, 12) and (p == 0).all() and w.shape == (0, 2)
    p, w = mod(x[:0], offsets=torch.zeros(3, dtype=torch.int64, device=device))
    assert p.shape == (2, 2, 12) and (p == 0).all()
    p, w = mod(x.expand(2, 7, 12), torch.zeros(2, 7, device=device))
    assert (p == 0).all() and (w == 0).all()


def test_options_and_parameter_names():
    plain = AttentionPooling(6, 4)
    assert set(plain.state_dict()) == {f"attention_net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert isinstance(plain.attention_net[1], nn.Tanh)
    drop = AttentionPooling(6, 4, dropout=0.25)
    assert [type(m) for m in drop.attention_net] == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    gated = AttentionPooling(6, 4, gated=True, dropout=0.25, act="relu", bias_last=False, branches=3)
    # CLAM's placement: after each branch's activation, before the product
    assert [type(m) for m in gated.attention_v] == [nn.Linear, nn.ReLU, nn.Dropout]
    assert [type(m) for m in gated.attention_u] == [nn.Linear, nn.Sigmoid, nn.Dropout]
    assert gated.attention_w.bias is None and gated.attention_w.weight.shape == (3, 4)
    assert isinstance(AttentionPooling(6, 4, act="gelu").attention_net[1], nn.GELU)
    lin = AttentionPooling(6, None)
    assert set(lin.state_dict()) == {"attention_net.0.weight", "attention_net.0.bias"}
    for bad, msg in (
        (dict(act="sigmoid"), "act must be one of"),
        (dict(hidden_dim=None, gated=True), "hidden_dim=None"),
        (dict(dropout=1.5), "dropout must be in"),
    ):
        with pytest.raises(ValueError, match=msg):
            AttentionPooling(6, **bad)


def test_dropout_acts_in_training_only():
    mod = AttentionPooling(6, 32, gated=True, dropout=0.5).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mod.train()
    torch.manual_seed(0)
    a = mod(x, mask)[0]
    torch.manual_seed(1)
    b = mod(x, mask)[0]
    assert not torch.allclose(a, b)
    mod.eval()
    torch.testing.assert_close(mod(x, mask)[0], mod(x, mask)[0], atol=0, rtol=0)


def test_layout_errors():
    mod = AttentionPooling(4, 8)
    with pytest.raises(ValueError, match=r"features must be \[B, N, 4\] \(padded, with mask\), \[T, 4\]"):
        mod(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"packed features \(with offsets/batch\) must be \[T, 4\]"):
        mod(torch.randn(2, 3, 4), offsets=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="mask goes with padded"):
        mod(torch.randn(3, 4), torch.ones(3), offsets=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="offsets or batch, not both"):
        mod(torch.randn(3, 4), offsets=torch.tensor([0, 3]), batch=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic_padded_and_packed(device):
    mod = _mod(device, gated=True, branches=2)
    compiled = torch.compile(mod, fullgraph=True, dynamic=True)
    for B, N in ((3, 9), (4, 13)):
        x = torch.randn(B, N, 12, dtype=torch.float64, device=device)
        mask = torch.rand(B, N, device=device) < 0.6
        mask[:, 0] = True
        x[~mask] = NAN  # the sync-free route must keep padding out as well
        for a, b in zip(compiled(x, mask), mod(x, mask)):
            torch.testing.assert_close(a, b, **F64)
        offsets = torch.tensor([0, 2, 2, B * N], device=device)
        y = torch.randn(B * N, 12, dtype=torch.float64, device=device)
        for a, b in zip(compiled(y, offsets=offsets), mod(y, offsets=offsets)):
            torch.testing.assert_close(a, b, **F64)
        batch = torch.randint(0, B, (B * N,), device=device)  # unsorted: sorted inside the graph
        for a, b in zip(compiled(y, batch=batch, num_bags=B + 1), mod(y, batch=batch, num_bags=B + 1)):
            torch.testing.assert_close(a, b, **F64)
        for a, b in zip(compiled(y[:N]), mod(y[:N])):  # one bag
            torch.testing.assert_close(a, b, **F64)


def test_gradcheck_packing_route():
    mod = _mod("cpu", D=5, hidden=4, gated=True, branches=2)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mod(t, mask), (x,))


# ---------------------------------------------------------------- converters


def _grads_of(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _check_param_grads(peer_grads, our_grads, mapping):
    for theirs, ours in mapping.items():
        torch.testing.assert_close(our_grads[ours], peer_grads[theirs], **F64, msg=f"{theirs} -> {ours}")


CLAM_GATED_MAP = {
    "attention_a.0.weight": "attention_v.0.weight",
    "attention_a.0.bias": "attention_v.0.bias",
    "attention_b.0.weight": "attention_u.0.weight",
    "attention_b.0.bias": "attention_u.0.bias",
    "attention_c.weight": "attention_w.weight",
    "attention_c.bias": "attention_w.bias",
}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n_classes", [1, 3])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_clam_matches_clam_single_bag_and_batched(gated, n_classes, dropout, as_state_dict):
    torch.manual_seed(0)
    net = (ClamAttnNetGated if gated else ClamAttnNet)(L=10, D=6, dropout=dropout, n_classes=n_classes).double().eval()
    pool = AttentionPooling.from_clam(net.state_dict() if as_state_dict else net).eval()
    assert next(pool.parameters()).dtype == torch.float64  # the source's dtype
    assert pool.gated == gated and pool.branches == n_classes and pool.hidden_dim == 6
    if not as_state_dict or not gated:  # a state dict tells Attn_Net's dropout by its layout only
        assert pool.dropout == (0.25 if dropout else 0.0)
    bags = _bags("cpu", sizes=(7, 3, 12), D=10)
    # single bags: CLAM's M and A, and every parameter's gradient through both
    for h in bags:
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        M, A, A_raw = clam_pool(net, h1)
        p, w, s = pool(h2, return_scores=True)
        torch.testing.assert_close(p.view(n_classes, -1), M, **F64)
        torch.testing.assert_close(w.view(len(h), -1).T, A, **F64)
        torch.testing.assert_close(s.view(len(h), -1).T, A_raw, **F64)
        gM = torch.randn_like(M)
        gref = _grads_of(net, (M * gM).sum() + A.square().sum())
        gours = _grads_of(pool, (p.view_as(M) * gM).sum() + w.square().sum())
        if gated:
            mapping = CLAM_GATED_MAP
        else:
            last = "module.3" if dropout else "module.2"
            ours_last = "attention_net.3" if dropout else "attention_net.2"
            mapping = {"module.0.weight": "attention_net.0.weight", f"{last}.weight": f"{ours_last}.weight"}
        _check_param_grads(gref, gours, mapping)
        torch.testing.assert_close(h2.grad, h1.grad, **F64)
    # CLAM's loop over bags against one packed and one padded call
    M_all = torch.stack([clam_pool(net, h)[0] for h in bags])
    x = torch.cat(bags)
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    torch.testing.assert_close(pool(x, offsets=offsets)[0].view_as(M_all), M_all, **F64)
    feats, mask = maskattn.pad_sequences(bags)
    torch.testing.assert_close(pool(feats, mask)[0].view_as(M_all), M_all, **F64)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_clam_nested_in_clam_sb_leaves_the_fc_to_the_caller(gated, as_state_dict):
    torch.manual_seed(0)
    clam = ClamHead(embed_dim=10, size1=8, size2=5, gate=gated, n_classes=2).double().eval()
    pool = AttentionPooling.from_clam(clam.state_dict() if as_state_dict else clam).eval()
    fc = nn.Sequential(nn.Linear(10, 8), nn.ReLU()).double()
    fc[0].load_state_dict({"weight": clam.attention_net[0].weight, "bias": clam.attention_net[0].bias})
    h = torch.randn(9, 10, dtype=torch.float64)
    M, A, _ = clam(h)
    p, w = pool(fc(h))
    torch.testing.assert_close(p, M, **F64)
    torch.testing.assert_close(w.T, A, **F64)
    sd = {"model." + k: v for k, v in clam.state_dict().items()}
    p2, _ = AttentionPooling.from_clam(sd, prefix="model.attention_net.3.").eval()(fc(h))
    torch.testing.assert_close(p2, M, **F64)


def test_from_clam_rejects_other_layouts():
    with pytest.raises(ValueError, match="not a CLAM attention net"):
        AttentionPooling.from_clam({"foo.weight": torch.zeros(2, 2)})
    net = ClamAttnNetGated(L=4, D=3)
    sd = dict(net.state_dict(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        AttentionPooling.from_clam(sd)
    sd = net.state_dict()
    del sd["attention_b.0.bias"]
    with pytest.raises(ValueError, match=r"lacks \['attention_b.0.bias'\]"):
        AttentionPooling.from_clam(sd)
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        AttentionPooling.from_clam(3)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_torchmil_matches_torchmil(gated, act, as_state_dict):
    torch.manual_seed(0)
    ref = TorchmilAttentionPool(in_dim=10, att_dim=6, act=act, gated=gated).double()
    src = ref.state_dict() if as_state_dict else ref
    pool = AttentionPooling.from_torchmil(src, act=act if as_state_dict else None)
    assert pool.act == act and not pool.bias_last and pool.gated == gated
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 8, 10, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 8, generator=g) < 0.6
    mask[:, 0] = True
    X1, X2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    z, f = ref(X1, mask, return_att=True)
    p, w, s = pool(X2, mask, return_scores=True)
    torch.testing.assert_close(p, z, **F64)
    torch.testing.assert_close(s[mask], f[mask], **F64)
    gz = torch.randn_like(z)
    gref = _grads_of(ref, (z * gz).sum())
    gours = _grads_of(pool, (p * gz).sum())
    mapping = (
        {"fc1.module.weight": "attention_v.0.weight", "fc_gated.module.bias": "attention_u.0.bias"}
        if gated
        else {"fc1.module.weight": "attention_net.0.weight"}
    )
    mapping["fc2.weight"] = "attention_w.weight" if gated else "attention_net.2.weight"
    _check_param_grads(gref, gours, mapping)
    torch.testing.assert_close(X2.grad, X1.grad, **F64)
    # one bag, and an empty one (torchmil: NaN; AttentionPooling: zeros)
    torch.testing.assert_close(pool(X[0])[0], ref(X[:1])[0], **F64)
    mask[1] = False
    assert ref(X, mask)[1].isnan().all() and (pool(X, mask)[0][1] == 0).all()


def test_from_torchmil_uninitialised_lazy_layers_raise():
    ref = TorchmilAttentionPool(in_dim=None, att_dim=4)
    with pytest.raises(ValueError, match="uninitialised lazy parameter"):
        AttentionPooling.from_torchmil(ref)
    ref(torch.randn(1, 3, 5))  # one forward pass materialises it
    assert AttentionPooling.from_torchmil(ref).in_dim == 5


def _pyg_gates():
    return {
        "linear": lambda: nn.Linear(10, 1),
        "linear-nobias": lambda: nn.Linear(10, 1, bias=False),
        "mlp-tanh": lambda: nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 1)),
        "mlp-relu-dropout": lambda: nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 1)),
    }


@pytest.mark.parametrize("gate", list(_pyg_gates()))
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_pyg_matches_attentional_aggregation(gate, as_state_dict):
    torch.manual_seed(0)
    ref = PygAttentionalAggregation(_pyg_gates()[gate]()).double().eval()
    act = {"mlp-tanh": "tanh", "mlp-relu-dropout": "relu"}.get(gate)
    pool = AttentionPooling.from_pyg(ref.state_dict() if as_state_dict else ref, act=act if as_state_dict else None)
    pool.eval()
    if gate.startswith("linear"):
        assert pool.hidden_dim is None and pool.bias_last == (gate == "linear")
    elif not as_state_dict:
        assert pool.dropout == (0.1 if "dropout" in gate else 0.0)
    bags = _bags("cpu", sizes=(4, 0, 9, 1), D=10)
    x = torch.cat(bags)
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    batch = maskattn.batch_from_offsets(offsets, x.shape[0])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, gw = ref(x1, batch, 4)
    p, w = pool(x2, batch=batch, num_bags=4)
    torch.testing.assert_close(p, out, **F64)
    torch.testing.assert_close(w, gw.squeeze(-1), **F64)
    go = torch.randn_like(out)
    gref = _grads_of(ref, (out * go).sum())
    gours = _grads_of(pool, (p * go).sum())
    first = "gate_nn.weight" if gate.startswith("linear") else "gate_nn.0.weight"
    _check_param_grads(gref, gours, {first: "attention_net.0.weight"})
    torch.testing.assert_close(x2.grad, x1.grad, **F64)
    torch.testing.assert_close(pool(bags[2])[0], out[2], **F64)  # a single bag


def test_from_pyg_out_of_scope_layouts_raise():
    with pytest.raises(ValueError, match="feature-level gating"):
        AttentionPooling.from_pyg(PygAttentionalAggregation(nn.Linear(10, 10)))
    with pytest.raises(ValueError, match="only nn=None converts"):
        AttentionPooling.from_pyg(PygAttentionalAggregation(nn.Linear(10, 1), nn.Linear(10, 10)))
    sd = PygAttentionalAggregation(nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 1))).state_dict()
    with pytest.raises(ValueError, match="pass act="):
        AttentionPooling.from_pyg(sd)
    with pytest.raises(ValueError, match="is not one AttentionPooling has"):
        AttentionPooling.from_pyg(
            PygAttentionalAggregation(nn.Sequential(nn.Linear(10, 6), nn.SiLU(), nn.Linear(6, 1)))
        )
    deep = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    with pytest.raises(ValueError, match="gate_nn must be Linear"):
        AttentionPooling.from_pyg(PygAttentionalAggregation(deep))


def test_from_pyg_against_torch_geometric_when_installed():
    pyg_aggr = pytest.importorskip("torch_geometric.nn.aggr")
    torch.manual_seed(0)
    aggr = pyg_aggr.AttentionalAggregation(nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 1))).double()
    pool = AttentionPooling.from_pyg(aggr)
    bags = _bags("cpu", sizes=(4, 7, 1), D=10)
    x = torch.cat(bags)
    offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
    batch = maskattn.batch_from_offsets(offsets, x.shape[0])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = aggr(x1, batch)
    p, _ = pool(x2, offsets=offsets)
    torch.testing.assert_close(p, out, **F64)
    go = torch.randn_like(out)
    gref = _grads_of(aggr, (out * go).sum())
    gours = _grads_of(pool, (p * go).sum())
    _check_param_grads(
        gref, gours, {"gate_nn.0.weight": "attention_net.0.weight", "gate_nn.2.bias": "attention_net.2.bias"}
    )
    torch.testing.assert_close(x2.grad, x1.grad, **F64)


# ---------------------------------------------------------------- the model-level benchmark suite


def test_benchmark_suite_cases_run_and_check_gradients():
    import argparse

    from maskattn.bench import attention_pooling as suite

    p = argparse.ArgumentParser()
    suite.add_args(p)
    args = p.parse_args(["--mil-bags", "5", "--mil-pad-batch", "2"])
    args.device, args.quick, args.no_compile = torch.device("cpu"), True, True
    main = []
    for case in suite.cases(args):  # a case's tensors live while it is current, as the harness uses it
        if case.layer == suite.LAYER:
            main.append([im.name for im in case.impls])
            assert case.mode == "fwd+bwd"
            for im in case.impls:
                im.fn()  # each runs (the gradients were compared with the loop's before the case was made)
    assert main == [[suite.LOOP, suite.PACKED, suite.PADDED, suite.PACKED_BATCHES]]
    sizes = suite.bag_sizes(1000, 800)
    assert 700 < sorted(sizes)[500] < 900 and max(sizes) > 3 * 800  # log-normal around the median
    with pytest.raises(AssertionError, match="parameter gradient 1 differs"):
        suite._check_same("x", [torch.ones(3), torch.ones(2)], [torch.ones(3), torch.tensor([1.0, 1.1])])


@pytest.mark.parametrize("trainable", [False, True])
def test_row_blocks_change_nothing(monkeypatch, trainable):
    import maskattn.nn.attention_pooling as ap

    mod = _mod("cpu", gated=True, branches=2)
    bags = _bags("cpu", sizes=(7, 0, 12, 3, 9))
    feats, mask = maskattn.pad_sequences(bags)
    x = torch.cat(bags)
    offsets = torch.tensor([0, 7, 7, 19, 22, 31])
    cf = feats.transpose(1, 2).contiguous().transpose(1, 2)  # channels-first storage

    def run():
        out = []
        for args, kw in (((feats, mask), {}), ((cf, mask), {}), ((x,), dict(offsets=offsets)), ((x,), {})):
            mod.zero_grad()
            inp = args[0].clone().requires_grad_(trainable) if trainable else args[0]
            p, w, s = mod(inp, *args[1:], return_scores=True, **kw)
            (p.square().sum() + (w * s).sum()).backward()
            out += [p, w, s] + [q.grad.clone() for q in mod.parameters()]
            if trainable:
                out.append(inp.grad)
        return out

    whole = run()
    monkeypatch.setattr(ap, "_BLOCK_ROWS", 4)
    seen = []
    mod.attention_v[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    blocked = run()
    assert max(seen) == 4 and len(seen) > 8  # the blocks were used
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, **F64)


# ---------------------------------------------------------------- PyG's bag ids, sorted or not


def _run_with_grads(mod, x, go, gw, **kw):
    mod.zero_grad()
    xx = x.clone().requires_grad_()
    p, w, s = mod(xx, return_scores=True, **kw)
    ((p * go).sum() + (w * gw).sum()).backward()
    return [p, w, s, xx.grad] + [q.grad.clone() for q in mod.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync_free", [False, True])
def test_unsorted_batch_is_pooled_as_pyg_scatters_it(device, sync_free, monkeypatch):
    """Interleaved bag ids give PyG's scatter-softmax result (rows of a bag in any order), with
    weights and scores in the caller's row order; the sync-free route (torch.compile, CUDA graphs,
    torch.func) sorts every time and agrees."""
    if sync_free:
        monkeypatch.setattr(AttentionPooling, "_may_sync", staticmethod(lambda x: False))
    mod = _mod(device, gated=True, branches=2)
    g = torch.Generator().manual_seed(5)
    batch = torch.tensor([3, 0, 3, 1, 0, 0, 3, 1, 5, 0, 3, 3], device=device)  # bags 2 and 4 empty
    x = torch.randn(batch.shape[0], 12, generator=g, dtype=torch.float64).to(device)
    go = torch.randn(6, 2, 12, generator=g, dtype=torch.float64).to(device)
    gw = torch.randn(batch.shape[0], 2, generator=g, dtype=torch.float64).to(device)
    got = _run_with_grads(mod, x, go, gw, batch=batch)
    p, w, s = got[:3]
    for b in range(6):
        rows = batch == b
        ref = torch.softmax(mod._score_rows(x[rows]), 0)
        torch.testing.assert_close(w[rows], ref, **F64)
        torch.testing.assert_close(p[b], ref.T @ x[rows] if rows.any() else torch.zeros_like(p[b]), **F64)
    torch.testing.assert_close(s, mod.scores(x), **F64)
    # the same rows, reordered bag by bag by the caller, through offsets: same bags, same gradients
    perm = torch.sort(batch, stable=True).indices
    offsets = maskattn.offsets_from_batch(batch[perm], 6)
    want = _run_with_grads(mod, x[perm], go, gw[perm], offsets=offsets)
    inv = torch.argsort(perm)
    want[1], want[2], want[3] = want[1][inv], want[2][inv], want[3][inv]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)
    # sorted ids take no permutation: the result is the offsets route's
    ps, ws = mod(x[perm], batch=batch[perm])
    torch.testing.assert_close(ps, want[0], **F64)
    torch.testing.assert_close(ws, want[1][perm], **F64)


def test_batch_errors_name_the_module():
    mod = AttentionPooling(4, 8)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"AttentionPooling: batch must hold one bag id per row of features"):
        mod(x, batch=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"AttentionPooling: batch must be a 1-D integer tensor"):
        mod(x, batch=torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"AttentionPooling: batch holds bag ids in \[0, 3\], outside \[0, num_bags=2\)"
    ):
        mod(x, batch=torch.tensor([0, 3, 1, 0, 0]), num_bags=2)
    with pytest.raises(ValueError, match=r"AttentionPooling: num_bags goes with batch="):
        mod(x, offsets=torch.tensor([0, 5]), num_bags=1)
    p, w = mod(x, batch=torch.tensor([1, 1, 0, 1, 0]), num_bags=4)  # trailing empty bags
    assert p.shape == (4, 4) and (p[2:] == 0).all()


# ---------------------------------------------------------------- chunked exact mode (huge bags)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("branches", [1, 3])
def test_chunk_size_gives_the_unchunked_result_and_gradients(device, branches):
    """chunk_size (constructor or forward) runs maskattn.chunked_attention_pool: the scoring network
    chunk by chunk under checkpointing, merged exactly. Every layout, outputs, scores and gradients
    (features and parameters) equal the unchunked module's."""
    mod = _mod(device, gated=True, branches=branches, act="gelu")
    bags = _bags(device, sizes=(7, 0, 12, 1, 9))
    g = torch.Generator().manual_seed(4)
    feats, mask = maskattn.pad_sequences(bags)
    feats[~mask] = NAN  # padding content must stay out of the chunks as well
    x = torch.cat(bags)
    offsets = torch.tensor([0, 7, 7, 19, 20, 29], device=device)
    batch = maskattn.batch_from_offsets(offsets, x.shape[0])
    shuffle = torch.randperm(x.shape[0], generator=g).to(device)
    kshape = (branches,) if branches > 1 else ()
    layouts = [
        ((feats, mask), {}),
        ((x,), dict(offsets=offsets)),
        ((x[shuffle],), dict(batch=batch[shuffle], num_bags=5)),
        ((bags[2],), {}),
        ((bags[2], torch.arange(12, device=device) % 3 != 0), {}),
    ]
    for (inp, *rest), kw in layouts:
        lead = (5,) if inp.dim() == 2 and ("offsets" in kw or "batch" in kw) else inp.shape[:-2]
        go = torch.randn(lead + kshape + (12,), generator=g, dtype=torch.float64).to(device)
        gw = torch.randn(inp.shape[:-1] + kshape, generator=g, dtype=torch.float64).to(device)

        def run(**extra):
            mod.zero_grad()
            xx = inp.clone().requires_grad_()
            p, w, s = mod(xx, *rest, return_scores=True, **kw, **extra)
            ((p * go).sum() + (w * gw).nan_to_num().sum() + s.nan_to_num().square().sum()).backward()
            return [p, w, s, xx.grad.nan_to_num()] + [q.grad.clone() for q in mod.parameters()]

        want = run()
        calls = []
        hook = mod.attention_v[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
        for chunk in (1, 4, 100):
            calls.clear()
            got = run(chunk_size=chunk)
            assert max(calls) <= chunk  # the network saw chunks only (forward and checkpointed replay)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        hook.remove()
    chunked = AttentionPooling(12, 8, gated=True, branches=branches, act="gelu", chunk_size=4).to(device).double()
    chunked.load_state_dict(mod.state_dict())
    assert "chunk_size=4" in repr(chunked)
    for a, b in zip(chunked(feats, mask, return_scores=True), mod(feats, mask, return_scores=True, chunk_size=4)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="AttentionPooling: chunk_size must be positive, got 0"):
        mod(x, offsets=offsets, chunk_size=0)
    with pytest.raises(TypeError, match="AttentionPooling: chunk_size must be an int"):
        AttentionPooling(12, chunk_size=2.0)
