"""The op registry: one entry per ``torch.ops.maskattn`` op, backward ops included, as torchvision's
op tester base class keeps one per op. tests/conftest.py re-exports it.

An entry gives the op's name, a builder of valid sample inputs on a device in a floating dtype, the
arguments its autograd formula differentiates, the role of each tensor argument (which dtypes it
accepts: what the fuzzer in tests/_fuzz.py must see rejected), and a pure-PyTorch reference that
takes the op's own arguments (in float64) and returns its outputs. The generic tests
(tests/test_op_registry.py: opcheck, fake vs real, mixed devices, reference; tests/test_fuzz_ops.py:
malformed arguments in a child process) run for every entry, and a new op without an entry fails
test_every_op_has_a_registry_entry.

References of the backward ops are written from the op's arguments alone (the saved weights, the
saved output), not by differentiating the forward reference, because that is all the backward op
sees: they check the op as a public entry point with its own contract.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from reference_foreground_mask import reference_content_mask
from reference_gated_attention_scores import reference_activation, reference_gated_attention_scores
from reference_gated_masked_mean import reference_gated_masked_mean
from reference_masked_attention_pool import reference_pool, reference_pool_packed
from reference_masked_channel_attention_pool import reference_channel_pool, reference_channel_pool_packed
from reference_scaled_cross_attention import prototype_cross_attention

import maskattn  # noqa: F401  (loads the ops)
from maskattn.bench.foreground_mask import synthetic_faces

ops = torch.ops.maskattn
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Roles of tensor arguments: which dtypes the op accepts there.
FLOAT = "float"  # the op's floating dtype, shared with every other FLOAT argument
SCALAR = "scalar"  # a 0-dim tensor of any floating dtype (a learnable logit scale)
MASK = "mask"  # bool, integer or floating (nonzero = valid); never complex
OFFSETS = "offsets"  # int64 [B+1] packed-bag offsets
IMAGE = "image"  # uint8 or floating images


@dataclass
class Sample:
    args: tuple
    desc: str
    grad: Optional[Tuple[str, ...]] = None  # args that require grad in opcheck; None: all differentiable


@dataclass
class OpEntry:
    name: str
    samples: Callable[[str, torch.dtype], List[Sample]]
    reference: Callable[..., tuple]
    roles: Dict[str, str]
    differentiable: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = (torch.float64, torch.float32)  # reference-checked dtypes
    tol: Dict[torch.dtype, float] = field(default_factory=lambda: {torch.float64: 1e-9, torch.float32: 1e-4})

    @property
    def op(self):
        return getattr(ops, self.name).default

    @property
    def arg_names(self) -> List[str]:
        return [a.name for a in self.op._schema.arguments]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _cv(device, dtype):
    """Converter of CPU float64 values to the sample's device and dtype (non-floating kept)."""

    def cv(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return cv


def _rows_stored_first(t):
    """t with its first two dims stored swapped (channels-first features, read in place)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _empty():
    return torch.empty(0, dtype=torch.float64)


# ------------------------------------------------------------------ masked_attention_pool (+ packed)


def _pool_values(g, B, N, D, K):
    logits = _randn(g, *((B, N) if K is None else (B, N, K)))
    feats = _randn(g, B, N, D)
    mask = torch.rand(B, N, generator=g) < 0.7
    if B > 1:
        mask[1] = False  # a bag with no valid row
    return logits, feats, mask


def _pool_samples(device, dtype):
    g, cv = _gen(0), _cv(device, dtype)
    out = []
    for K in (None, 2):
        l, f, m = (cv(t) for t in _pool_values(g, 3, 7, 4, K))
        out.append(Sample((l, f, m), f"K={K}, bool mask"))
        out.append(Sample((l, f, m.to(torch.uint8)), f"K={K}, uint8 mask, frozen features", grad=("logits",)))
        out.append(
            Sample((l, _rows_stored_first(f), None), f"K={K}, no mask, features stored [N, B, D]", ("features",))
        )
    l, f, m = (cv(t) for t in _pool_values(g, 2, 0, 3, None))
    out.append(Sample((l, f, m), "N = 0"))
    return out


def _pool_backward_samples(device, dtype):
    g, cv = _gen(1), _cv(device, dtype)
    out = []
    for K in (None, 2):
        l, f, m = (cv(t) for t in _pool_values(g, 3, 7, 4, K))
        pooled, w = ops.masked_attention_pool(l, f, m)
        gp, gw = cv(_randn(g, *pooled.shape)), cv(_randn(g, *w.shape))
        out.append(Sample((gp, gw, w, f, [True, True]), f"K={K}"))
        out.append(Sample((gp, None, w, f, [True, True]), f"K={K}, no grad_weights"))
        out.append(Sample((gp, None, w, _rows_stored_first(f), [True, False]), f"K={K}, features stored [N, B, D]"))
        out.append(Sample((gp[:1].expand_as(gp), gw, w, f, [False, True]), f"K={K}, expanded grad_pooled"))
    return out


def _pool_backward_ref_bags(gp, gw, w, f, bags, om):
    """gp [B,K,D], gw/w [rows,K], f [rows,D]; bags: (start, end) rows of each bag."""
    gl, gf = torch.zeros_like(w), torch.zeros(f.shape, dtype=f.dtype)
    for b, (lo, hi) in enumerate(bags):
        wb, fb = w[lo:hi], f[lo:hi]
        s = fb @ gp[b].transpose(0, 1)  # [n, K]
        if gw is not None:
            s = s + gw[lo:hi]
        s = torch.where(wb != 0, s, torch.zeros_like(s))
        gl[lo:hi] = wb * (s - (wb * s).sum(0, keepdim=True))
        gf[lo:hi] = wb @ gp[b]
    return (gl if om[0] else _empty()), (gf if om[1] else _empty())


def _ref_pool_backward(gp, gw, w, f, om):
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(-1) if squeeze else w
    gp3 = gp.unsqueeze(1) if squeeze else gp
    gw3 = None if gw is None else (gw.unsqueeze(-1) if squeeze else gw)
    B, N, K = w3.shape
    bags = [(b * N, (b + 1) * N) for b in range(B)]
    gl, gf = _pool_backward_ref_bags(
        gp3, None if gw3 is None else gw3.reshape(B * N, K), w3.reshape(B * N, K), f.reshape(B * N, -1), bags, om
    )
    if om[0]:
        gl = gl.reshape(w.shape)
    if om[1]:
        gf = gf.reshape(f.shape)
    return gl, gf


def _packed_values(g, cuts, D, K):
    T = cuts[-1]
    logits = _randn(g, *((T,) if K is None else (T, K)))
    return logits, _randn(g, T, D), torch.tensor(cuts, dtype=torch.int64)


def _packed_samples(device, dtype):
    g, cv = _gen(2), _cv(device, dtype)
    out = []
    for K in (None, 2):
        l, f, o = (cv(t) for t in _packed_values(g, [0, 3, 3, 8], 5, K))
        out.append(Sample((l, f, o), f"K={K}, an empty bag"))
    l, f, o = (cv(t) for t in _packed_values(g, [0, 4, 9], 3, None))
    out.append(Sample((l, f[:, :1].expand(9, 3), o), "expanded features", grad=("logits",)))
    l, f, o = (cv(t) for t in _packed_values(g, [0], 3, None))
    out.append(Sample((l, f, o), "no bag at all (B = 0, T = 0)"))
    return out


def _packed_backward_samples(device, dtype):
    g, cv = _gen(3), _cv(device, dtype)
    out = []
    for K in (None, 2):
        l, f, o = (cv(t) for t in _packed_values(g, [0, 3, 3, 8], 5, K))
        pooled, w = ops.masked_attention_pool_packed(l, f, o)
        gp, gw = cv(_randn(g, *pooled.shape)), cv(_randn(g, *w.shape))
        for om in ([True, True], [True, False], [False, True]):
            out.append(Sample((gp, gw, w, f, o, om), f"K={K}, output_mask={om}"))
        out.append(Sample((gp, None, w, f, o, [True, True]), f"K={K}, no grad_weights"))
    return out


def _ref_packed_backward(gp, gw, w, f, offsets, om):
    squeeze = w.dim() == 1
    w2 = w.unsqueeze(-1) if squeeze else w
    gp3 = gp.unsqueeze(1) if squeeze else gp
    gw2 = None if gw is None else (gw.unsqueeze(-1) if squeeze else gw)
    o = offsets.tolist()
    gl, gf = _pool_backward_ref_bags(gp3, gw2, w2, f, list(zip(o[:-1], o[1:])), om)
    if om[0] and squeeze:
        gl = gl.squeeze(-1)
    return gl, gf


# ------------------------------------------------------------------ masked_channel_attention_pool (+ packed)
# PyG's feature-level gate: logits like features, one softmax per (bag, channel).


def _channel_values(g, B, N, D):
    logits, feats = _randn(g, B, N, D), _randn(g, B, N, D)
    mask = torch.rand(B, N, generator=g) < 0.7
    if B > 1 and N > 1:
        mask[1] = False  # a bag with no valid row
        logits[0, 0, 1] = -math.inf  # a valid entry of weight 0
        mask[0, 0] = True
    return logits, feats, mask


def _channel_samples(device, dtype):
    g, cv = _gen(11), _cv(device, dtype)
    l, f, m = (cv(t) for t in _channel_values(g, 3, 7, 4))
    out = [
        Sample((l, f, m), "bool mask"),
        Sample((l, f, m.to(torch.uint8)), "uint8 mask, frozen features", grad=("logits",)),
        Sample((_rows_stored_first(l), _rows_stored_first(f), None), "no mask, logits and features stored [N, B, D]"),
        Sample((l.transpose(1, 2).contiguous().transpose(1, 2), f, m), "channels-first logits"),
    ]
    l, f, m = (cv(t) for t in _channel_values(g, 2, 0, 3))
    out.append(Sample((l, f, m), "N = 0"))
    return out


def _channel_backward_ref_bags(gp, gw, pooled, w, f, bags, om):
    """gp, pooled [B, D]; gw, w, f [rows, D]; bags: (start, end) rows of each bag."""
    gl, gf = torch.zeros_like(w), torch.zeros(f.shape, dtype=f.dtype)
    for b, (lo, hi) in enumerate(bags):
        wb, live = w[lo:hi], w[lo:hi] != 0
        t = gp[b] * (torch.where(live, f[lo:hi], 0.0) - pooled[b])
        if gw is not None:
            gwb = torch.where(live, gw[lo:hi], 0.0)
            t = t + gwb - (wb * gwb).sum(0)
        gl[lo:hi] = torch.where(live, wb * t, 0.0)
        gf[lo:hi] = torch.where(live, wb * gp[b], 0.0)
    return (gl if om[0] else _empty()), (gf if om[1] else _empty())


def _channel_backward_samples(device, dtype):
    g, cv = _gen(12), _cv(device, dtype)
    l, f, m = (cv(t) for t in _channel_values(g, 3, 7, 4))
    pooled, w = ops.masked_channel_attention_pool(l, f, m)
    gp, gw = cv(_randn(g, *pooled.shape)), cv(_randn(g, *w.shape))
    return [
        Sample((gp, gw, pooled, w, f, [True, True]), "grad_weights"),
        Sample((gp, None, pooled, w, f, [True, True]), "no grad_weights"),
        Sample((gp, None, pooled, w, _rows_stored_first(f), [True, False]), "features stored [N, B, D]"),
        Sample((gp[:1].expand_as(gp), gw, pooled, w, f, [False, True]), "expanded grad_pooled"),
    ]


def _ref_channel_backward(gp, gw, pooled, w, f, om):
    B, N, D = w.shape
    bags = [(b * N, (b + 1) * N) for b in range(B)]
    gl, gf = _channel_backward_ref_bags(
        gp, None if gw is None else gw.reshape(B * N, D), pooled, w.reshape(B * N, D), f.reshape(B * N, D), bags, om
    )
    return (gl.reshape(w.shape) if om[0] else gl), (gf.reshape(f.shape) if om[1] else gf)


def _channel_packed_values(g, cuts, D):
    T = cuts[-1]
    return _randn(g, T, D), _randn(g, T, D), torch.tensor(cuts, dtype=torch.int64)


def _channel_packed_samples(device, dtype):
    g, cv = _gen(13), _cv(device, dtype)
    l, f, o = (cv(t) for t in _channel_packed_values(g, [0, 3, 3, 8], 5))
    out = [Sample((l, f, o), "an empty bag")]
    l, f, o = (cv(t) for t in _channel_packed_values(g, [0, 4, 9], 3))
    out.append(Sample((l, f[:, :1].expand(9, 3), o), "expanded features", grad=("logits",)))
    out.append(Sample((l.t().contiguous().t(), f, o), "channels-first logits"))
    l, f, o = (cv(t) for t in _channel_packed_values(g, [0], 3))
    out.append(Sample((l, f, o), "no bag at all (B = 0, T = 0)"))
    return out


def _channel_packed_backward_samples(device, dtype):
    g, cv = _gen(14), _cv(device, dtype)
    l, f, o = (cv(t) for t in _channel_packed_values(g, [0, 3, 3, 8], 5))
    pooled, w = ops.masked_channel_attention_pool_packed(l, f, o)
    gp, gw = cv(_randn(g, *pooled.shape)), cv(_randn(g, *w.shape))
    out = [
        Sample((gp, gw, pooled, w, f, o, om), f"output_mask={om}")
        for om in ([True, True], [True, False], [False, True])
    ]
    out.append(Sample((gp, None, pooled, w, f, o, [True, True]), "no grad_weights"))
    return out


def _ref_channel_packed_backward(gp, gw, pooled, w, f, offsets, om):
    o = offsets.tolist()
    return _channel_backward_ref_bags(gp, gw, pooled, w, f, list(zip(o[:-1], o[1:])), om)


# ------------------------------------------------------------------ masked_softmax


def _softmax_values(g):
    x = _randn(g, 2, 3, 4, 8) * 3
    m = torch.rand(2, 1, 1, 8, generator=g) < 0.7
    m[0] = False  # a sample with no valid key
    return x, m


def _softmax_samples(device, dtype):
    g, cv = _gen(4), _cv(device, dtype)
    x, m = (cv(t) for t in _softmax_values(g))
    causal = torch.ones(8, 8, dtype=torch.int64, device=device).tril()
    return [
        Sample((x, m, -1, 0.5), "key mask [B, 1, 1, N]"),
        Sample((x.transpose(1, 3), m.transpose(1, 3), 1, 1.0), "transposed scores, dim = 1"),
        Sample((cv(_randn(g, 2, 3, 8, 8)), causal, -1, 1.0), "int64 causal mask [N, N]"),
        Sample((cv(_randn(g, 2, 0, 8)), m[:, 0, :1], 1, 1.0), "zero-size softmax dim"),
    ]


def _ref_softmax(x, m, dim, scale):
    valid = (m != 0).expand_as(x)
    z = torch.where(valid, x * scale, torch.full_like(x, -math.inf))
    y = torch.softmax(z, dim)
    return (torch.where(valid & valid.any(dim, keepdim=True), y, torch.zeros_like(y)),)


def _softmax_backward_samples(device, dtype):
    g, cv = _gen(5), _cv(device, dtype)
    x, m = (cv(t) for t in _softmax_values(g))
    y = ops.masked_softmax(x, m, -1, 0.5)
    y1 = ops.masked_softmax(x.transpose(1, 3), m.transpose(1, 3), 1, 1.0)
    return [
        Sample((cv(_randn(g, *y.shape)), y, -1, 0.5), "dim = -1"),
        Sample((cv(_randn(g, 1, 1, 1, 8)).expand_as(y), y, 3, 1.0), "expanded grad_output"),
        Sample((cv(_randn(g, *y1.shape)), y1, 1, 1.0), "dim = 1"),
    ]


def _ref_softmax_backward(go, y, dim, scale):
    go = torch.where(y != 0, go, torch.zeros_like(go))
    return (scale * y * (go - (go * y).sum(dim, keepdim=True)),)


# ------------------------------------------------------------------ patch_mask


def _patch_mask_samples(device, dtype):
    g = _gen(6)
    m = (torch.rand(2, 16, 24, generator=g) < 0.6).to(device)
    return [
        Sample((m, 4, 0.5), "bool, p = 4"),
        Sample((m.to(dtype), 8, 0.0), "floating, threshold 0"),
        Sample((m.to(torch.uint8).unsqueeze(1), 4, 0.25), "uint8 [B, 1, H, W]"),
        Sample((m.transpose(1, 2), 8, 0.5), "transposed"),
        Sample((m[:0], 4, 0.5), "B = 0"),
    ]


def _ref_patch_mask(image_mask, p, t):
    m = image_mask.reshape(image_mask.shape[0], image_mask.shape[-2], image_mask.shape[-1]) != 0
    B, H, W = m.shape
    cnt = m.reshape(B, H // p, p, W // p, p).sum((2, 4))
    return ((cnt > t * p * p).reshape(B, (H // p) * (W // p)),)


# ------------------------------------------------------------------ gated_masked_mean


def _gated_values(g, B=2, C=3, H=4, W=5):
    f, l = _randn(g, B, C, H, W), _randn(g, B, 1, H, W)
    m = torch.rand(B, H, W, generator=g) < 0.6
    m[-1] = False  # a sample with no valid pixel
    return f, l, m


def _gated_samples(device, dtype):
    g, cv = _gen(7), _cv(device, dtype)
    f, l, m = (cv(t) for t in _gated_values(g))
    return [
        Sample((f, l, m), "[B, 1, H, W] gate logits"),
        Sample((f, l[:, 0], None), "[B, H, W] gate logits, no mask"),
        Sample((f.contiguous(memory_format=torch.channels_last), l, m.to(torch.float32)), "channels-last"),
        Sample((f[:, :0], l, m), "C = 0"),
    ]


def _gated_backward_samples(device, dtype):
    g, cv = _gen(8), _cv(device, dtype)
    f, l, m = (cv(t) for t in _gated_values(g))
    _, gate = ops.gated_masked_mean(f, l, m)
    _, gate3 = ops.gated_masked_mean(f, l[:, 0], None)
    gp = cv(_randn(g, 2, 3))
    fcl = f.contiguous(memory_format=torch.channels_last)
    return [
        Sample((gp, cv(_randn(g, *gate.shape)), f, gate, m, [True, True]), "grad_gate, mask"),
        Sample((gp, None, f, gate3, None, [False, True]), "[B, H, W] gate, no mask"),
        Sample(
            (
                gp[:1].expand(2, 3),
                torch.zeros((), dtype=dtype, device=device).expand_as(gate),
                f,
                gate,
                m,
                [True, False],
            ),
            "expanded grads",
        ),
        Sample((gp, cv(_randn(g, *gate.shape)), fcl, gate, m, [True, True]), "channels-last features"),
    ]


def _ref_gated(features, gate_logits, mask):
    return tuple(reference_gated_masked_mean(features, gate_logits, mask))


def _ref_gated_backward(gp, gg, f, gate, mask, om):
    B, C, H, W = f.shape
    s = gate.reshape(B, H, W)
    n = (mask != 0).sum((1, 2)).to(f.dtype) if mask is not None else torch.full((B,), float(H * W), dtype=f.dtype)
    inv = torch.where(n > 0, 1 / n.clamp_min(1), torch.zeros_like(n))
    gf = gp[:, :, None, None] * s[:, None] * inv[:, None, None, None]
    up = torch.einsum("bc,bchw->bhw", gp, f) * inv[:, None, None]
    if gg is not None:
        up = up + gg.reshape(B, H, W)
    gl = torch.where(s != 0, s * (1 - s) * up, torch.zeros_like(s)).reshape(gate.shape)
    return (gf if om[0] else _empty()), (gl if om[1] else _empty())


# ------------------------------------------------------------------ gated_attention_scores


def _gas_values(g, M=7, H=5, K=2):
    return _randn(g, M, H) * 2, _randn(g, M, H) * 2, _randn(g, K, H), _randn(g, K), _randn(g, H), _randn(g, H)


def _gas_samples(device, dtype):
    g, cv = _gen(11), _cv(device, dtype)
    v, u, w, b, bv, bu = (cv(t) for t in _gas_values(g))
    vu = cv(_randn(g, 2, 3, 10))  # one [.., 2H] GEMM output, read as two strided halves
    return [
        Sample((v, u, w, b, "tanh", bv, bu), "[M, H], tanh, all biases"),
        Sample((v.reshape(7, 1, 5), u.reshape(7, 1, 5), w[:1], None, "relu", None, None), "[M, 1, H], relu, no bias"),
        Sample((vu[..., :5], vu[..., 5:], w, b, "gelu", None, bu), "strided halves of one [.., 2H] tensor, gelu"),
        Sample((v[:0], u[:0], w, b, "tanh", bv, None), "no rows"),
    ]


def _gas_backward_samples(device, dtype):
    g, cv = _gen(12), _cv(device, dtype)
    v, u, w, _, bv, bu = (cv(t) for t in _gas_values(g))
    gr = cv(_randn(g, 7, 2))
    every = [True] * 6
    return [
        Sample((gr, v, u, w, "tanh", bv, bu, every), "all gradients"),
        Sample((gr[:, :1], v, u, w[:1], "relu", None, None, [True, False, True, False, False, False]), "K = 1, relu"),
        Sample(
            (gr[:1].expand(7, 2), v, u, w, "gelu", bv, None, [False, True, False, True, True, False]), "expanded grad"
        ),
        Sample((gr, v.t().contiguous().t(), u, w, "tanh", None, bu, [False] * 4 + [True] * 2), "bias sums only"),
    ]


def _ref_gas(v, u, w, b, act, bv, bu):
    return (reference_gated_attention_scores(v, u, w, b, act, bv, bu),)


def _ref_gas_backward(gr, v, u, w, act, bv, bu, om):
    # from the op's arguments alone: p = act(v + bv) * sigmoid(u + bu), scores = p @ w.T (+ bias)
    v = v if bv is None else v + bv
    u = u if bu is None else u + bu
    a, da = reference_activation(v, act)
    s = torch.sigmoid(u)
    c = gr @ w
    gv, gu = c * s * da, c * a * s * (1 - s)
    H, K = w.shape[1], w.shape[0]
    outs = (
        gv,
        gu,
        gr.reshape(-1, K).T @ (a * s).reshape(-1, H),
        gr.reshape(-1, K).sum(0),
        gv.reshape(-1, H).sum(0),
        gu.reshape(-1, H).sum(0),
    )
    return tuple(o if m else _empty() for o, m in zip(outs, om))


# ------------------------------------------------------------------ scaled_cross_attention

LOG_BELOW, LOG_ABOVE = math.log(25.0), math.log(150.0)  # scales 25 and 150 (clamped to 100)


def _xattn_values(g, Lk, B=2, Lq=3, D=6, Dv=4):
    q, k, v = _randn(g, B, Lq, D), _randn(g, B, Lk, D), _randn(g, B, Lk, Dv)
    m = torch.ones(B, Lk, dtype=torch.bool)
    m[1, 0] = False
    return q, k, v, m


def _xattn_samples(device, dtype):
    g, cv = _gen(9), _cv(device, dtype)
    out = []
    for Lk in (5, 70):  # one-pass row kernels and GEMMs around the fused softmax
        q, k, v, m = (cv(t) for t in _xattn_values(g, Lk))
        lsl = torch.tensor(LOG_BELOW, dtype=dtype, device=device)
        out.append(Sample((q, k, v, lsl, 100.0, m, True), f"Lk={Lk}, normalize, key_mask"))
        out.append(Sample((q[:, 0], k[0], v[0], lsl, 100.0, None, False), f"Lk={Lk}, [B, D] query, shared keys"))
    q, k, v, m = (cv(t) for t in _xattn_values(g, 5))
    lsl64 = torch.tensor(LOG_ABOVE, dtype=torch.float64, device=device)
    out.append(Sample((q, k, v, lsl64, 100.0, m.to(torch.int32), False), "clamped float64 scale, int32 mask"))
    return out


def _xattn_backward_samples(device, dtype):
    g = _gen(10)
    out = []
    xs = _xattn_samples(device, dtype)
    for s in (xs[0], xs[1], xs[2], xs[4]):
        q, k, v, lsl, ms, km, norm = s.args
        o, a = ops.scaled_cross_attention(*s.args)
        go, ga = _randn(g, *o.shape).to(o), _randn(g, *a.shape).to(a)
        out.append(Sample((go, ga, q, k, v, lsl, a, ms, norm, [True, True, True, True]), s.desc))
        out.append(Sample((go, None, q, k, v, lsl, a, ms, norm, [True, False, True, False]), s.desc + ", no grad_attn"))
    return out


def _ref_xattn(q, k, v, lsl, max_scale, key_mask, normalize):
    return tuple(prototype_cross_attention(q, k, v, lsl, max_scale, key_mask, normalize))


def _ref_xattn_backward(go, ga, q, k, v, lsl, attn, max_scale, normalize, om):
    """From the saved weights: dlogit = softmax backward of attn; logits = scale * <q, k> (normalised)."""
    q3 = q.unsqueeze(1) if q.dim() == 2 else q
    B, Lq, _ = q3.shape
    kb, vb = (k if k.dim() == 3 else k.unsqueeze(0)), (v if v.dim() == 3 else v.unsqueeze(0))
    A = attn.reshape(B, Lq, -1)
    go3 = go.reshape(B, Lq, -1)
    dA = go3 @ vb.transpose(1, 2)
    if ga is not None:
        dA = dA + ga.reshape(B, Lq, -1)
    dA = torch.where(A != 0, dA, torch.zeros_like(dA))
    dlogit = A * (dA - (A * dA).sum(-1, keepdim=True))
    dv = A.transpose(1, 2) @ go3
    dv = dv.sum(0) if v.dim() == 2 else dv
    qq, kk, ll = (t.detach().clone().requires_grad_(True) for t in (q3, kb, lsl))
    qn = F.normalize(qq, dim=-1) if normalize else qq
    kn = F.normalize(kk, dim=-1) if normalize else kk
    logits = torch.exp(ll).clamp(max=max_scale) * (qn @ kn.transpose(1, 2))
    dq, dk, ds = torch.autograd.grad(logits, (qq, kk, ll), dlogit)
    dk = dk.sum(0) if k.dim() == 2 else dk
    grads = (dq.reshape(q.shape), dk, dv, ds)
    return tuple(t if need else _empty() for t, need in zip(grads, om))


# ------------------------------------------------------------------ foreground_mask


def _foreground_samples(device, dtype):
    imgs, _ = synthetic_faces(2, 32, 32, channels=3, seed=0)
    imgs = imgs.to(device)
    grey = (imgs[:, :1].to(torch.float64) / 255).to(dtype)
    return [
        Sample((imgs, 0.1, 1, 2, True, 1.0), "uint8 RGB"),
        Sample((grey, 0.3, 0, 1, False, 0.0), "floating grey, binary output"),
        Sample((imgs.contiguous(memory_format=torch.channels_last), 0.1, 2, 0, True, 0.7), "channels-last"),
        Sample((imgs[:0], 0.1, 1, 2, True, 1.0), "B = 0"),
    ]


def _ref_foreground(images, threshold, open_radius, close_radius, fill_holes, sigma):
    return tuple(reference_content_mask(images, threshold, open_radius, close_radius, fill_holes, sigma))


# ------------------------------------------------------------------ the registry

_XATTN_TOL = {torch.float64: 1e-8, torch.float32: 2e-3}

OPS: List[OpEntry] = [
    OpEntry(
        "masked_attention_pool",
        _pool_samples,
        lambda l, f, m: reference_pool(l, f, m),
        {"logits": FLOAT, "features": FLOAT, "mask": MASK},
        ("logits", "features"),
    ),
    OpEntry(
        "_masked_attention_pool_backward",
        _pool_backward_samples,
        _ref_pool_backward,
        {"grad_pooled": FLOAT, "grad_weights": FLOAT, "weights": FLOAT, "features": FLOAT},
    ),
    OpEntry(
        "masked_attention_pool_packed",
        _packed_samples,
        lambda l, f, o: reference_pool_packed(l, f, o),
        {"logits": FLOAT, "features": FLOAT, "offsets": OFFSETS},
        ("logits", "features"),
    ),
    OpEntry(
        "_masked_attention_pool_packed_backward",
        _packed_backward_samples,
        _ref_packed_backward,
        {"grad_pooled": FLOAT, "grad_weights": FLOAT, "weights": FLOAT, "features": FLOAT, "offsets": OFFSETS},
    ),
    OpEntry(
        "masked_channel_attention_pool",
        _channel_samples,
        lambda l, f, m: reference_channel_pool(l, f, m),
        {"logits": FLOAT, "features": FLOAT, "mask": MASK},
        ("logits", "features"),
    ),
    OpEntry(
        "_masked_channel_attention_pool_backward",
        _channel_backward_samples,
        _ref_channel_backward,
        {"grad_pooled": FLOAT, "grad_weights": FLOAT, "pooled": FLOAT, "weights": FLOAT, "features": FLOAT},
    ),
    OpEntry(
        "masked_channel_attention_pool_packed",
        _channel_packed_samples,
        lambda l, f, o: reference_channel_pool_packed(l, f, o),
        {"logits": FLOAT, "features": FLOAT, "offsets": OFFSETS},
        ("logits", "features"),
    ),
    OpEntry(
        "_masked_channel_attention_pool_packed_backward",
        _channel_packed_backward_samples,
        _ref_channel_packed_backward,
        {
            "grad_pooled": FLOAT,
            "grad_weights": FLOAT,
            "pooled": FLOAT,
            "weights": FLOAT,
            "features": FLOAT,
            "offsets": OFFSETS,
        },
    ),
    OpEntry("masked_softmax", _softmax_samples, _ref_softmax, {"scores": FLOAT, "mask": MASK}, ("scores",)),
    OpEntry(
        "_masked_softmax_backward",
        _softmax_backward_samples,
        _ref_softmax_backward,
        {"grad_output": FLOAT, "output": FLOAT},
    ),
    OpEntry("patch_mask", _patch_mask_samples, _ref_patch_mask, {"image_mask": MASK}, dtypes=(torch.float32,)),
    OpEntry(
        "gated_masked_mean",
        _gated_samples,
        _ref_gated,
        {"features": FLOAT, "gate_logits": FLOAT, "mask": MASK},
        ("features", "gate_logits"),
    ),
    OpEntry(
        "_gated_masked_mean_backward",
        _gated_backward_samples,
        _ref_gated_backward,
        {"grad_pooled": FLOAT, "grad_gate": FLOAT, "features": FLOAT, "gate": FLOAT, "mask": MASK},
    ),
    OpEntry(
        "gated_attention_scores",
        _gas_samples,
        _ref_gas,
        {"v_pre": FLOAT, "u_pre": FLOAT, "weight": FLOAT, "bias": FLOAT, "v_bias": FLOAT, "u_bias": FLOAT},
        ("v_pre", "u_pre", "weight", "bias", "v_bias", "u_bias"),
    ),
    OpEntry(
        "_gated_attention_scores_backward",
        _gas_backward_samples,
        _ref_gas_backward,
        {"grad": FLOAT, "v_pre": FLOAT, "u_pre": FLOAT, "weight": FLOAT, "v_bias": FLOAT, "u_bias": FLOAT},
    ),
    OpEntry(
        "scaled_cross_attention",
        _xattn_samples,
        _ref_xattn,
        {"query": FLOAT, "key": FLOAT, "value": FLOAT, "logit_scale_log": SCALAR, "key_mask": MASK},
        ("query", "key", "value", "logit_scale_log"),
        tol=_XATTN_TOL,
    ),
    OpEntry(
        "_scaled_cross_attention_backward",
        _xattn_backward_samples,
        _ref_xattn_backward,
        {
            "grad_out": FLOAT,
            "grad_attn": FLOAT,
            "query": FLOAT,
            "key": FLOAT,
            "value": FLOAT,
            "logit_scale_log": SCALAR,
            "attn": FLOAT,
        },
        tol=_XATTN_TOL,
    ),
    OpEntry(
        "foreground_mask",
        _foreground_samples,
        _ref_foreground,
        {"images": IMAGE},
        dtypes=(torch.float32,),
        tol={torch.float32: 1e-6},
    ),
]

OPS_BY_NAME: Dict[str, OpEntry] = {e.name: e for e in OPS}


def registered_op_names() -> List[str]:
    """Every op the extension registers in the maskattn namespace (schema names, no overload)."""
    names = (n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskattn::"))
    return sorted(n.split(".", 1)[0] for n in names)


def to_float64(x):
    """An argument as the references take it: floating tensors in float64 on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.double() if x.is_floating_point() else x
    return x
