"""Attention pooling over padded bags: CLAM/ABMIL's AttentionAggregator against maskattn.

What is timed is the pooling step the AttentionAggregator of CLAM / ABMIL-style MIL classifiers
performs after its scoring MLP (logits -> ``masked_fill(mask == 0, -1e9)`` -> softmax over N ->
``bmm``); the MLP is the same nn.Linear stack on both sides and is left out so that the numbers
measure what maskattn replaces.
"""

import torch
import torch.nn.functional as F

import maskattn

from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, REFERENCE, Case, Impl, Layer, maybe_compile

LAYER = Layer("CLAM/ABMIL AttentionAggregator pooling", "maskattn.masked_attention_pool")
EAGER = "CLAM/ABMIL AttentionAggregator (eager)"
COMPILED_NAME = "CLAM/ABMIL AttentionAggregator (compiled)"
OURS = "maskattn.masked_attention_pool"

CPU_SHAPES = [(8, 2400, 512), (4, 8192, 1024), (1, 50000, 1024)]
GPU_SHAPES = CPU_SHAPES + [(16, 4096, 1024), (1, 100000, 1024)]
QUICK_SHAPES = [(2, 300, 64), (1, 2000, 128)]


def aggregator_pool(logits, features, mask):
    """AttentionAggregator.forward after the scoring MLP."""
    logits = logits.masked_fill(mask == 0, -1e9)
    w = F.softmax(logits, dim=1)
    return torch.bmm(w.unsqueeze(1), features).squeeze(1), w


def ours_pool(logits, features, mask):
    return maskattn.masked_attention_pool(logits, features, mask)


def add_args(p):
    p.add_argument(
        "--pool-dtype",
        default=None,
        help="dtype for the masked_attention_pool suite (default: float32 on CPU, bfloat16 on CUDA)",
    )


def _make(B, N, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, N, generator=g).to(device=device, dtype=dtype)
    features = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    # bags of different sizes padded together (2,000 vs 2,400 patches in a typical slide batch)
    lengths = torch.randint(int(N * 0.8), N + 1, (B,), generator=g)
    lengths[0] = N
    mask = (torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return logits, features, mask


def cases(args):
    dev = args.device
    dtype = (
        getattr(torch, args.pool_dtype)
        if getattr(args, "pool_dtype", None)
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    compiled = maybe_compile(aggregator_pool, not args.no_compile)
    for B, N, D in shapes:
        case = f"B={B} N={N} D={D} {str(dtype).replace('torch.', '')}"
        logits, features, mask = _make(B, N, D, dtype, dev)
        fbytes = features.numel() * features.element_size()

        impls = [Impl(EAGER, lambda: aggregator_pool(logits, features, mask), BASELINE)]
        if compiled is not None:
            impls.append(Impl(COMPILED_NAME, lambda: compiled(logits, features, mask), COMPILED))
        impls.append(Impl(OURS, lambda: ours_pool(logits, features, mask), MASKATTN))
        # one streaming read of the features: the least any forward must do
        impls.append(Impl("floor: read features once", lambda: features.sum(dtype=torch.float32), FLOOR))
        if dev.type == "cuda":
            # the bandwidth a GPU kernel is judged against: a device-to-device copy (read + write)
            dst = torch.empty_like(features)
            impls.append(Impl("device copy (read + write)", lambda: dst.copy_(features), REFERENCE))
        yield Case(LAYER, case, "fwd", impls, bytes_moved=fbytes)
        impls = dst = None

        # forward + backward: frozen features (pre-extracted MIL features), then trainable ones
        for detail, feat_grad in (("frozen features", False), ("trainable features", True)):
            l = logits.clone().requires_grad_()
            f = features.clone().requires_grad_(feat_grad)
            inputs = (l, f) if feat_grad else (l,)
            gp = torch.randn(B, D, device=dev, dtype=dtype)

            def step(fn):
                def go():
                    pooled, _ = fn(l, f, mask)
                    return torch.autograd.grad(pooled, inputs, gp)

                return go

            impls = [Impl(EAGER, step(aggregator_pool), BASELINE)]
            if compiled is not None:
                impls.append(Impl(COMPILED_NAME, step(compiled), COMPILED))
            impls.append(Impl(OURS, step(ours_pool), MASKATTN))
            # bytes the fused op must move: read features twice (fwd, bwd), write their grad once if trainable
            yield Case(LAYER, case, "fwd+bwd", impls, detail=detail, bytes_moved=fbytes * (3 if feat_grad else 2))
        del logits, features, mask, l, f
