"""A gated ABMIL head trained over many bags: CLAM's per-bag loop against nn.AttentionPooling.

The model is CLAM's (``Attn_Net_Gated``, L=1024 features, D=256 hidden, one branch) plus a linear
bag classifier, trained on pre-extracted (frozen) features, one fwd+bwd over a set of bags of
log-normally distributed sizes (whole-slide bags: a median and a spread of about 2.7x either way):

- baseline: CLAM's training loop, one bag at a time with gradient accumulation (CLAM trains with
  a batch size of 1): ``A = softmax(net(h).T)``, ``M = A @ h``, ``loss.backward()`` per bag;
- compiled: the same per-bag step under ``torch.compile(dynamic=True)`` (bag sizes vary);
- maskattn packed: ``AttentionPooling(features [T, D], offsets=...)``, one call for all bags;
- maskattn padded: ``AttentionPooling(features [b, N_max, D], mask)`` over padded batches of
  ``--mil-pad-batch`` bags in draw order (what ``DataLoader(batch_size=b)`` with a padding collate
  gives; the padding fraction is in the case name), no instance budget, one backward per batch;
- maskattn packed in the same batches: the padded row's batches without their padding, so that
  the two differ in layout only.

Before timing, every implementation's parameter gradients are checked against the loop's.

A stage case times what ``AttentionPooling(gated=True)`` runs after the two input GEMMs, CLAM's
``attention_c(tanh(a) * sigmoid(b))``, against ``maskattn.gated_attention_scores`` on the same
GEMM outputs (rows of 256 hidden units; the floor: v and u read forward, read again and their
gradients written backward).

A second layer compares with PyG's ``AttentionalAggregation`` on the same packed rows (when
``torch_geometric`` is installed): ``gate_nn = Linear(F, 1)`` (the pooling itself) and
``Sequential(Linear(F, 256), Tanh, Linear(256, 1))``, converted with ``AttentionPooling.from_pyg``.

Default: 16 bags at medians 100 and 800 (about a minute on 2 cores); ``--mil-full``: 64 bags at
medians 100, 800, 2,000 and 9,000 (the whole-slide configuration; many minutes and several GB on
CPU); ``--quick``: a tiny model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import maskattn

from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, VARIANT, Case, Impl, Layer

LAYER = Layer("CLAM gated ABMIL head, per-bag loop (fwd+bwd over many bags)", "maskattn.nn.AttentionPooling")
SCORING = Layer(
    "CLAM gated attention scoring after its Linear layers, attention_c(tanh(a) * sigmoid(b))",
    "maskattn.gated_attention_scores",
)
PYG_LAYER = Layer("PyG AttentionalAggregation", "maskattn.nn.AttentionPooling.from_pyg")
LOOP = "CLAM per-bag loop + grad accumulation (eager)"
LOOP_COMPILED = "CLAM per-bag loop (compiled, dynamic)"
PACKED = "AttentionPooling packed (offsets)"
PADDED = "AttentionPooling padded (mask)"
PACKED_BATCHES = "AttentionPooling packed, same batches as padded"
SIGMA = 1.0  # log-normal spread of bag sizes: a factor e^1 = 2.7 either side of the median
N_CLASSES = 2


class ClamGatedNet(nn.Module):
    """CLAM's ``Attn_Net_Gated`` (parameter layout and forward as its paper code defines them)."""

    def __init__(self, L, D, n_classes=1):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid())
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x) * self.attention_b(x)), x


def add_args(p):
    g = p.add_argument_group("attention_pooling suite")
    g.add_argument(
        "--mil-full",
        action="store_true",
        help="attention_pooling suite: 64 bags at medians 100, 800, 2000, 9000 (slow: minutes and GBs on CPU)",
    )
    g.add_argument("--mil-bags", type=int, default=None, help="attention_pooling suite: bags per case")
    g.add_argument(
        "--mil-medians", default=None, help="attention_pooling suite: comma-separated median bag sizes, e.g. 100,800"
    )
    g.add_argument("--mil-pad-batch", type=int, default=8, help="attention_pooling suite: bags per padded batch (8)")
    g.add_argument(
        "--mil-max-padded-gb",
        type=float,
        default=4.0,
        help="attention_pooling suite: skip the padded variant when its batches need more GB (4)",
    )
    g.add_argument(
        "--mil-max-pyg-gb",
        type=float,
        default=4.0,
        help="attention_pooling suite: skip PyG's rows when its [T, F] temporaries need more GB (4)",
    )


def bag_sizes(n_bags: int, median: int, seed: int = 0):
    """Log-normal bag sizes (median ``median``, spread ``SIGMA``), at least 1 and at most 50x the median."""
    g = torch.Generator().manual_seed(seed + median)
    z = torch.randn(n_bags, generator=g, dtype=torch.float64)
    sizes = (math.log(median) + SIGMA * z).exp().round().clamp(1, 50 * median).long()
    return sizes.tolist()


