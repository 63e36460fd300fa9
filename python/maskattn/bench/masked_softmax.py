"""masked_softmax, patch_mask and MaskedSelfAttention against the layers of JiT's padded-image model.

The layers replaced (transcribed from the JiT pixel diffusion transformer trained on padded images,
and the Transformer key-padding-mask recipe): ``scores.masked_fill(mask == 0, -inf).softmax(-1)``,
the reshape-mean-threshold patch mask, and the timm-style multi-head attention with that masked
softmax followed by ``x * patch_mask``.
"""

import torch
import torch.nn as nn

from .._ops.masked_softmax import masked_softmax
from .._ops.patch_mask import patch_mask
from ..nn.masked_self_attention import MaskedSelfAttention
from ._harness import BASELINE, COMPILED, FLOOR, MASKATTN, Case, Impl, Layer, maybe_compile

SOFTMAX = Layer("JiT / key-padding masked softmax, masked_fill(-inf) + softmax", "maskattn.masked_softmax")
PATCH = Layer("JiT patch mask, reshape + mean > 0.5", "maskattn.patch_mask")
ATTENTION = Layer("JiT Attention module, masked_fill(-inf) + padded rows zeroed", "maskattn.nn.MaskedSelfAttention")


# ---- the JiT layers, verbatim in their arithmetic ----
def jit_masked_softmax(scores, mask):
    return scores.masked_fill(mask == 0, float("-inf")).softmax(dim=-1)


def jit_patch_mask(mask, p):
    B, H, W = mask.shape
    mask_patches = mask.reshape(B, H // p, p, W // p, p).mean(dim=(2, 4))
    return (mask_patches > 0.5).float().reshape(B, -1)


class JiTAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, attention_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if attention_mask is not None:
            attn = attn.masked_fill(attention_mask.unsqueeze(1).unsqueeze(2) == 0, float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))
        return x * attention_mask.unsqueeze(-1) if attention_mask is not None else x


def _key_mask(B, N, device, frac_valid=0.7, seed=0):
    """Left-aligned valid masks whose lengths average frac_valid * N (each within +-10% of N)."""
    g = torch.Generator().manual_seed(seed)
    frac = (frac_valid + (torch.rand(B, generator=g) - 0.5) * 0.2).clamp(1.0 / N, 1.0)
    lengths = (frac * N).round().long().clamp(min=1)
    return (torch.arange(N)[None, :] < lengths[:, None]).to(device)


def _impls(eager_name, eager, compiled, ours_name, ours, floor=None):
    """[baseline (eager), baseline (compiled) when compiling, maskattn, floor when given]."""
    out = [Impl(f"{eager_name} (eager)", eager, BASELINE)]
    if compiled is not None:
        out.append(Impl(f"{eager_name} (compiled)", compiled, COMPILED))
    out.append(Impl(ours_name, ours, MASKATTN))
    if floor is not None:
        out.append(Impl(floor[0], floor[1], FLOOR))
    return out


