"""Property tests: topk_per_bag over generated batches (bag sizes 0..12, masks with padding
anywhere, k from 0 past N, heavy ties, -inf scores, branches, every dtype, permuted score strides)
against the stable per-bag reference, padded and packed, on every device."""

import torch
from _props import examples, st_device, st_dtype, st_mask_dtype, st_seed
from hypothesis import given
from hypothesis import strategies as st
from reference_topk_per_bag import stable_topk

import maskattn
from maskattn import _topk


@st.composite
def case(draw):
    b = draw(st.integers(0, 5))
    n = draw(st.integers(0, 12))
    branches = draw(st.sampled_from([None, 1, 3]))
    k = draw(st.integers(0, n + 2))
    return (
        b,
        n,
        branches,
        k,
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st_dtype),
        draw(st_mask_dtype),
        draw(st_device),
        draw(st_seed),
    )


def scores_for(b, n, branches, ties, dtype, device, seed, transposed):
    g = torch.Generator().manual_seed(seed)
    shape = (b, n) if branches is None else (b, n, branches)
    if ties:
        s = torch.randint(-2, 3, shape, generator=g).double()
        s[s == -2] = float("-inf")
    else:
        s = torch.randn(shape, generator=g, dtype=torch.float64)
    s = s.to(dtype)  # ties can also come from rounding to a half type: the reference sees the same values
    if transposed and branches is not None:
        s = s.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, K] with N fastest
    return s.to(device)


def expected_tensors(ref, b, k, branches):
    kk = 1 if branches is None else branches
    idx = torch.zeros(b, k, kk, dtype=torch.int64)
    val = torch.zeros(b, k, kk, dtype=torch.float64)
    ok = torch.zeros(b, k, kk, dtype=torch.bool)
    for i in range(b):
        for j in range(kk):
            pos, vals = ref[i][j]
            idx[i, : len(pos), j] = torch.tensor(pos, dtype=torch.int64)
            val[i, : len(vals), j] = torch.tensor(vals, dtype=torch.float64)
            ok[i, : len(pos), j] = True
    if branches is None:
        idx, val, ok = idx[..., 0], val[..., 0], ok[..., 0]
    return idx, val, ok


@examples(80)
@given(case())
def test_padded_and_packed_match_the_stable_reference(c):
    b, n, branches, k, ties, largest, dtype, mask_dtype, device, seed = c
    scores = scores_for(b, n, branches, ties, dtype, device, seed, transposed=bool(seed % 2))
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(b, n, generator=g) < 0.6).to(mask_dtype).to(device)
    idx, val, ok = expected_tensors(stable_topk(scores, k, mask, largest), b, k, branches)

    # The public call, plus the algorithms a CUDA device takes (no host reads), forced on any device.
    padded_runs = [
        maskattn.topk_per_bag(scores, k, mask, largest=largest),
        _topk._padded(scores, k, mask, largest, host_checks=False),
    ]
    for out in padded_runs:
        assert torch.equal(out.valid.cpu(), ok)
        assert torch.equal(out.indices.cpu(), idx)
        assert torch.equal(out.values.cpu().double(), val) and out.values.dtype == dtype

    packed, offsets = maskattn.pack(scores, mask)
    packed_runs = [
        maskattn.topk_per_bag(packed, k, offsets=offsets, largest=largest),
        _topk._packed(packed, k, None, offsets, largest, sync_free=True),
        _topk._packed(packed, k, None, offsets, largest, sync_free=False, host_checks=False),
    ]
    row_to_pos = (mask.cpu() != 0).nonzero()[:, 1]
    for outp in packed_runs:
        assert torch.equal(outp.valid.cpu(), ok)
        if row_to_pos.numel():
            pos = torch.where(outp.valid.cpu(), row_to_pos[outp.indices.cpu()], 0)
            assert torch.equal(pos, idx)
        assert torch.equal(outp.values.cpu().double(), val)
