"""PyG-style segment indices: offsets_from_batch, sort_by_batch, batch_from_offsets, the batch=
argument of masked_attention_pool_packed, and parity with torch_geometric's AttentionalAggregation
(skipped when torch_geometric is not installed)."""

import pytest
import torch
from conftest import DEVICES, requires_cuda  # noqa: E402

import maskattn


def offsets_reference(batch, num_bags):
    counts = torch.bincount(batch.cpu().long(), minlength=num_bags)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


def pool_reference(logits, x, batch, num_bags):
    """Float64 scatter softmax + weighted sum, one bag at a time, on rows in any order."""
    pooled = torch.zeros(num_bags, x.shape[1], dtype=torch.float64)
    weights = torch.zeros(x.shape[0], dtype=torch.float64)
    for b in range(num_bags):
        rows = (batch == b).nonzero().flatten().cpu()
        if rows.numel():
            w = torch.softmax(logits.cpu().double()[rows], 0)
            weights[rows] = w
            pooled[b] = w @ x.cpu().double()[rows]
    return pooled, weights


def random_batch(sizes, device):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)


SIZES = [3, 0, 5, 1, 4, 0]  # empty bags in between and at the end


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_sorted_batch_gives_offsets_with_empty_bags(device, dtype):
    batch = random_batch(SIZES, device).to(dtype)
    off = maskattn.offsets_from_batch(batch)  # num_bags from the data: the trailing empty bag is lost
    assert off.dtype == torch.int64 and off.device == batch.device
    assert off.tolist() == offsets_reference(batch, 5).tolist() == [0, 3, 3, 8, 9, 13]
    off6 = maskattn.offsets_from_batch(batch, num_bags=6)
    assert off6.tolist() == offsets_reference(batch, 6).tolist()
    assert maskattn.offsets_from_batch(torch.zeros(0, dtype=dtype, device=device)).tolist() == [0]
    assert maskattn.offsets_from_batch(torch.zeros(0, dtype=dtype, device=device), num_bags=2).tolist() == [0, 0, 0]
    # batch_from_offsets is the inverse
    assert torch.equal(maskattn.batch_from_offsets(off6, int(batch.numel())), batch.long())
    assert torch.equal(maskattn.batch_from_offsets(off6), batch.long())


def test_unsorted_batch_raises_naming_the_first_out_of_order_position():
    batch = torch.tensor([0, 0, 1, 2, 1, 1, 0])
    with pytest.raises(
        ValueError, match=r"offsets_from_batch: batch must be sorted.*batch\[4\] = 1 < batch\[3\] = 2"
    ) as e:
        maskattn.offsets_from_batch(batch)
    assert "first out-of-order position 4" in str(e.value) and "sort_by_batch" in str(e.value)


