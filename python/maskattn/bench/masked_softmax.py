"""Suite "softmax": masked_softmax, patch_mask and MaskedSelfAttention against the seed layers.

Seed layers (transcribed from the JiT padded-image model and the Transformer padding-mask recipe):
``scores.masked_fill(mask == 0, -inf).softmax(-1)``, the reshape-mean-threshold patch mask, and the
timm-style MultiHeadAttention with that masked softmax followed by ``x * patch_mask``.
"""

import torch
import torch.nn as nn

from .._ops.masked_softmax import masked_softmax
from .._ops.patch_mask import patch_mask
from ..nn.masked_self_attention import MaskedSelfAttention
from ._harness import Row, maybe_compile, timeit

SUITE = "masked_softmax"


# ---- seed layers, verbatim in their arithmetic ----
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


def _time_set(rows, case, mode, fns, device, args, gbytes=None):
    """fns: list of (impl, callable or None). gbytes: bytes the op must move, for GB/s."""
    for impl, fn in fns:
        if fn is None:
            continue
        try:
            # --quick is a smoke test: a few runs each, so that the whole suite takes seconds.
            t = timeit(fn, device, min_time=min(args.min_time, 0.05) if args.quick else args.min_time)
        except Exception as e:  # a compile failure is reported, not fatal
            rows.append(Row(SUITE, case, mode, impl, float("nan"), notes=f"failed: {type(e).__name__}"))
            continue
        rows.append(Row(SUITE, case, mode, impl, t * 1e3, gbps=(gbytes / t / 1e9) if gbytes else None))


def run(args):
    dev = args.device
    rows = []
    cuda = dev.type == "cuda"
    compile_ok = not args.no_compile

    # ---- masked_softmax, [B,H,N,N] scores with a [B,1,1,N] key mask ----
    shapes = [(2, 4, 128, 128)] if args.quick else [(8, 8, 256, 256), (4, 12, 512, 512)]
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda else [])
    for (B, H, N, _), dt in [(s, d) for s in shapes for d in dtypes]:
        x = torch.randn(B, H, N, N, device=dev, dtype=dt)
        m = _key_mask(B, N, dev)[:, None, None, :]
        case = f"[{B},{H},{N},{N}] {str(dt)[6:]}"
        nbytes = 2 * x.numel() * x.element_size()
        seed_c = maybe_compile(jit_masked_softmax, compile_ok)
        _time_set(
            rows,
            case,
            "masked softmax fwd",
            [
                ("seed eager", lambda: jit_masked_softmax(x, m)),
                ("seed compiled", (lambda: seed_c(x, m)) if seed_c is not None else None),
                ("maskattn", lambda: masked_softmax(x, m)),
                ("floor: copy (1 read + 1 write)", lambda: x.clone()),
            ],
            dev,
            args,
            gbytes=nbytes,
        )
        xg = x.clone().requires_grad_()
        go = torch.randn_like(x)

        def seed_fb():
            torch.autograd.grad(jit_masked_softmax(xg, m), xg, go)

        def ours_fb():
            torch.autograd.grad(masked_softmax(xg, m), xg, go)

        seed_fb_c = maybe_compile(lambda t, mk: jit_masked_softmax(t, mk), compile_ok)
        _time_set(
            rows,
            case,
            "masked softmax fwd+bwd",
            [
                ("seed eager", seed_fb),
                (
                    "seed compiled",
                    (lambda: torch.autograd.grad(seed_fb_c(xg, m), xg, go)) if seed_fb_c is not None else None,
                ),
                ("maskattn", ours_fb),
            ],
            dev,
            args,
        )

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
    seed_pm_c = maybe_compile(lambda t: jit_patch_mask(t, p), compile_ok)
    case = f"B={B} {S}x{S} p={p}"
    _time_set(
        rows,
        case,
        "patch mask (float mask)",
        [
            ("seed eager", lambda: jit_patch_mask(img, p)),
            ("seed compiled", (lambda: seed_pm_c(img)) if seed_pm_c is not None else None),
            ("maskattn", lambda: patch_mask(img, p)),
        ],
        dev,
        args,
        gbytes=img.numel() * img.element_size(),
    )
    _time_set(
        rows,
        case,
        "patch mask (bool mask)",
        [
            ("seed eager", lambda: jit_patch_mask(img_bool.float(), p)),
            ("maskattn", lambda: patch_mask(img_bool, p)),
        ],
        dev,
        args,
        gbytes=img_bool.numel(),
    )

    # ---- module: seed MultiHeadAttention (+ output zeroing) vs MaskedSelfAttention ----
    if cuda:
        dim, heads, B, mdt = 1024, 16, 8, torch.bfloat16
    else:
        dim, heads, B, mdt = 256, 4, 4, torch.float32
    seqs = [128] if args.quick else [256, 1024]
    torch.manual_seed(0)
    seed_mod = JiTAttention(dim, heads).to(dev, mdt).eval()
    ours = MaskedSelfAttention(dim, heads).to(dev, mdt).eval()
    ours.load_state_dict(seed_mod.state_dict())
    seed_mod_c = maybe_compile(seed_mod, compile_ok)
    for N in seqs:
        x = torch.randn(B, N, dim, device=dev, dtype=mdt)
        for pad in (0.0, 0.3):
            valid = (
                _key_mask(B, N, dev, frac_valid=1.0 - pad, seed=N)
                if pad
                else torch.ones(B, N, dtype=torch.bool, device=dev)
            )
            vf = valid.to(mdt)
            case = f"B={B} N={N} dim={dim} pad={int(pad * 100)}%"
            with torch.no_grad():
                _time_set(
                    rows,
                    case,
                    f"self-attention fwd {str(mdt)[6:]}",
                    [
                        ("seed eager", lambda: seed_mod(x, vf)),
                        ("seed compiled", (lambda: seed_mod_c(x, vf)) if seed_mod_c is not None else None),
                        ("maskattn", lambda: ours(x, mask=valid)),
                    ],
                    dev,
                    args,
                )
            xg = x.clone().requires_grad_()
            _time_set(
                rows,
                case,
                f"self-attention fwd+bwd {str(mdt)[6:]}",
                [
                    ("seed eager", lambda: seed_mod(xg, vf).sum().backward()),
                    ("maskattn", lambda: ours(xg, mask=valid).sum().backward()),
                ],
                dev,
                args,
            )
    return rows
