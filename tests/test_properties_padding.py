"""Property tests: pad_sequences / pack / unpack against plain-Python references over generated bag
lengths (empty bags, no bags with rows, zero trailing dims), masks with padding anywhere, dtypes and
devices; gradients of pack and unpack are exact index shuffles."""

import pytest
import torch
from _props import DTYPES, examples, leaf, st_device, st_dtype, st_layout, st_seed
from hypothesis import given
from hypothesis import strategies as st

import maskattn


@st.composite
def lengths_case(draw):
    lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5))
    trailing = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    return lengths, trailing, draw(st_dtype), draw(st_device), draw(st_seed)


@examples(40)
@given(lengths_case())
def test_pad_sequences_matches_reference(case):
    lengths, trailing, dtype, device, seed = case
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn((n,) + trailing, generator=g).to(dtype).to(device) for n in lengths]
    padded, mask = maskattn.pad_sequences(seqs)
    nmax = max(lengths)
    assert padded.shape == (len(lengths), nmax) + trailing and padded.dtype == dtype
    assert mask.dtype == torch.bool and mask.shape == (len(lengths), nmax)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        assert torch.equal(padded[b, :n], s)
        assert (padded[b, n:] == 0).all()
        assert mask[b, :n].all() and not mask[b, n:].any()


@st.composite
def pack_case(draw):
    B = draw(st.integers(0, 4))
    N = draw(st.integers(0, 9))
    trailing = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    return (
        B,
        N,
        trailing,
        draw(st.sampled_from(["all", "empty", "random", "prefix"])),
        draw(st_dtype),
        draw(st_layout),
        draw(st_device),
        draw(st_seed),
    )


@examples(50)
@given(pack_case())
def test_pack_unpack_match_reference_and_roundtrip(case):
    B, N, trailing, mkind, dtype, lay, device, seed = case
    g = torch.Generator().manual_seed(seed)
    padded = torch.randn((B, N) + trailing, generator=g).to(dtype)
    if mkind == "prefix":  # the usual left-aligned padding
        lengths = torch.randint(0, N + 1, (B,), generator=g)
        mask = torch.arange(N) < lengths[:, None]
    else:
        mask = {
            "all": torch.ones(B, N, dtype=torch.bool),
            "empty": torch.zeros(B, N, dtype=torch.bool),
            "random": torch.rand(B, N, generator=g) < 0.5,
        }[mkind]
    x = leaf(padded.to(device), lay)
    packed, offsets = maskattn.pack(x, mask.to(device))
    # reference: valid rows in bag order, offsets from the per-bag counts
    rows = [padded[b, n] for b in range(B) for n in range(N) if mask[b, n]]
    ref = torch.stack(rows) if rows else padded.new_zeros((0,) + trailing)
    counts = mask.sum(1).tolist()
    ref_off = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    assert offsets.dtype == torch.int64
    assert torch.equal(offsets.cpu(), ref_off)
    assert torch.equal(packed.cpu(), ref)
    if dtype in (torch.float32, torch.float64) and packed.numel():
        gp = torch.randn(packed.shape, generator=g, dtype=torch.float64).to(dtype)
        packed.backward(gp.to(device))
        expect = torch.zeros_like(padded)
        expect[mask] = gp
        assert torch.equal(x.grad.cpu(), expect)
    # unpack: left-aligned bags, and the default max_len is the longest bag
    p2 = leaf(ref.to(device), "contiguous")
    out, m2 = maskattn.unpack(p2, offsets)
    L = max(counts) if counts else 0
    assert out.shape == (B, L) + trailing and m2.shape == (B, L)
    for b in range(B):
        assert torch.equal(out[b, : counts[b]].cpu(), padded[b][mask[b]])
        assert (out[b, counts[b] :] == 0).all()
        assert m2[b, : counts[b]].all() and not m2[b, counts[b] :].any()
    # pack(unpack(x)) == x
    rp, ro = maskattn.pack(out, m2)
    assert torch.equal(rp, p2.detach()) and torch.equal(ro.cpu(), ref_off)
    if dtype in (torch.float32, torch.float64) and out.numel():
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        out.backward(go.to(device))
        assert torch.equal(p2.grad.cpu(), go[m2.cpu()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_with_max_len_pads_further(dtype):
    packed = torch.arange(10, dtype=dtype).reshape(5, 2)
    offsets = torch.tensor([0, 2, 2, 5])
    out, m = maskattn.unpack(packed, offsets, max_len=4)
    assert out.shape == (3, 4, 2) and m.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(out[2, :3], packed[2:]) and (out[1] == 0).all()