def test_bad_ids_raise():
    with pytest.raises(
        ValueError, match=r"offsets_from_batch: batch holds bag ids in \[0, 3\], outside \[0, num_bags=2\)"
    ):
        maskattn.offsets_from_batch(torch.tensor([0, 1, 3]), num_bags=2)
    with pytest.raises(ValueError, match=r"bag ids in \[-1, 1\]"):
        maskattn.offsets_from_batch(torch.tensor([-1, 0, 1]))
    with pytest.raises(ValueError, match="batch must be a 1-D integer tensor"):
        maskattn.offsets_from_batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_bags must be an int >= 0"):
        maskattn.offsets_from_batch(torch.tensor([0, 1]), num_bags=-1)
    with pytest.raises(ValueError, match="sort_by_batch: tensors\\[1\\] must have T=3 rows"):
        maskattn.sort_by_batch(torch.tensor([1, 0, 1]), torch.randn(3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"sort_by_batch: batch holds bag ids in \[0, 5\]"):
        maskattn.sort_by_batch(torch.tensor([1, 0, 5]), num_bags=3)
    with pytest.raises(ValueError, match="batch_from_offsets: offsets must rise from 0 to total=4"):
        maskattn.batch_from_offsets(torch.tensor([0, 3, 2, 4]), 4)


@pytest.mark.parametrize("device", DEVICES)
def test_offsets_from_an_unsorted_index_are_wrong_and_sort_by_batch_fixes_it(device):
    # The trap the check guards against: counting rows per id gives offsets that describe other
    # bags than the ids do when the rows are interleaved.
    g = torch.Generator().manual_seed(0)
    batch = random_batch(SIZES, "cpu")[torch.randperm(13, generator=g)].to(device)
    x = torch.randn(13, 4, generator=g, dtype=torch.float64).to(device)
    logits = torch.randn(13, generator=g, dtype=torch.float64).to(device)
    ref, ref_w = pool_reference(logits, x, batch, 6)
    naive = offsets_reference(batch, 6).to(device)
    wrong, _ = maskattn.masked_attention_pool_packed(logits, x, naive)
    assert not torch.allclose(wrong.cpu(), ref)
    s = maskattn.sort_by_batch(batch, logits, x, num_bags=6)
    pooled, w_sorted = maskattn.masked_attention_pool_packed(*s.tensors, s.offsets)
    torch.testing.assert_close(pooled.cpu(), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w_sorted[s.inverse].cpu(), ref_w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_sort_by_batch_is_stable_invertible_and_differentiable(device):
    batch = torch.tensor([2, 0, 2, 1, 0, 2, 0], device=device)
    rows = torch.arange(7, device=device)
    x = torch.randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    s = maskattn.sort_by_batch(batch, rows, x)
    assert s.batch.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert s.tensors[0].tolist() == [1, 4, 6, 3, 0, 2, 5]  # rows of a bag keep their order
    assert torch.equal(s.perm, s.tensors[0]) and s.offsets.tolist() == [0, 3, 4, 7]
    assert torch.equal(s.tensors[1][s.inverse], x) and torch.equal(s.batch[s.inverse], batch)
    g = torch.randn(7, 3, dtype=torch.float64, device=device)
    (s.tensors[1] * g).sum().backward()
    assert torch.equal(x.grad, g[s.inverse])
    assert maskattn.sort_by_batch(batch, num_bags=5).offsets.tolist() == [0, 3, 4, 7, 7, 7]


@pytest.mark.parametrize("device", DEVICES)
def test_pool_packed_batch_argument(device):
    g = torch.Generator().manual_seed(1)
    batch = random_batch(SIZES, device)
    x = torch.randn(13, 5, generator=g).to(device)
    logits = torch.randn(13, 2, generator=g).to(device)
    off = maskattn.offsets_from_batch(batch, 6)
    p1, w1 = maskattn.masked_attention_pool_packed(logits, x, off)
    p2, w2 = maskattn.masked_attention_pool_packed(logits, x, batch=batch, num_bags=6)
    assert torch.equal(p1, p2) and torch.equal(w1, w2) and p2.shape == (6, 2, 5)
    p3, _ = maskattn.masked_attention_pool_packed(logits, x, batch=batch)
    assert torch.equal(p3, p1[:5])
    with pytest.raises(ValueError, match="pass offsets or batch, not both"):
        maskattn.masked_attention_pool_packed(logits, x, off, batch=batch)
    with pytest.raises(ValueError, match="offsets .* is required"):
        maskattn.masked_attention_pool_packed(logits, x)
    with pytest.raises(ValueError, match="num_bags goes with batch="):
        maskattn.masked_attention_pool_packed(logits, x, off, num_bags=6)
    if device == "cpu":
        with pytest.raises(ValueError, match="batch must be sorted"):
            maskattn.masked_attention_pool_packed(logits, x, batch=batch.flip(0))


@requires_cuda
def test_cuda_conversion_never_syncs_unless_asked():
    batch = random_batch(SIZES, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        off = maskattn.offsets_from_batch(batch, num_bags=6)  # check=None: unchecked on CUDA
        ids = maskattn.batch_from_offsets(off, 13)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert off.tolist() == offsets_reference(batch, 6).tolist() and torch.equal(ids, batch)
    with pytest.raises(ValueError, match="batch must be sorted"):
        maskattn.offsets_from_batch(batch.flip(0), 6, check=True)
    # unchecked unsorted ids: wrong but in range
    off_bad = maskattn.offsets_from_batch(batch.flip(0), 6)
    assert ((off_bad >= 0) & (off_bad <= 13)).all()


# ---- parity with torch_geometric (optional)


def _pyg():
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn.aggr import AttentionalAggregation
    from torch_geometric.utils import softmax as pyg_softmax

    return AttentionalAggregation, pyg_softmax


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_matches_pyg_attentional_aggregation(device, order):
    AttentionalAggregation, pyg_softmax = _pyg()
    torch.manual_seed(0)
    f, h, num_bags = 6, 8, 6
    gate_nn = torch.nn.Sequential(torch.nn.Linear(f, h), torch.nn.Tanh(), torch.nn.Linear(h, 1))
    gate_nn = gate_nn.double().to(device)
    aggr = AttentionalAggregation(gate_nn)
    batch = random_batch(SIZES, device)
    if order == "unsorted":
        batch = batch[torch.randperm(batch.numel()).to(device)]
    x = torch.randn(batch.numel(), f, dtype=torch.float64, device=device)
    x_pyg, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    ref = aggr(x_pyg, batch, dim_size=num_bags)
    ref_w = pyg_softmax(gate_nn(x_pyg).squeeze(-1), batch, num_nodes=num_bags)
    if order == "sorted":
        ours, w = maskattn.masked_attention_pool_packed(
            gate_nn(x_ours).squeeze(-1), x_ours, maskattn.offsets_from_batch(batch, num_bags)
        )
    else:
        with pytest.raises(ValueError, match="batch must be sorted") if device == "cpu" else _nullcontext():
            maskattn.offsets_from_batch(batch, num_bags, check=True)
        s = maskattn.sort_by_batch(batch, x_ours, num_bags=num_bags)
        (xs,) = s.tensors
        ours, w_sorted = maskattn.masked_attention_pool_packed(gate_nn(xs).squeeze(-1), xs, s.offsets)
        w = w_sorted[s.inverse]
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-12)
    assert (ours[[1, 5]] == 0).all()  # empty bags pool to zeros, as PyG's sum over no rows

    gout = torch.randn_like(ref)
    g_pyg = torch.autograd.grad((ref * gout).sum(), [x_pyg, *gate_nn.parameters()])
    g_ours = torch.autograd.grad((ours * gout).sum(), [x_ours, *gate_nn.parameters()])
    for a, b in zip(g_ours, g_pyg):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