def _config(args):
    if args.quick:
        dims, medians, bags = (64, 16), [40], 8
    elif getattr(args, "mil_full", False):
        dims, medians, bags = (1024, 256), [100, 800, 2000, 9000], 64
    else:
        dims, medians, bags = (1024, 256), [100, 800], 16
    if getattr(args, "mil_medians", None):
        medians = [int(m) for m in args.mil_medians.split(",")]
    if getattr(args, "mil_bags", None):
        bags = args.mil_bags
    return dims, medians, bags


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _check_same(name, ref, got):
    # float32 sums in another order: relative to each gradient, and to the largest one for the
    # gradients that are zero in exact arithmetic (the last layer's bias: softmax ignores a shift)
    overall = max(a.abs().max().item() for a in ref)
    for i, (a, b) in enumerate(zip(ref, got)):
        scale = a.abs().max().item()
        err = (a - b).abs().max().item()
        if not err <= 2e-4 * scale + 1e-5 * overall:
            raise AssertionError(
                f"{name}: parameter gradient {i} differs from the loop's by {err:.3g} (scale {scale:.3g})"
            )


def clam_scoring(a, b, w, bias):
    """CLAM's Attn_Net_Gated after its two Linear layers: attention_c(tanh(a) * sigmoid(b))."""
    return F.linear(torch.tanh(a) * torch.sigmoid(b), w, bias)


def _scoring_floor(a, b, mode):
    """The least memory traffic of the scoring stage as plain torch ops: a and b read (forward), then
    read again and two gradients of their size written (backward, into preallocated tensors)."""
    a, b = a.detach(), b.detach()
    if mode == "fwd":
        return "floor: read a and b", lambda: (a.sum(dtype=torch.float32), b.sum(dtype=torch.float32))
    ga, gb = torch.empty_like(a), torch.empty_like(b)

    def fn():
        a.sum(dtype=torch.float32), b.sum(dtype=torch.float32)
        return ga.copy_(a), gb.copy_(b)

    return "floor: read a and b, then read them and write two gradients", fn


