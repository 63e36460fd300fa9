"""Load the attention pools of CLAM, torchmil and PyG into :class:`~maskattn.nn.AttentionPooling`.

Each converter takes the peer's module or its state dict, maps the parameter names (nothing is
reshaped or recomputed), builds an ``AttentionPooling`` of the matching configuration, in the
parameters' dtype and on their device, and loads it strictly: a missing or unexpected key raises
``ValueError`` naming it. The converted module gives the peer's outputs (float64: to rounding) on
the same bags, in every layout ``AttentionPooling`` takes.

=====================================================  ==============================================
peer                                                    maps to
=====================================================  ==============================================
CLAM ``Attn_Net_Gated``: ``attention_a.0``,             ``AttentionPooling(L, D, gated=True, branches=n_classes)``:
``attention_b.0``, ``attention_c``                      ``attention_v.0``, ``attention_u.0``, ``attention_w``
CLAM ``Attn_Net``: ``module.0``, ``module.2`` / ``.3``  ``AttentionPooling(L, D, branches=n_classes)``: ``attention_net.0/.2``
CLAM_SB / CLAM_MB: the same under ``attention_net.3.``  (their fc layer ``attention_net.0`` is not part of the pool)
torchmil ``AttentionPool``: ``fc1.module``,             ``AttentionPooling(in_dim, att_dim, gated, act=act, bias_last=False)``
``fc_gated.module``, ``fc2`` (no bias)
PyG ``AttentionalAggregation``, ``gate_nn =``           ``AttentionPooling(F, None)`` (a linear scorer) or
``Linear(F, 1)`` or ``Sequential(Linear, act, Linear)``  ``AttentionPooling(F, H, act=act)``
=====================================================  ==============================================

What a state dict does not hold is taken from the module when one is given, otherwise from the
arguments: the activation (``act``; torchmil defaults to tanh, a PyG ``Sequential`` given as a state
dict needs it) and the dropout probability (CLAM: 0.25 where its dropout flag was set; dropout is
inactive in ``eval()`` and does not change the outputs there).

Out of scope (``ValueError``): PyG's feature-level gating (``gate_nn`` with more than one output
column: one softmax per channel) and a non-None ``nn`` (a transform of the pooled rows), other MLP
shapes than Linear-act-Linear, and activations other than tanh / relu / gelu.
"""

from typing import Dict, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = ["from_clam", "from_torchmil", "from_pyg", "clam_state_dict", "torchmil_state_dict", "pyg_state_dict"]

_ACT_NAMES = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.GELU: "gelu"}


def _as_state_dict(fn: str, source) -> Dict[str, Tensor]:
    if isinstance(source, nn.Module):
        sd = source.state_dict()
    elif isinstance(source, Mapping):
        sd = dict(source)
    else:
        raise TypeError(f"{fn}: source must be an nn.Module or a state dict, got {type(source).__name__}")
    for k, v in sd.items():
        if isinstance(v, nn.parameter.UninitializedParameter) or (
            isinstance(v, Tensor) and isinstance(v, nn.parameter.UninitializedBuffer)
        ):
            raise ValueError(
                f"{fn}: {k!r} is an uninitialised lazy parameter (a LazyLinear built with in_dim=None): run "
                "one forward pass through the source module, or build it with in_dim, before converting"
            )
    return sd


