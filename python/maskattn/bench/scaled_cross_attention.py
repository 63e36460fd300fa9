"""Few-shot prototype cross-attention with a learnable clamped logit scale, against maskattn.

The layer replaced L2-normalises queries and prototypes, multiplies the cosine logits by
``exp(logit_scale_log).clamp(max=100)``, subtracts the row max, softmaxes and pools the prototypes.
Timed: that computation forward and forward+backward (gradients for queries, prototypes and the
scale), and the training step's logging (the layer's training loop reads four statistics back with
``.item()``; maskattn's module keeps them as device tensors).
"""

import math

import torch
import torch.nn.functional as F

import maskattn

from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, Case, Impl, Layer, maybe_compile

LAYER = Layer("prototype cross-attention, clamped learnable logit scale", "maskattn.scaled_cross_attention")
NAME = "prototype cross-attention"

SHAPES = [(8, 300, 5, 640), (32, 196, 64, 512)]  # (B, Lq, Lk, D): 5-way episodes, 64-prototype patch queries
QUICK_SHAPES = [(4, 50, 5, 64), (4, 32, 64, 64)]


def prototype_xattn(query, prototypes, logit_scale_log, logit_scale_max: float = 100.0):
    """The layer's compute_cross_attention (values = the prototypes)."""
    q = F.normalize(query, dim=-1)
    k = F.normalize(prototypes, dim=-1)
    attn_logits = torch.matmul(q, k.transpose(-1, -2))
    scale = torch.exp(logit_scale_log).clamp(max=logit_scale_max)
    s = attn_logits * scale
    s = s - s.max(dim=-1, keepdim=True)[0]
    attn = F.softmax(s, dim=-1)
    return torch.matmul(attn, prototypes), attn


def prototype_stats(attn, logit_scale_log, logit_scale_max: float = 100.0):
    """The layer's logged statistics: four host syncs."""
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
    p.add_argument("--xattn-dtype", default=None, help="dtype for the scaled_cross_attention suite (default: float32)")


def cases(args):
    dev = args.device
    dtype = getattr(torch, args.xattn_dtype) if getattr(args, "xattn_dtype", None) else torch.float32
    shapes = QUICK_SHAPES if args.quick else SHAPES
    compiled = maybe_compile(prototype_xattn, not args.no_compile)
    for B, Lq, Lk, D in shapes:
        case = f"B={B} Lq={Lq} Lk={Lk} D={D} {str(dtype).replace('torch.', '')}"
        g = torch.Generator().manual_seed(0)
        protos = torch.randn(B, Lk, D, generator=g)
        labels = torch.randint(0, Lk, (B, Lq), generator=g)
        query = torch.gather(protos, 1, labels.unsqueeze(-1).expand(B, Lq, D)) + torch.randn(B, Lq, D, generator=g)
        query, protos = query.to(dev, dtype), protos.to(dev, dtype)
        lsl = torch.tensor(math.log(25.0), device=dev, requires_grad=True)
        qbytes = query.numel() * query.element_size()

        def no_grad(fn):
            def go():
                with torch.no_grad():
                    return fn(query, protos, lsl)

            return go

        impls = [Impl(f"{NAME} (eager)", no_grad(prototype_xattn), BASELINE)]
        if compiled is not None:
            impls.append(Impl(f"{NAME} (compiled)", no_grad(compiled), COMPILED))
        impls.append(Impl("maskattn.scaled_cross_attention", no_grad(ours_xattn), MASKATTN))
        # one read of the queries and one write of the output: the least the forward must move
        dst = torch.empty_like(query)
        impls.append(Impl("floor: read q + write out", lambda: dst.copy_(query), FLOOR))
        yield Case(LAYER, case, "fwd", impls, bytes_moved=2 * qbytes)
        impls = dst = None

        q = query.clone().requires_grad_()
        k = protos.clone().requires_grad_()
        go = torch.randn(B, Lq, D, device=dev, dtype=dtype)
        mod = maskattn.nn.LearnableScaleCrossAttention(D).to(dev)
        for detail, log in (("grads of q, prototypes, scale", False), ("same + logged stats", True)):

            def step(fn, log=log):
                def go_step():
                    out, attn = fn(q, k, lsl)
                    grads = torch.autograd.grad(out, (q, k, lsl), go)
                    if log:
                        return grads, prototype_stats(attn.detach(), lsl.detach())
                    return grads

                return go_step

            def module_step():
                out, attn = mod(q, k)
                grads = torch.autograd.grad(out, (q, k, mod.logit_scale_log), go)
                return grads, mod.stats  # device tensors: read back only when printed

            impls = [Impl(f"{NAME} (eager)", step(prototype_xattn), BASELINE)]
            if compiled is not None:
                impls.append(Impl(f"{NAME} (compiled)", step(compiled), COMPILED))
            if log:
                impls.append(Impl("maskattn.nn.LearnableScaleCrossAttention", module_step, MASKATTN))
            else:
                impls.append(Impl("maskattn.scaled_cross_attention", step(ours_xattn), MASKATTN))
            # bytes the fused path must move: q and grad_out read, out and grad_q written
            yield Case(LAYER, case, "fwd+bwd", impls, detail=detail, bytes_moved=4 * qbytes)
        del query, protos, q, k, go, mod
