"""Few-shot prototype cross-attention with a learnable clamped logit scale: the seed against maskattn.

The seed (shared/seeds/003) L2-normalises queries and prototypes, multiplies the cosine logits by
``exp(logit_scale_log).clamp(max=100)``, subtracts the row max, softmaxes and pools the prototypes.
Timed: that computation forward and forward+backward (gradients for queries, prototypes and the
scale), and the training step's logging (the seed reads four statistics back with ``.item()``;
maskattn's module keeps them as device tensors).
"""

import math

import torch
import torch.nn.functional as F

import maskattn

from ._harness import Row, maybe_compile, timeit, timeit_interleaved

SUITE = "scaled_cross_attention"

SHAPES = [(8, 300, 5, 640), (32, 196, 64, 512)]  # (B, Lq, Lk, D), per the issue
QUICK_SHAPES = [(4, 50, 5, 64), (4, 32, 64, 64)]


def prototype_xattn(query, prototypes, logit_scale_log, logit_scale_max: float = 100.0):
    """shared/seeds/003, compute_cross_attention (values = the prototypes)."""
    q = F.normalize(query, dim=-1)
    k = F.normalize(prototypes, dim=-1)
    attn_logits = torch.matmul(q, k.transpose(-1, -2))
    scale = torch.exp(logit_scale_log).clamp(max=logit_scale_max)
    s = attn_logits * scale
    s = s - s.max(dim=-1, keepdim=True)[0]
    attn = F.softmax(s, dim=-1)
    return torch.matmul(attn, prototypes), attn


def prototype_stats(attn, logit_scale_log, logit_scale_max: float = 100.0):
    """The seed's logged statistics: four host syncs."""
    current = torch.exp(logit_scale_log).clamp(max=logit_scale_max)
    return {
        "attn_entropy": (-(attn * torch.log(attn + 1e-8)).sum(-1)).mean().item(),
        "attn_max": attn.max(-1)[0].mean().item(),
        "logit_scale": current.item(),
        "logit_scale_clipped": (torch.exp(logit_scale_log) >= logit_scale_max).float().item(),
    }


def ours_xattn(query, prototypes, logit_scale_log, logit_scale_max: float = 100.0):
    return maskattn.scaled_cross_attention(query, prototypes, prototypes, logit_scale_log, logit_scale_max, None, True)


def add_args(p):
    p.add_argument("--xattn-dtype", default=None, help="dtype for the xattn suite (default: float32)")


def run(args):
    dev = args.device
    dtype = getattr(torch, args.xattn_dtype) if getattr(args, "xattn_dtype", None) else torch.float32
    shapes = QUICK_SHAPES if args.quick else SHAPES
    min_time = args.min_time
    seed_c = maybe_compile(prototype_xattn, not args.no_compile)
    rows = []
    for B, Lq, Lk, D in shapes:
        case = f"B={B} Lq={Lq} Lk={Lk} D={D} {str(dtype).replace('torch.', '')}"
        print(f"[xattn] {case}", flush=True)
        g = torch.Generator().manual_seed(0)
        protos = torch.randn(B, Lk, D, generator=g)
        labels = torch.randint(0, Lk, (B, Lq), generator=g)
        query = torch.gather(protos, 1, labels.unsqueeze(-1).expand(B, Lq, D)) + torch.randn(B, Lq, D, generator=g)
        query, protos = query.to(dev, dtype), protos.to(dev, dtype)
        lsl = torch.tensor(math.log(25.0), device=dev, requires_grad=True)
        qbytes = query.numel() * query.element_size()

        impls = {"seed eager": prototype_xattn, "maskattn": ours_xattn}
        if seed_c is not None:
            impls["seed compiled"] = seed_c
        order = ("seed eager", "seed compiled", "maskattn")

        # The implementations of one mode are timed interleaved: this host class is noisy.
        with torch.no_grad():
            ts = timeit_interleaved(
                {impl: (lambda fn=impls[impl]: fn(query, protos, lsl)) for impl in order if impl in impls},
                dev,
                min_time,
            )
            for impl, t in ts.items():
                rows.append(Row(SUITE, case, "fwd", impl, t * 1e3, 2 * qbytes / t / 1e9))
            # the floor the GPU goal is stated against: one read of the queries, one write of the output
            dst = torch.empty_like(query)
            t = timeit(lambda: dst.copy_(query), dev, min_time)
            rows.append(Row(SUITE, case, "fwd", "floor: read q + write out", t * 1e3, 2 * qbytes / t / 1e9))
            del dst

        q = query.clone().requires_grad_()
        k = protos.clone().requires_grad_()
        go = torch.randn(B, Lq, D, device=dev, dtype=dtype)
        for mode, log in (("fwd+bwd (q, protos, scale)", False), ("fwd+bwd + logged stats", True)):
            steps = {}
            for impl in order:
                if impl not in impls:
                    continue
                fn = impls[impl]
                mod = maskattn.nn.LearnableScaleCrossAttention(D).to(dev) if impl == "maskattn" else None

                def go_step(fn=fn, mod=mod, log=log):
                    if mod is not None and log:
                        out, attn = mod(q, k)
                        grads = torch.autograd.grad(out, (q, k, mod.logit_scale_log), go)
                        return grads, mod.stats  # device tensors: read back only when printed
                    out, attn = fn(q, k, lsl)
                    grads = torch.autograd.grad(out, (q, k, lsl), go)
                    if log:
                        return grads, prototype_stats(attn.detach(), lsl.detach())
                    return grads

                steps[impl] = go_step
            for impl, t in timeit_interleaved(steps, dev, min_time).items():
                # bytes the fused path must move: q and grad_out read, out and grad_q written
                rows.append(Row(SUITE, case, mode, impl, t * 1e3, 4 * qbytes / t / 1e9))
        del query, protos, q, k, go
    return rows