def scoring_cases(args, H):
    dev = args.device
    compiled = None if args.no_compile else torch.compile(clam_scoring)
    for M in (512,) if args.quick else (8192, 65536):
        g = torch.Generator().manual_seed(M)
        a, b = (torch.randn(M, H, generator=g).to(dev).requires_grad_() for _ in range(2))
        w, bias = torch.randn(1, H, generator=g).to(dev).requires_grad_(), torch.zeros(1, device=dev).requires_grad_()
        rows = M * H * a.element_size()
        for mode in ("fwd", "fwd+bwd"):

            def run(f, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return f(a, b, w, bias)
                return torch.autograd.grad(f(a, b, w, bias).sum(), [a, b, w, bias])

            impls = [Impl("tanh(a) * sigmoid(b) -> Linear (eager)", lambda run=run: run(clam_scoring), BASELINE)]
            if compiled is not None:
                impls.append(Impl("same (compiled)", lambda run=run: run(compiled), COMPILED))
            impls.append(
                Impl("maskattn.gated_attention_scores", lambda run=run: run(maskattn.gated_attention_scores), MASKATTN)
            )
            impls.append(Impl(*_scoring_floor(a, b, mode), FLOOR))
            floor = 2 * rows if mode == "fwd" else 6 * rows
            yield Case(SCORING, f"M={M} H={H} K=1", mode, impls, detail="the GEMM outputs given", bytes_moved=floor)
        del a, b, w, bias


def cases(args):
    dev = args.device
    (L, H), medians, n_bags = _config(args)
    yield from scoring_cases(args, H)
    torch.manual_seed(0)
    net = ClamGatedNet(L, H).to(dev)
    head = nn.Linear(L, N_CLASSES).to(dev)
    pool = maskattn.nn.AttentionPooling.from_clam(net)
    pool_head = nn.Linear(L, N_CLASSES).to(dev)
    pool_head.load_state_dict(head.state_dict())
    ref_params = list(net.parameters()) + list(head.parameters())
    our_params = list(pool.parameters()) + list(pool_head.parameters())

    def bag_step(h, y):
        A, h = net(h)
        A = torch.softmax(A.transpose(0, 1), dim=1)  # [1, N]
        M = A @ h  # [1, L]
        return F.cross_entropy(head(M), y, reduction="sum")

    compiled_step = None
    if not args.no_compile:
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        compiled_step = torch.compile(bag_step, dynamic=True)

    for median in medians:
        sizes = bag_sizes(n_bags, median)
        T = sum(sizes)
        g = torch.Generator().manual_seed(median)
        x = torch.randn(T, L, generator=g).to(dev)
        labels = torch.randint(0, N_CLASSES, (n_bags,), generator=g).to(dev)
        offsets = torch.tensor([0] + sizes).cumsum(0).to(dev)
        bags = [x[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        ys = [labels[i : i + 1] for i in range(n_bags)]

        pb = max(1, args.mil_pad_batch)
        chunks = [sizes[i : i + pb] for i in range(0, n_bags, pb)]
        pad_rows = sum(len(c) * max(c) for c in chunks)
        pad_frac = 1 - T / pad_rows
        padded = None
        if pad_rows * L * x.element_size() <= args.mil_max_padded_gb * 1e9:
            padded = [maskattn.pad_sequences(bags[i : i + pb]) for i in range(0, n_bags, pb)]
        padded_y = [labels[i : i + pb] for i in range(0, n_bags, pb)]

        def zero():
            for p in ref_params + our_params:
                p.grad = None

        def loop(step=bag_step):
            def go():
                zero()
                for h, y in zip(bags, ys):
                    step(h, y).backward()  # CLAM: one bag per step, gradients accumulated

            return go

        def packed():
            zero()
            pooled, _ = pool(x, offsets=offsets)
            F.cross_entropy(pool_head(pooled), labels, reduction="sum").backward()

        def padded_run():
            zero()
            for (feats, mask), y in zip(padded, padded_y):
                pooled, _ = pool(feats, mask)
                F.cross_entropy(pool_head(pooled), y, reduction="sum").backward()

        batches = [
            (offsets[i : i + pb + 1] - offsets[i], offsets[i].item(), offsets[min(i + pb, n_bags)].item())
            for i in range(0, n_bags, pb)
        ]

        def packed_batches():
            zero()
            for (o, a, b), y in zip(batches, padded_y):
                pooled, _ = pool(x[a:b], offsets=o)
                F.cross_entropy(pool_head(pooled), y, reduction="sum").backward()

        loop()()
        ref = _grads(ref_params)
        for name, fn in ((PACKED, packed), (PADDED, padded_run if padded else None), (PACKED_BATCHES, packed_batches)):
            if fn is not None:
                fn()
                _check_same(name, ref, _grads(our_params))

        case = f"{n_bags} bags median {median} (T={T}) L={L} D={H} pad {pad_frac:.0%}"
        impls = [Impl(LOOP, loop(), BASELINE)]
        if compiled_step is not None:
            impls.append(Impl(LOOP_COMPILED, loop(compiled_step), COMPILED))
        impls.append(Impl(PACKED, packed, MASKATTN))
        impls.append(
            Impl(
                PADDED,
                padded_run if padded else None,
                VARIANT,
                note="" if padded else f"padded batches would take {pad_rows * L * 4 / 1e9:.1f} GB",
            )
        )
        impls.append(Impl(PACKED_BATCHES, packed_batches, VARIANT))
        yield Case(LAYER, case, "fwd+bwd", impls, detail=f"frozen features, padded in batches of {pb}")
        impls = None

        yield from _pyg_cases(args, x, offsets, n_bags, L, H, median, T)
        del x, bags, padded


def _pyg_cases(args, x, offsets, n_bags, L, H, median, T):
    try:
        from torch_geometric.nn.aggr import AttentionalAggregation
    except ImportError:
        AttentionalAggregation = None
    dev = x.device
    batch = maskattn.batch_from_offsets(offsets, T)
    for gate_name, make_gate in (
        ("gate Linear(F, 1)", lambda: nn.Linear(L, 1)),
        (f"gate MLP F-{H}-1 tanh", lambda: nn.Sequential(nn.Linear(L, H), nn.Tanh(), nn.Linear(H, 1))),
    ):
        for trainable in (False, True):
            torch.manual_seed(1)
            gate = make_gate().to(dev)
            xx = x.detach().requires_grad_(trainable)  # the same storage: no copy of [T, F]
            go = torch.randn(n_bags, L, device=dev)
            impls = []
            # gate * x, its gradient and the product in the gate's gradient, plus x's gradient
            pyg_gb = (3 + trainable) * T * L * x.element_size() / 1e9
            if AttentionalAggregation is None or pyg_gb > getattr(args, "mil_max_pyg_gb", 4.0):
                why = (
                    "torch_geometric not installed"
                    if AttentionalAggregation is None
                    else f"PyG's [T, F] temporaries would take {pyg_gb:.1f} GB (--mil-max-pyg-gb)"
                )
                impls.append(Impl("PyG AttentionalAggregation", None, BASELINE, note=why))
                impls.append(Impl(PACKED, None, MASKATTN, note="no PyG baseline here"))
            else:
                aggr = AttentionalAggregation(gate).to(dev)
                ours = maskattn.nn.AttentionPooling.from_pyg(aggr)
                inputs_ref = list(aggr.parameters()) + ([xx] if trainable else [])
                inputs_ours = list(ours.parameters()) + ([xx] if trainable else [])

                def pyg():
                    return torch.autograd.grad(aggr(xx, batch, dim_size=n_bags), inputs_ref, go)

                def mine():
                    return torch.autograd.grad(ours(xx, offsets=offsets)[0], inputs_ours, go)

                ga, gb = pyg(), mine()
                _check_same("AttentionPooling.from_pyg", ga, gb)
                impls.append(Impl("PyG AttentionalAggregation", pyg, BASELINE))
                impls.append(Impl(PACKED, mine, MASKATTN))
            detail = f"{gate_name}, {'trainable' if trainable else 'frozen'} features"
            case = f"{n_bags} bags median {median} (T={T}) F={L}"
            yield Case(PYG_LAYER, case, "fwd+bwd", impls, detail=detail)
            if AttentionalAggregation is None:
                return  # one row says why, not four
