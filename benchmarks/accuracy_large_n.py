"""float32 accuracy of maskattn's softmax ops at large N against the layer they replace.

For each N, the same float32 data goes through maskattn and through the pure-PyTorch layer it
replaces (the MIL aggregator's ``masked_fill(-1e9) + softmax + bmm``; for ``masked_softmax`` the
Transformer's ``masked_fill + softmax``), and both are compared with a float64 reference computed
from the same float32 inputs. Printed: the largest relative error of the weights over valid
positions (weights below float32's normal range are left out: their relative error is not a
float32 property) and of the pooled outputs. Features are uniform in [0, 1) (non-negative, like
post-ReLU embeddings), so every pooled entry is a well-conditioned sum and its relative error
measures the summation itself.

    python benchmarks/accuracy_large_n.py                 # N = 1e3 ... 1e6, D = 16
    python benchmarks/accuracy_large_n.py --n 1000 40000 --d 64
"""

import argparse

import torch
import torch.nn.functional as F

import maskattn

TINY = torch.finfo(torch.float32).tiny


def rel_weights(w, ref, valid):
    w, ref = w.double(), ref.double()
    keep = valid & (ref >= TINY)
    return ((w - ref).abs()[keep] / ref[keep]).max().item()


def rel_pooled(p, ref):
    p, ref = p.double(), ref.double()
    keep = ref.abs() > 0
    return ((p - ref).abs()[keep] / ref.abs()[keep]).max().item()


def make(B, N, D, K, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B, N) if K is None else (B, N, K)
    logits = torch.randn(shape, generator=g) * 2.0
    features = torch.rand(B, N, D, generator=g)
    lengths = torch.full((B,), N)
    lengths[1:] = int(N * 0.9)  # bags of different lengths padded together
    mask = torch.arange(N)[None] < lengths[:, None]
    return logits, features, mask, lengths


def reference(logits, features, mask):
    """float64 softmax over valid rows + weighted sum, from the float32 inputs."""
    l = logits.double()
    l = l if l.dim() == 3 else l.unsqueeze(-1)
    z = l.masked_fill(~mask[..., None], float("-inf"))
    w = torch.softmax(z, dim=1)
    pooled = torch.einsum("bnk,bnd->bkd", w, features.double())
    if logits.dim() == 2:
        return pooled[:, 0], w[..., 0]
    return pooled, w


def torch_layer(logits, features, mask):
    """The MIL aggregator's pooling step in float32: masked_fill(-1e9), softmax over N, bmm (for
    K = 1 on [B, N] logits, as the aggregator writes it)."""
    if logits.dim() == 2:
        w = F.softmax(logits.masked_fill(~mask, -1e9), dim=1)
        return torch.bmm(w.unsqueeze(1), features)[:, 0], w
    w = F.softmax(logits.masked_fill(~mask[..., None], -1e9), dim=1)
    return torch.bmm(w.transpose(1, 2), features), w


def pool_rows(N, D, K, packed):
    logits, features, mask, lengths = make(2, N, D, K, seed=N + (K or 1))
    rp, rw = reference(logits, features, mask)
    tp, tw = torch_layer(logits, features, mask)
    if packed:
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        p, wpk = maskattn.masked_attention_pool_packed(logits[mask], features[mask], offsets)
        w = torch.zeros_like(logits)
        w[mask] = wpk
    else:
        p, w = maskattn.masked_attention_pool(logits, features, mask)
    vm = mask if K is None else mask[..., None].expand_as(logits)
    return (
        rel_weights(w, rw, vm),
        rel_weights(tw, rw, vm),
        rel_pooled(p, rp),
        rel_pooled(tp, rp),
    )


def softmax_rows(N):
    g = torch.Generator().manual_seed(N)
    scores = torch.randn(4, N, generator=g) * 2.0
    mask = torch.rand(4, N, generator=g) < 0.9
    ref = torch.softmax(scores.double().masked_fill(~mask, float("-inf")), -1)
    ours = maskattn.masked_softmax(scores, mask, dim=-1)
    theirs = F.softmax(scores.masked_fill(~mask, -1e9), -1)
    return rel_weights(ours, ref, mask), rel_weights(theirs, ref, mask), float("nan"), float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 40000, 100000, 1000000])
    p.add_argument("--d", type=int, default=16, help="feature dim of the pooling cases")
    a = p.parse_args(argv)
    cases = [
        ("masked_attention_pool K=1", lambda n: pool_rows(n, a.d, None, False)),
        ("masked_attention_pool K=4", lambda n: pool_rows(n, a.d, 4, False)),
        ("masked_attention_pool_packed K=1", lambda n: pool_rows(n, a.d, None, True)),
        ("masked_attention_pool_packed K=4", lambda n: pool_rows(n, a.d, 4, True)),
        ("masked_softmax dim=-1", softmax_rows),
    ]
    print(
        f"float32, relative error vs a float64 reference; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print()
    print("| op | N | weights maskattn | weights torch | pooled maskattn | pooled torch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, fn in cases:
        for n in a.n:
            wm, wt, pm, pt = fn(n)
            pooled = "" if pm != pm else f" {pm:.2e} | {pt:.2e} |"
            print(f"| {name} | {n} | {wm:.2e} | {wt:.2e} |" + (pooled or " - | - |"), flush=True)


if __name__ == "__main__":
    main()
