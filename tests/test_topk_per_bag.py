"""maskattn.topk_per_bag: top-k instances per bag over padded [B, N(, K)] or packed [T(, K)] scores,
against per-bag loops of torch.topk (CLAM's calls) and of a stable sort (the documented tie rule)."""

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, requires_cuda  # noqa: E402
from reference_topk_per_bag import clam_topk, stable_topk

import maskattn

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16]


def distinct_scores(shape, dtype, device, seed=0):
    """Scores without ties, exactly representable in every dtype (torch.topk orders ties freely)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    vals = torch.randperm(n, generator=g).to(torch.float64) / 8 - n / 16  # steps of 1/8, |x| < 32
    return vals.view(shape).to(device=device, dtype=dtype)


def random_mask(b, n, dtype, device, seed=1, empty_bag=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, n, generator=g) < 0.6
    if empty_bag:
        m[0] = False  # an empty bag
    m[-1] = True  # a full bag
    m[1, 2:] = False  # a bag of 2, shorter than most k below
    return m.to(dtype).to(device)


def check_against(result, expected, k, packed_mask=None):
    """packed_mask: the padded mask the packed scores came from (maps global rows to positions)."""
    values, indices, valid = result
    if values.dim() == 2:
        values, indices, valid = values.unsqueeze(-1), indices.unsqueeze(-1), valid.unsqueeze(-1)
    values, indices, valid = values.cpu(), indices.cpu(), valid.cpu()
    if packed_mask is not None:
        row_to_pos = (packed_mask.cpu() != 0).nonzero()[:, 1]  # pack's row order is row-major
        indices = torch.where(valid, row_to_pos[indices.clamp(max=max(row_to_pos.numel() - 1, 0))], -1)
    for b, per_branch in enumerate(expected):
        for j, (pos, vals) in enumerate(per_branch):
            n = len(pos)
            assert valid[b, :, j].tolist() == [True] * n + [False] * (k - n), (b, j)
            assert indices[b, :n, j].tolist() == pos, (b, j)
            assert values[b, :n, j].double().tolist() == vals, (b, j)
            if packed_mask is None:
                assert (indices[b, n:, j] == 0).all()
            assert (values[b, n:, j] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("branches", [None, 3])
def test_padded_matches_clams_per_bag_topk(device, dtype, largest, branches):
    b, n, k = 5, 13, 4
    shape = (b, n) if branches is None else (b, n, branches)
    scores = distinct_scores(shape, dtype, device)
    mask = random_mask(b, n, torch.bool, device)
    out = maskattn.topk_per_bag(scores, k, mask, largest=largest)
    assert out.values.shape == out.indices.shape == out.valid.shape == (b, k) + shape[2:]
    assert out.values.dtype == dtype and out.indices.dtype == torch.int64 and out.valid.dtype == torch.bool
    check_against(out, clam_topk(scores, k, mask, largest), k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("branches", [None, 2])
def test_packed_matches_clams_per_bag_topk_with_global_rows(device, dtype, largest, branches):
    b, n, k = 6, 11, 3
    shape = (b, n) if branches is None else (b, n, branches)
    padded = distinct_scores(shape, dtype, device, seed=3)
    mask = random_mask(b, n, torch.bool, device, seed=4)
    packed, offsets = maskattn.pack(padded, mask)
    out = maskattn.topk_per_bag(packed, k, offsets=offsets, largest=largest)
    assert out.indices.shape == (b, k) + shape[2:]
    # global rows: indexing the packed tensor gives the selected values back
    if branches is None:
        got = packed[out.indices]
    else:
        got = packed.gather(0, out.indices.view(b * k, branches)).view(b, k, branches)
    assert torch.equal(torch.where(out.valid, got, torch.zeros_like(got)), out.values)
    check_against(out, clam_topk(padded, k, mask, largest), k, packed_mask=mask)


@pytest.mark.parametrize("largest", [True, False])
def test_single_bag_equals_clams_calls_exactly(largest):
    # CLAM_SB: A [1, N] after the softmax; CLAM_MB: A [n_classes, N] and the last row is used.
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(1, 200), 1)
    k = 8
    ref = torch.topk(a, k)[1][-1] if largest else torch.topk(-a, k, dim=1)[1][-1]
    out = maskattn.topk_per_bag(a, k, largest=largest)
    assert torch.equal(out.indices[0], ref) and out.valid.all()
    a_mb = torch.softmax(torch.randn(3, 200), 1)  # [K, N]
    ref_mb = torch.topk(a_mb, k)[1][-1] if largest else torch.topk(-a_mb, k, dim=1)[1][-1]
    out_mb = maskattn.topk_per_bag(a_mb.t().unsqueeze(0), k, largest=largest)  # [1, N, K]
    assert torch.equal(out_mb.indices[0, :, -1], ref_mb)
    # packed: one bag, offsets [0, N]
    out_p = maskattn.topk_per_bag(a[0], k, offsets=torch.tensor([0, 200]), largest=largest)
    assert torch.equal(out_p.indices[0], ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_every_mask_dtype_selects_the_same(device, mask_dtype):
    scores = distinct_scores((4, 9), torch.float32, device, seed=5)
    mask = random_mask(4, 9, torch.bool, device, seed=6)
    ref = maskattn.topk_per_bag(scores, 3, mask)
    out = maskattn.topk_per_bag(scores, 3, mask.to(mask_dtype))
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    packed, offsets = maskattn.pack(scores, torch.ones_like(mask))
    ref_p = maskattn.topk_per_bag(packed, 3, mask.flatten(), offsets=offsets)
    out_p = maskattn.topk_per_bag(packed, 3, mask.flatten().to(mask_dtype), offsets=offsets)
    for a, b in zip(out_p, ref_p):
        assert torch.equal(a, b)
    # a packed mask excludes rows exactly as the padded mask excludes positions
    assert torch.equal(out_p.valid, ref.valid)
    assert torch.equal(torch.where(ref.valid, out_p.indices - offsets[:-1, None], 0), ref.indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False])
def test_ties_go_to_the_lower_position_and_padding_loses_every_tie(device, largest):
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 3, (6, 20), generator=g).float().to(device)  # many ties
    mask = random_mask(6, 20, torch.bool, device, seed=8)
    out = maskattn.topk_per_bag(scores, 7, mask, largest=largest)
    check_against(out, stable_topk(scores, 7, mask, largest), 7)
    packed, offsets = maskattn.pack(scores, mask)
    out_p = maskattn.topk_per_bag(packed, 7, offsets=offsets, largest=largest)
    check_against(out_p, stable_topk(scores, 7, mask, largest), 7, packed_mask=mask)
    # padding holding the winning value is still never selected
    fill = float("inf") if largest else float("-inf")
    out2 = maskattn.topk_per_bag(scores.masked_fill(mask == 0, fill), 7, mask, largest=largest)
    for a, b in zip(out2, out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_minus_inf_is_selected_padding_never(device):
    ninf, nan = float("-inf"), float("nan")
    scores = torch.tensor([[ninf, 1.0, ninf, 5.0, 9.0, nan]], device=device)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], device=device)
    out = maskattn.topk_per_bag(scores, 4, mask)
    assert out.indices[0].tolist() == [1, 0, 2, 0]
    assert out.valid[0].tolist() == [True, True, True, False]
    assert out.values[0, :3].tolist() == [1.0, ninf, ninf] and out.values[0, 3] == 0
    low = maskattn.topk_per_bag(scores, 2, mask, largest=False)
    assert low.indices[0].tolist() == [0, 2] and low.valid.all()
    # NaN ranks above +inf, as in torch.topk
    s2 = torch.tensor([[1.0, nan, float("inf")]], device=device)
    assert maskattn.topk_per_bag(s2, 2).indices[0].tolist() == torch.topk(s2.cpu(), 2).indices[0].tolist() == [1, 2]
    assert maskattn.topk_per_bag(s2, 1, largest=False).indices[0].tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_bags_k_larger_than_bags_and_k_zero(device):
    scores = torch.randn(3, 4, device=device)
    mask = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], device=device)
    out = maskattn.topk_per_bag(scores, 6, mask)  # k > N
    assert out.valid.sum(1).tolist() == [0, 1, 4]
    assert (out.indices[~out.valid] == 0).all() and (out.values[~out.valid] == 0).all()
    packed, offsets = maskattn.pack(scores, mask)
    out_p = maskattn.topk_per_bag(packed, 6, offsets=offsets)
    assert torch.equal(out_p.valid, out.valid)
    zero = maskattn.topk_per_bag(scores, 0, mask)
    assert zero.values.shape == zero.indices.shape == zero.valid.shape == (3, 0)
    # no rows at all: T = 0 packed, N = 0 padded, B = 0
    none_p = maskattn.topk_per_bag(
        torch.zeros(0, device=device), 2, offsets=torch.zeros(3, dtype=torch.int64, device=device)
    )
    assert none_p.valid.shape == (2, 2) and not none_p.valid.any()
    none = maskattn.topk_per_bag(torch.zeros(2, 0, device=device), 2)
    assert none.indices.shape == (2, 2) and not none.valid.any()
    no_bags = maskattn.topk_per_bag(
        torch.zeros(0, device=device), 2, offsets=torch.zeros(1, dtype=torch.int64, device=device)
    )
    assert no_bags.indices.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_values_are_differentiable_and_gradcheck(device, packed):
    scores = distinct_scores((3, 7, 2), torch.float64, device, seed=9).requires_grad_()
    mask = random_mask(3, 7, torch.bool, device, seed=10)
    if packed:
        flat, offsets = maskattn.pack(scores.detach(), mask)
        flat.requires_grad_()

        def f(s):
            return maskattn.topk_per_bag(s, 4, offsets=offsets).values

        inp = flat
    else:

        def f(s):
            return maskattn.topk_per_bag(s, 4, mask).values

        inp = scores
    assert torch.autograd.gradcheck(f, (inp,))
    out = maskattn.topk_per_bag(inp, 4, offsets=offsets) if packed else maskattn.topk_per_bag(inp, 4, mask)
    (grad,) = torch.autograd.grad(out.values.sum(), inp)
    # the gradient is 1 exactly at selected entries and 0 everywhere else (padding, invalid slots)
    expected = torch.zeros_like(inp)
    if packed:
        expected.scatter_(0, out.indices.view(-1, 2)[out.valid.view(-1, 2).all(1)], 1.0)
        assert expected.sum() == out.valid.sum()
    else:
        expected.scatter_(1, out.indices, out.valid.double())
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_and_packed_agree(device):
    scores = distinct_scores((8, 30, 2), torch.float32, device, seed=11)
    mask = random_mask(8, 30, torch.bool, device, seed=12)
    packed, offsets = maskattn.pack(scores, mask)
    for largest in (True, False):
        a = maskattn.topk_per_bag(scores, 5, mask, largest=largest)
        p = maskattn.topk_per_bag(packed, 5, offsets=offsets, largest=largest)
        assert torch.equal(a.valid, p.valid) and torch.equal(a.values, p.values)
        row_to_pos = mask.nonzero()[:, 1]  # pack's row order is row-major
        pos = row_to_pos[p.indices]
        assert torch.equal(torch.where(p.valid, pos, 0), a.indices)


def test_rejects_bad_input():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k must be a Python int >= 0"):
        maskattn.topk_per_bag(s, -1)
    with pytest.raises(ValueError, match="k must be a Python int"):
        maskattn.topk_per_bag(s, torch.tensor(2))
    with pytest.raises(ValueError, match=r"mask must be \[2, 5\]"):
        maskattn.topk_per_bag(s, 2, torch.ones(2, 4))
    with pytest.raises(ValueError, match="scores must be a floating tensor"):
        maskattn.topk_per_bag(torch.ones(2, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"padded scores must be \[B, N\] or \[B, N, K\]"):
        maskattn.topk_per_bag(torch.randn(5), 2)
    with pytest.raises(ValueError, match=r"offsets must rise from 0 to T=5"):
        maskattn.topk_per_bag(torch.randn(5), 2, offsets=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match=r"offsets must rise from 0 to T=5"):
        maskattn.topk_per_bag(torch.randn(5), 2, offsets=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"offsets must be int64"):
        maskattn.topk_per_bag(torch.randn(5), 2, offsets=torch.tensor([0.0, 5.0]))


@requires_cuda
def test_cuda_never_syncs_and_matches_cpu():
    scores = distinct_scores((16, 300, 2), torch.float32, "cpu", seed=13)
    mask = random_mask(16, 300, torch.bool, "cpu", seed=14)
    packed, offsets = maskattn.pack(scores, mask)
    ref = maskattn.topk_per_bag(scores, 8, mask)
    ref_p = maskattn.topk_per_bag(packed, 8, offsets=offsets, largest=False)
    sc, mc, pc, oc = scores.cuda(), mask.cuda(), packed.cuda(), offsets.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = maskattn.topk_per_bag(sc, 8, mc)
        out_p = maskattn.topk_per_bag(pc, 8, offsets=oc, largest=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(out, ref):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(out_p, ref_p):
        assert torch.equal(a.cpu(), b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs the CUDA build of maskattn and a GPU")
def test_cuda_unchecked_bad_offsets_stay_in_bounds():
    scores = torch.randn(10, device="cuda")
    bad = torch.tensor([0, 7, 3, 25], device="cuda")  # unsorted and past T: not checked on CUDA
    out = maskattn.topk_per_bag(scores, 4, offsets=bad)
    torch.cuda.synchronize()
    assert out.indices.shape == (3, 4) and ((out.indices >= 0) & (out.indices < 10)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_runs_under_deterministic_algorithms(device):
    scores = distinct_scores((4, 50, 2), torch.float32, device, seed=15).requires_grad_()
    mask = random_mask(4, 50, torch.bool, device, seed=16)
    packed, offsets = maskattn.pack(scores.detach(), mask)
    ref = maskattn.topk_per_bag(scores, 6, mask)
    ref_p = maskattn.topk_per_bag(packed, 6, offsets=offsets, largest=False)
    torch.use_deterministic_algorithms(True)
    try:
        out = maskattn.topk_per_bag(scores, 6, mask)
        out.values.sum().backward()
        out_p = maskattn.topk_per_bag(packed, 6, offsets=offsets, largest=False)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(out + out_p, ref + ref_p):
        assert torch.equal(a, b)
    assert scores.grad.sum() == out.valid.sum()