def cases(args):
    dev = args.device
    cuda = dev.type == "cuda"
    compile_ok = not args.no_compile

    # ---- masked_softmax, [B,H,N,N] scores with a [B,1,1,N] key mask ----
    shapes = [(2, 4, 128, 128)] if args.quick else [(8, 8, 256, 256), (4, 12, 512, 512)]
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda else [])
    softmax_c = maybe_compile(jit_masked_softmax, compile_ok)
    name = "JiT attention softmax, masked_fill(-inf)"
    for (B, H, N, _), dt in [(s, d) for s in shapes for d in dtypes]:
        x = torch.randn(B, H, N, N, device=dev, dtype=dt)
        m = _key_mask(B, N, dev)[:, None, None, :]
        case = f"[{B},{H},{N},{N}] {str(dt)[6:]}"
        yield Case(
            SOFTMAX,
            case,
            "fwd",
            _impls(
                name,
                lambda: jit_masked_softmax(x, m),
                (lambda: softmax_c(x, m)) if softmax_c is not None else None,
                "maskattn.masked_softmax",
                lambda: masked_softmax(x, m),
                ("floor: copy scores (1 read + 1 write)", lambda: x.clone()),
            ),
            bytes_moved=2 * x.numel() * x.element_size(),
        )
        xg = x.clone().requires_grad_()
        go = torch.randn_like(x)
        yield Case(
            SOFTMAX,
            case,
            "fwd+bwd",
            _impls(
                name,
                lambda: torch.autograd.grad(jit_masked_softmax(xg, m), xg, go),
                (lambda: torch.autograd.grad(softmax_c(xg, m), xg, go)) if softmax_c is not None else None,
                "maskattn.masked_softmax",
                lambda: torch.autograd.grad(masked_softmax(xg, m), xg, go),
            ),
            # scores read, probs written; grad_out and probs read, grad_in written
            bytes_moved=5 * x.numel() * x.element_size(),
        )
        del x, xg, go

    # ---- patch_mask: B x H x W image mask -> [B, (H/p)(W/p)] ----
    B, S, p = (4, 64, 16) if args.quick else (32, 256, 16)
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(B, S, S)
    for b in range(B):
        h, w = (
            int(torch.randint(S // 4, S + 1, (1,), generator=g)),
            int(torch.randint(S // 4, S + 1, (1,), generator=g)),
        )
        img[b, :h, :w] = 1
    img = img.to(dev)
    img_bool = img.bool()
    pm_c = maybe_compile(lambda t: jit_patch_mask(t, p), compile_ok)
    pm_bool_c = maybe_compile(lambda t: jit_patch_mask(t.float(), p), compile_ok)
    case = f"B={B} {S}x{S} p={p}"
    yield Case(
        PATCH,
        case,
        "fwd",
        _impls(
            "JiT patch mask, reshape-mean > 0.5",
            lambda: jit_patch_mask(img, p),
            (lambda: pm_c(img)) if pm_c is not None else None,
            "maskattn.patch_mask",
            lambda: patch_mask(img, p),
        ),
        detail="float image mask",
        bytes_moved=img.numel() * img.element_size(),
    )
    yield Case(
        PATCH,
        case,
        "fwd",
        _impls(
            "JiT patch mask on mask.float()",
            lambda: jit_patch_mask(img_bool.float(), p),
            (lambda: pm_bool_c(img_bool)) if pm_bool_c is not None else None,
            "maskattn.patch_mask",
            lambda: patch_mask(img_bool, p),
        ),
        detail="bool image mask",
        bytes_moved=img_bool.numel(),
    )

    # ---- module: JiT's Attention (+ output zeroing) vs MaskedSelfAttention ----
    if cuda:
        dim, heads, B, mdt = 1024, 16, 8, torch.bfloat16
    else:
        dim, heads, B, mdt = 256, 4, 4, torch.float32
    seqs = [128] if args.quick else [256, 1024]
    torch.manual_seed(0)
    jit_mod = JiTAttention(dim, heads).to(dev, mdt).eval()
    ours = MaskedSelfAttention(dim, heads).to(dev, mdt).eval()
    ours.load_state_dict(jit_mod.state_dict())
    jit_mod_c = maybe_compile(jit_mod, compile_ok)
    name = "JiT Attention module"
    for N in seqs:
        x = torch.randn(B, N, dim, device=dev, dtype=mdt)
        for pad in (0.0, 0.3):
            valid = (
                _key_mask(B, N, dev, frac_valid=1.0 - pad, seed=N)
                if pad
                else torch.ones(B, N, dtype=torch.bool, device=dev)
            )
            vf = valid.to(mdt)
            case = f"B={B} N={N} dim={dim} pad={int(pad * 100)}% {str(mdt)[6:]}"

            def no_grad(fn):
                def go():
                    with torch.no_grad():
                        return fn()

                return go

            yield Case(
                ATTENTION,
                case,
                "fwd",
                _impls(
                    name,
                    no_grad(lambda: jit_mod(x, vf)),
                    no_grad(lambda: jit_mod_c(x, vf)) if jit_mod_c is not None else None,
                    "maskattn.nn.MaskedSelfAttention",
                    no_grad(lambda: ours(x, mask=valid)),
                ),
            )
            xg = x.clone().requires_grad_()
            yield Case(
                ATTENTION,
                case,
                "fwd+bwd",
                _impls(
                    name,
                    lambda: jit_mod(xg, vf).sum().backward(),
                    (lambda: jit_mod_c(xg, vf).sum().backward()) if jit_mod_c is not None else None,
                    "maskattn.nn.MaskedSelfAttention",
                    lambda: ours(xg, mask=valid).sum().backward(),
                ),
            )
