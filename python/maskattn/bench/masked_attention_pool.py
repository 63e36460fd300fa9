"""Attention pooling over padded bags: the seed's masked_fill + softmax + bmm against maskattn.

What is timed is the pooling step the seed's ``AttentionAggregator`` performs after its scoring
MLP (logits -> weights -> pooled); the MLP is the same nn.Linear stack on both sides and is
left out so that the numbers measure what maskattn replaces.
"""

import torch
import torch.nn.functional as F

import maskattn

from ._harness import Row, maybe_compile, timeit

SUITE = "masked_attention_pool"

CPU_SHAPES = [(8, 2400, 512), (4, 8192, 1024), (1, 50000, 1024)]
GPU_SHAPES = CPU_SHAPES + [(16, 4096, 1024), (1, 100000, 1024)]
QUICK_SHAPES = [(2, 300, 64), (1, 2000, 128)]


def aggregator_pool(logits, features, mask):
    """shared/seeds/000, AttentionAggregator.forward after the MLP."""
    logits = logits.masked_fill(mask == 0, -1e9)
    w = F.softmax(logits, dim=1)
    return torch.bmm(w.unsqueeze(1), features).squeeze(1), w


def ours_pool(logits, features, mask):
    return maskattn.masked_attention_pool(logits, features, mask)


def add_args(p):
    p.add_argument(
        "--pool-dtype", default=None, help="dtype for the pool suite (default: float32 on CPU, bfloat16 on CUDA)"
    )


def _make(B, N, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(B, N, generator=g).to(device=device, dtype=dtype)
    features = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    # bags of different sizes padded together, as in the seed (2,000 vs 2,400 patches)
    lengths = torch.randint(int(N * 0.8), N + 1, (B,), generator=g)
    lengths[0] = N
    mask = (torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    return logits, features, mask


def run(args):
    dev = args.device
    dtype = (
        getattr(torch, args.pool_dtype)
        if getattr(args, "pool_dtype", None)
        else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    )
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    min_time = args.min_time
    rows = []
    seed_c = maybe_compile(aggregator_pool, not args.no_compile)
    for B, N, D in shapes:
        case = f"B={B} N={N} D={D} {str(dtype).replace('torch.', '')}"
        logits, features, mask = _make(B, N, D, dtype, dev)
        fbytes = features.numel() * features.element_size()
        print(f"[pool] {case}", flush=True)

        # forward
        fwd = {
            "seed eager": lambda: aggregator_pool(logits, features, mask),
            "maskattn": lambda: ours_pool(logits, features, mask),
        }
        if seed_c is not None:
            fwd["seed compiled"] = lambda: seed_c(logits, features, mask)
        # the floor: one streaming read of the features, the least any forward must do
        fwd["floor: read features once"] = lambda: features.sum(dtype=torch.float32)
        for impl in ("seed eager", "seed compiled", "maskattn", "floor: read features once"):
            if impl in fwd:
                t = timeit(fwd[impl], dev, min_time)
                rows.append(Row(SUITE, case, "fwd", impl, t * 1e3, fbytes / t / 1e9))
        if dev.type == "cuda":
            # the bandwidth the GPU goal is stated against: a device-to-device copy
            # (GB/s counts the read and the write)
            dst = torch.empty_like(features)
            t = timeit(lambda: dst.copy_(features), dev, min_time)
            rows.append(Row(SUITE, case, "fwd", "device copy (read+write)", t * 1e3, 2 * fbytes / t / 1e9))
            del dst

        # forward + backward: frozen features (pre-extracted MIL features), then trainable ones
        for mode, feat_grad in (("fwd+bwd frozen features", False), ("fwd+bwd trainable features", True)):
            l = logits.clone().requires_grad_()
            f = features.clone().requires_grad_(feat_grad)
            inputs = (l, f) if feat_grad else (l,)
            gp = torch.randn(B, D, device=dev, dtype=dtype)

            def step(fn):
                def go():
                    pooled, _ = fn(l, f, mask)
                    return torch.autograd.grad(pooled, inputs, gp)

                return go

            impls = {"seed eager": step(aggregator_pool), "maskattn": step(ours_pool)}
            if seed_c is not None:
                impls["seed compiled"] = step(seed_c)
            for impl in ("seed eager", "seed compiled", "maskattn"):
                if impl in impls:
                    t = timeit(impls[impl], dev, min_time)
                    # bytes the fused op must move: read features twice (fwd, bwd), write grad once if trainable
                    moved = fbytes * (3 if feat_grad else 2)
                    rows.append(Row(SUITE, case, mode, impl, t * 1e3, moved / t / 1e9))
        del logits, features, mask
    return rows