def _strip(fn: str, sd: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    if not prefix:
        return sd
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{fn}: no key starts with prefix {prefix!r} (keys: {sorted(sd)[:8]})")
    return out


def _take(fn: str, sd: Dict[str, Tensor], mapping: Dict[str, str], what: str) -> Dict[str, Tensor]:
    missing = [k for k in mapping if k not in sd]
    if missing:
        raise ValueError(f"{fn}: the {what} state dict lacks {missing} (keys present: {sorted(sd)})")
    extra = sorted(set(sd) - set(mapping))
    if extra:
        raise ValueError(
            f"{fn}: unexpected keys {extra} for the {what} layout (expected {sorted(mapping)}); pass prefix= to "
            "select the attention net inside a larger state dict"
        )
    return {ours: sd[theirs] for theirs, ours in mapping.items()}


def _check_act(fn: str, act: Optional[str]) -> None:
    if act is not None and act not in ("tanh", "relu", "gelu"):
        raise ValueError(f"{fn}: act must be 'tanh', 'relu' or 'gelu', got {act!r}")


def _act_of(fn: str, module: nn.Module) -> str:
    name = _ACT_NAMES.get(type(module))
    if name is None or (isinstance(module, nn.GELU) and module.approximate != "none"):
        raise ValueError(f"{fn}: activation {module!r} is not one AttentionPooling has (nn.Tanh, nn.ReLU, nn.GELU())")
    return name


def _dropout_in(module: nn.Module) -> float:
    ps = [m.p for m in module.modules() if isinstance(m, nn.Dropout)]
    return max(ps, default=0.0)


def _last_key(hidden: bool, dropout: float) -> str:
    return "attention_net.3" if hidden and dropout > 0 else "attention_net.2"


def _build(cls, config: dict, sd: Dict[str, Tensor]):
    if cls is None:
        from .attention_pooling import AttentionPooling as cls
    ref = next(iter(sd.values()))
    mod = cls(**config).to(device=ref.device, dtype=ref.dtype)
    mod.load_state_dict(sd, strict=True)
    return mod


# ---------------------------------------------------------------- CLAM


def clam_state_dict(
    source, *, prefix: Optional[str] = None, dropout: Optional[float] = None
) -> Tuple[dict, Dict[str, Tensor]]:
    """CLAM's attention net -> ``(AttentionPooling kwargs, state dict with AttentionPooling's keys)``.

    ``source``: ``Attn_Net`` / ``Attn_Net_Gated`` (module or state dict), or a ``CLAM_SB`` /
    ``CLAM_MB`` module or state dict, whose attention net is ``attention_net.3`` (found without
    ``prefix``; its fc layer ``attention_net.0`` stays with the caller: ``h = fc(x)`` then
    ``pool(h)``). ``prefix`` selects the net inside any other state dict (``"model.attention_net.3."``).
    ``dropout``: None takes CLAM's 0.25 when the source has dropout layers (module) or the
    ``Attn_Net`` layout with dropout (``module.3``), else 0.
    """
    fn = "AttentionPooling.from_clam"
    inferred = None
    if isinstance(source, nn.Module):
        net = source
        if prefix is None and isinstance(getattr(source, "attention_net", None), nn.Sequential):
            net = source.attention_net[3]  # CLAM_SB / CLAM_MB: Sequential(fc, ReLU, Dropout, attention net)
            source, prefix = net, ""
        inferred = _dropout_in(net)
    sd = _as_state_dict(fn, source)
    if prefix is None:
        prefix = "attention_net.3." if any(k.startswith("attention_net.3.") for k in sd) else ""
    sd = _strip(fn, sd, prefix)
    if "attention_a.0.weight" in sd:
        wa, wc = sd["attention_a.0.weight"], sd["attention_c.weight"]
        p = dropout if dropout is not None else (inferred or 0.0)
        config = dict(in_dim=wa.shape[1], hidden_dim=wa.shape[0], gated=True, branches=wc.shape[0], dropout=p)
        mapping = {
            "attention_a.0.weight": "attention_v.0.weight",
            "attention_a.0.bias": "attention_v.0.bias",
            "attention_b.0.weight": "attention_u.0.weight",
            "attention_b.0.bias": "attention_u.0.bias",
            "attention_c.weight": "attention_w.weight",
            "attention_c.bias": "attention_w.bias",
        }
        return config, _take(fn, sd, mapping, "CLAM Attn_Net_Gated")
    if "module.0.weight" in sd:
        last = "module.3" if "module.3.weight" in sd else "module.2"
        w0, wl = sd["module.0.weight"], sd[f"{last}.weight"]
        if inferred is None:
            inferred = 0.25 if last == "module.3" else 0.0
        p = dropout if dropout is not None else inferred
        config = dict(in_dim=w0.shape[1], hidden_dim=w0.shape[0], gated=False, branches=wl.shape[0], dropout=p)
        ours = _last_key(True, p)
        mapping = {
            "module.0.weight": "attention_net.0.weight",
            "module.0.bias": "attention_net.0.bias",
            f"{last}.weight": f"{ours}.weight",
            f"{last}.bias": f"{ours}.bias",
        }
        return config, _take(fn, sd, mapping, "CLAM Attn_Net")
    raise ValueError(
        f"{fn}: not a CLAM attention net: expected attention_a.0.* / attention_b.0.* / attention_c.* "
        f"(Attn_Net_Gated) or module.0.* / module.2.* (Attn_Net), optionally under attention_net.3. "
        f"(CLAM_SB / CLAM_MB); got keys {sorted(sd)[:8]}"
    )


def from_clam(source, *, prefix: Optional[str] = None, dropout: Optional[float] = None, cls=None):
    """``AttentionPooling`` with CLAM's attention net loaded (see :func:`clam_state_dict`).

    Example (a trained CLAM_SB checkpoint)::

        ckpt = torch.load("s_0_checkpoint.pt")
        pool = maskattn.nn.AttentionPooling.from_clam(ckpt)          # attention_net.3.* -> pool
        fc = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU())
        fc[0].load_state_dict({"weight": ckpt["attention_net.0.weight"], "bias": ckpt["attention_net.0.bias"]})
        pooled, weights = pool(fc(features), offsets=offsets)        # CLAM's M, A for many bags at once
    """
    config, sd = clam_state_dict(source, prefix=prefix, dropout=dropout)
    return _build(cls, config, sd)


# ---------------------------------------------------------------- torchmil


def torchmil_state_dict(source, *, act: Optional[str] = None, prefix: str = "") -> Tuple[dict, Dict[str, Tensor]]:
    """torchmil's ``AttentionPool`` -> ``(AttentionPooling kwargs, state dict)``.

    ``act``: None takes the module's ``act_layer`` (a module given) or torchmil's default tanh (a
    state dict). ``fc2`` has no bias in torchmil; one that has (a variant) maps with ``bias_last``.
    torchmil's pool gives NaN for a bag without a valid instance; AttentionPooling gives zeros.
    """
    fn = "AttentionPooling.from_torchmil"
    _check_act(fn, act)
    if isinstance(source, nn.Module) and act is None and hasattr(source, "act_layer"):
        act = _act_of(fn, source.act_layer)
    sd = _strip(fn, _as_state_dict(fn, source), prefix)
    if "fc1.module.weight" not in sd or "fc2.weight" not in sd:
        raise ValueError(
            f"{fn}: not a torchmil AttentionPool: expected fc1.module.weight, fc2.weight (and fc_gated.module.* "
            f"when gated); got keys {sorted(sd)[:8]}"
        )
    gated = "fc_gated.module.weight" in sd
    bias_last = "fc2.bias" in sd
    w1, w2 = sd["fc1.module.weight"], sd["fc2.weight"]
    if w2.shape[0] != 1:
        raise ValueError(f"{fn}: fc2 must have one output (torchmil's Linear(att_dim, 1)), got {tuple(w2.shape)}")
    config = dict(in_dim=w1.shape[1], hidden_dim=w1.shape[0], gated=gated, act=act or "tanh", bias_last=bias_last)
    if gated:
        mapping = {
            "fc1.module.weight": "attention_v.0.weight",
            "fc1.module.bias": "attention_v.0.bias",
            "fc_gated.module.weight": "attention_u.0.weight",
            "fc_gated.module.bias": "attention_u.0.bias",
            "fc2.weight": "attention_w.weight",
        }
        if bias_last:
            mapping["fc2.bias"] = "attention_w.bias"
    else:
        mapping = {
            "fc1.module.weight": "attention_net.0.weight",
            "fc1.module.bias": "attention_net.0.bias",
            "fc2.weight": "attention_net.2.weight",
        }
        if bias_last:
            mapping["fc2.bias"] = "attention_net.2.bias"
    return config, _take(fn, sd, mapping, "torchmil AttentionPool")


def from_torchmil(source, *, act: Optional[str] = None, prefix: str = "", cls=None):
    """``AttentionPooling`` with torchmil's ``AttentionPool`` loaded (see :func:`torchmil_state_dict`)."""
    config, sd = torchmil_state_dict(source, act=act, prefix=prefix)
    return _build(cls, config, sd)


# ---------------------------------------------------------------- PyG


def pyg_state_dict(
    source, *, act: Optional[str] = None, dropout: Optional[float] = None, prefix: str = ""
) -> Tuple[dict, Dict[str, Tensor]]:
    """PyG's ``AttentionalAggregation`` (node-level gate, ``nn=None``) -> ``(kwargs, state dict)``.

    ``gate_nn = Linear(F, 1)`` maps to the linear scorer ``AttentionPooling(F, hidden_dim=None)``;
    ``gate_nn = Sequential(Linear(F, H), act, [Dropout], Linear(H, 1))`` to ``AttentionPooling(F, H,
    act=act)``. ``act``/``dropout``: None takes them from the module; a state dict with a hidden
    layer needs ``act``. The pooled rows equal PyG's ``aggr(x, batch)`` (or ``ptr=``) on packed
    rows: ``pool(x, batch=batch)`` or ``pool(x, offsets=ptr)``.
    """
    fn = "AttentionPooling.from_pyg"
    _check_act(fn, act)
    gate_module = None
    if isinstance(source, nn.Module):
        if getattr(source, "nn", None) is not None:
            raise ValueError(
                f"{fn}: AttentionalAggregation with nn={source.nn!r} transforms the rows before pooling; "
                "only nn=None converts (apply your nn to the features, then pool them)"
            )
        gate_module = getattr(source, "gate_nn", None)
    sd = _strip(fn, _as_state_dict(fn, source), prefix)
    if any(k.startswith("nn.") for k in sd):
        raise ValueError(f"{fn}: the state dict has nn.* keys (AttentionalAggregation's nn): only nn=None converts")
    gate = {k[len("gate_nn.") :]: v for k, v in sd.items() if k.startswith("gate_nn.")}
    other = sorted(k for k in sd if not k.startswith("gate_nn."))
    if not gate or other:
        raise ValueError(f"{fn}: expected gate_nn.* keys only (AttentionalAggregation), got keys {sorted(sd)[:8]}")
    if "weight" in gate:  # gate_nn = Linear(F, K)
        w = gate["weight"]
        _check_node_level(fn, w)
        bias = "bias" in gate
        config = dict(in_dim=w.shape[1], hidden_dim=None, bias_last=bias)
        mapping = {"gate_nn.weight": "attention_net.0.weight"}
        if bias:
            mapping["gate_nn.bias"] = "attention_net.0.bias"
        return config, _take(fn, sd, mapping, "PyG AttentionalAggregation(gate_nn=Linear)")
    linears = sorted({int(k.split(".")[0]) for k in gate if k.split(".")[0].isdigit() and k.endswith("weight")})
    if len(linears) != 2 or linears[0] != 0:
        raise ValueError(
            f"{fn}: gate_nn must be Linear(F, 1) or Sequential(Linear(F, H), act, [Dropout], Linear(H, 1)); "
            f"got gate_nn keys {sorted(gate)}"
        )
    first, last = linears
    if gate_module is not None:
        if not isinstance(gate_module, nn.Sequential):
            raise ValueError(
                f"{fn}: gate_nn must be an nn.Linear or an nn.Sequential, got {type(gate_module).__name__}"
            )
        between = list(gate_module)[first + 1 : last]
        acts = [m for m in between if not isinstance(m, nn.Dropout)]
        if len(acts) != 1:
            raise ValueError(f"{fn}: gate_nn needs one activation between its two Linear layers, got {between}")
        act = act or _act_of(fn, acts[0])
        if dropout is None:
            dropout = max((m.p for m in between if isinstance(m, nn.Dropout)), default=0.0)
    if act is None:
        raise ValueError(f"{fn}: a state dict does not say gate_nn's activation: pass act='tanh', 'relu' or 'gelu'")
    dropout = dropout or 0.0
    w0, wl = gate[f"{first}.weight"], gate[f"{last}.weight"]
    _check_node_level(fn, wl)
    bias = f"{last}.bias" in gate
    config = dict(in_dim=w0.shape[1], hidden_dim=w0.shape[0], act=act, dropout=dropout, bias_last=bias)
    ours = _last_key(True, dropout)
    mapping = {f"gate_nn.{first}.weight": "attention_net.0.weight", f"gate_nn.{last}.weight": f"{ours}.weight"}
    if f"{first}.bias" in gate:
        mapping[f"gate_nn.{first}.bias"] = "attention_net.0.bias"
    else:
        raise ValueError(f"{fn}: gate_nn's first Linear has no bias; AttentionPooling's hidden layer has one")
    if bias:
        mapping[f"gate_nn.{last}.bias"] = f"{ours}.bias"
    return config, _take(fn, sd, mapping, "PyG AttentionalAggregation(gate_nn=Sequential)")


def _check_node_level(fn: str, w: Tensor) -> None:
    if w.shape[0] != 1:
        raise ValueError(
            f"{fn}: gate_nn has {w.shape[0]} output columns: that is PyG's feature-level gating (one softmax "
            "per channel), which AttentionPooling does not compute; only a [T, 1] node-level gate converts"
        )


def from_pyg(source, *, act: Optional[str] = None, dropout: Optional[float] = None, prefix: str = "", cls=None):
    """``AttentionPooling`` with PyG's ``AttentionalAggregation`` gate loaded (see :func:`pyg_state_dict`).

    Example::

        aggr = torch_geometric.nn.aggr.AttentionalAggregation(
            torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
        pool = maskattn.nn.AttentionPooling.from_pyg(aggr)
        pooled, weights = pool(x, batch=batch)     # == aggr(x, batch)
    """
    config, sd = pyg_state_dict(source, act=act, dropout=dropout, prefix=prefix)
    return _build(cls, config, sd)
