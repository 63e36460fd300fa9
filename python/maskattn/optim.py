"""Optimizer parameter groups for models with learnable logit scales."""

from typing import Dict, Iterable, List

from torch import nn

from . import _validation as _v

# Normalisation layers whose affine parameters are conventionally not decayed.
_NORM_TYPES = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)


def _is_logit_scale(name: str) -> bool:
    # logit_scale_log (maskattn, the few-shot SAP layer), logit_scale (CLIP / open_clip).
    return name.split(".")[-1].startswith("logit_scale")


def param_groups(
    model: nn.Module, weight_decay: float, *, no_decay_bias_and_norm: bool = False, no_decay: Iterable[str] = ()
) -> List[Dict]:
    """Parameter groups that keep weight decay off every logit scale.

    Weight decay pulls ``logit_scale_log`` towards 0, i.e. the scale towards 1, which makes the
    attention uniform again; it must never be decayed. Every parameter whose name ends in
    ``logit_scale*`` (``logit_scale_log``, CLIP's ``logit_scale``) goes in a group with
    ``weight_decay=0``; so do biases and normalisation-layer parameters when
    ``no_decay_bias_and_norm``, and any parameter whose full name is in ``no_decay``. Everything
    else gets ``weight_decay``. Frozen parameters (``requires_grad=False``) are left out, shared
    parameters appear once, and empty groups are dropped.

    Returns a list for ``torch.optim.SGD(param_groups(model, 5e-4), lr=...)``; each group also
    carries a ``"param_names"`` list, for logging.
    """
    fn = "param_groups"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    weight_decay = _v.as_float(weight_decay, fn, "weight_decay", low=0.0)
    no_decay_bias_and_norm = _v.as_bool(no_decay_bias_and_norm, fn, "no_decay_bias_and_norm")
    # A bare string is iterable too: set("bias") would be {"b", "i", "a", "s"} and match nothing.
    if isinstance(no_decay, (str, bytes)):
        raise TypeError(f"{fn}: no_decay must be a list of parameter names, got the string {no_decay!r}")
    extra = set(no_decay)
    for name in extra:
        if not isinstance(name, str):
            raise TypeError(f"{fn}: no_decay must hold parameter names (strings), got {name!r}")
    decay, keep, decay_names, keep_names = [], [], [], []
    seen = set()
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}" if mod_name else pname
            undecayed = (
                _is_logit_scale(pname)
                or full in extra
                or (no_decay_bias_and_norm and (pname == "bias" or isinstance(mod, _NORM_TYPES)))
            )
            (keep if undecayed else decay).append(p)
            (keep_names if undecayed else decay_names).append(full)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "param_names": decay_names})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0, "param_names": keep_names})
    return groups


__all__ = ["param_groups"]
