"""Tensors past 2^31 elements: indexing must be 64-bit wherever sizes demand it.

Marked `large` (pyproject.toml leaves them out of the default run): each needs ~9 GiB of memory.
Run with:  python -m pytest -m large tests/test_large.py -s

Every check is against a float64 reference computed in row chunks, on sampled columns / rows that
include the elements past offset 2^31 (the last rows and the last columns), so an index that wraps
at 2^31 reads the wrong element or faults.
"""

import gc
import resource

import pytest
import torch

import maskattn

pytestmark = pytest.mark.large

DT = torch.bfloat16
D = 1024
N = (1 << 21) + 3  # N * D = 2^31 + 3072 feature elements (4 GiB in bfloat16)
CHUNK = 1 << 15


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sample_cols(gen):
    cols = torch.randperm(D, generator=gen)[:29]
    return torch.cat([cols, torch.tensor([0, D - 2, D - 1])]).unique()


def _sample_rows(n, gen):
    rows = torch.randint(0, n, (61,), generator=gen)
    return torch.cat([rows, torch.tensor([0, n - 3, n - 2, n - 1])]).unique()


def _features(n, gen):
    # Filled in row chunks so the float32 temporary stays small.
    f = torch.empty(n, D, dtype=DT)
    for r0 in range(0, n, 1 << 18):
        r1 = min(n, r0 + (1 << 18))
        f[r0:r1] = torch.randn(r1 - r0, D, generator=gen).to(DT)
    return f


def _ref_bag(logits, f, rows_valid, gp, cols):
    """float64 softmax weights over the valid rows, pooled[cols], and g = f @ gp (for grad_logits)."""
    l64 = logits.double().masked_fill(~rows_valid, float("-inf"))
    w = torch.softmax(l64, 0)
    if not bool(rows_valid.any()):
        w = torch.zeros_like(l64)
    pooled = torch.zeros(len(cols), dtype=torch.float64)
    g = torch.empty(f.shape[0], dtype=torch.float64)
    for r0 in range(0, f.shape[0], CHUNK):
        fc = f[r0 : r0 + CHUNK].double()
        pooled += w[r0 : r0 + CHUNK] @ fc[:, cols]
        g[r0 : r0 + CHUNK] = fc @ gp
    return w, pooled, g


def _check_grads(gl, gf, w, g, gp, rows, cols):
    # grad_features[n, d] = w[n] * gp[d];  grad_logits[n] = w[n] * (g[n] - sum_m w[m] g[m])
    exp_gf = w[rows, None] * gp[cols][None, :]
    torch.testing.assert_close(gf[rows][:, cols].double(), exp_gf, atol=2e-3, rtol=2e-2)
    c = (w * g).sum()
    torch.testing.assert_close(gl[rows].double(), w[rows] * (g[rows] - c), atol=2e-5, rtol=3e-2)


def test_pool_padded_over_2_31_elements():
    gen = torch.Generator().manual_seed(0)
    feats = _features(N, gen).unsqueeze(0)  # [1, N, D]
    assert feats.numel() > 2**31
    logits = torch.randn(1, N, generator=gen).to(DT)
    mask = torch.rand(1, N, generator=gen) > 0.25
    mask[0, -2:] = True  # the rows past offset 2^31 take part
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    pooled, weights = maskattn.masked_attention_pool(logits, feats, mask)
    gp = torch.randn(1, D, generator=gen).to(DT)
    gl, gf = torch.autograd.grad(pooled, (logits, feats), gp)
    feats = feats.detach()
    cols, rows = _sample_cols(gen), _sample_rows(N, gen)
    w, ref, g = _ref_bag(logits.detach()[0], feats[0], mask[0], gp[0].double(), cols)
    torch.testing.assert_close(weights.detach()[0, rows].double(), w[rows], atol=1e-7, rtol=1e-2)
    torch.testing.assert_close(pooled.detach()[0, cols].double(), ref, atol=2e-4, rtol=2e-2)
    _check_grads(gl[0], gf[0], w, g, gp[0].double(), rows, cols)
    print(f"\npadded pool [1, {N}, {D}] bf16: peak RSS {_peak_rss_gib():.2f} GiB")


def test_pool_packed_over_2_31_elements():
    gen = torch.Generator().manual_seed(1)
    feats = _features(N, gen)  # [T, D]
    cuts = [0, 12345, N - 7, N - 7, N]  # an empty bag, and a last bag lying past offset 2^31
    offsets = torch.tensor(cuts, dtype=torch.int64)
    logits = torch.randn(N, generator=gen).to(DT)
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    pooled, weights = maskattn.masked_attention_pool_packed(logits, feats, offsets)
    gp = torch.randn(len(cuts) - 1, D, generator=gen).to(DT)
    gl, gf = torch.autograd.grad(pooled, (logits, feats), gp)
    feats = feats.detach()
    cols = _sample_cols(gen)
    for b in range(len(cuts) - 1):
        lo, hi = cuts[b], cuts[b + 1]
        if hi == lo:
            assert torch.all(pooled.detach()[b] == 0)
            continue
        valid = torch.ones(hi - lo, dtype=torch.bool)
        w, ref, g = _ref_bag(logits.detach()[lo:hi], feats[lo:hi], valid, gp[b].double(), cols)
        rows = _sample_rows(hi - lo, gen)
        torch.testing.assert_close(weights.detach()[lo:hi][rows].double(), w[rows], atol=1e-7, rtol=1e-2)
        torch.testing.assert_close(pooled.detach()[b, cols].double(), ref, atol=2e-4, rtol=2e-2)
        _check_grads(gl[lo:hi], gf[lo:hi], w, g, gp[b].double(), rows, cols)
    print(f"\npacked pool [{N}, {D}] bf16: peak RSS {_peak_rss_gib():.2f} GiB")


def test_masked_softmax_over_2_31_elements():
    gen = torch.Generator().manual_seed(2)
    rows_n, n = (1 << 11) + 1, 1 << 20  # 2^31 + 2^20 scores
    scores = torch.empty(rows_n, n, dtype=DT)
    for r0 in range(0, rows_n, 256):
        scores[r0 : r0 + 256] = torch.randn(min(256, rows_n - r0), n, generator=gen).to(DT)
    mask = torch.rand(1, n, generator=gen) > 0.5  # a key mask, broadcast over the rows
    y = maskattn.masked_softmax(scores, mask, dim=-1, scale=0.5)
    rows = _sample_rows(rows_n, gen)
    ref = torch.softmax((0.5 * scores[rows].double()).masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(y[rows].double(), ref, atol=1e-8, rtol=1e-2)
    del scores
    gc.collect()
    # backward with a broadcast (zero-stride) gradient, as autograd may hand it
    grad = torch.randn(1, n, generator=gen).to(DT).expand(rows_n, n)
    gx = torch.ops.maskattn._masked_softmax_backward(grad, y, -1, 0.5)
    y64, g64 = y[rows].double(), grad[rows].double()
    ref_gx = 0.5 * y64 * (g64 - (y64 * g64).sum(-1, keepdim=True))
    torch.testing.assert_close(gx[rows].double(), ref_gx, atol=1e-8, rtol=2e-2)
    print(f"\nmasked_softmax [{rows_n}, {n}] bf16: peak RSS {_peak_rss_gib():.2f} GiB")
