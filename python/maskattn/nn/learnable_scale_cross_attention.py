import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import _tracing
from .. import _validation as _v
from .._ops.scaled_cross_attention import scaled_cross_attention

_CLAMP_MODES = ("forward", "after_step")
_NAME = "LearnableScaleCrossAttention"


class LearnableScaleCrossAttention(nn.Module):
    """Cross-attention to (class) prototypes with a learnable, capped logit scale, fused.

    A drop-in for the hand-written few-shot purification layer::

        scale = torch.exp(self.logit_scale_log).clamp(max=self.logit_scale_max)
        logits = F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).t() * scale
        attn = softmax(logits - logits.max(-1, keepdim=True)[0], -1); out = attn @ protos
        stats = {"attn_entropy": ....item(), ...}          # one host sync per statistic

    Here the whole thing is one op (``maskattn.scaled_cross_attention``) and ``.stats`` holds
    ``attn_entropy`` (mean over query rows of ``-sum_j a_j log a_j``), ``attn_max`` (mean row
    maximum), ``logit_scale`` (the scale in use) and ``logit_scale_clipped`` (1.0 when the scale
    is at the cap, else 0.0; averaged over steps it is how often the cap is hit) as detached 0-dim
    float32 tensors on the input's device. Nothing syncs with the host: call ``.item()`` only in
    the steps you log. Uniform attention has entropy ``log(Lk)`` and max ``1/Lk``.

    Args:
        dim: feature size D of queries and prototypes.
        init_scale: initial ``exp(logit_scale_log)`` (25, close to the ``sqrt(640)`` temperature
            it replaces).
        max_scale: the cap (100, as in CLIP).
        normalize: cosine logits (L2-normalise queries and prototypes first).
        clamp: where the cap is applied.

            * ``"forward"`` (the few-shot SAP layer's recipe): ``min(exp(p), max_scale)`` inside the forward
              pass. Exactly the original layer, but above the cap the parameter's gradient is zero
              (that is what ``torch.clamp`` gives), so a scale that an optimizer step (momentum,
              a large learning rate) pushes past the cap stays stuck there, as weight decay is
              off for it. Pick it to reproduce the original training or load its checkpoints.
            * ``"after_step"`` (open_clip's recipe): the forward pass uses ``exp(p)`` unclamped,
              so the gradient always flows, and the parameter itself is clamped in place to
              ``[0, log(max_scale)]`` after every optimizer step, by calling
              :meth:`clamp_logit_scale_` or once :meth:`register_optimizer_hook` has been called.
              Pick it for new training: the scale can come back down from the cap.

        track_stats: compute ``.stats`` in every forward (a few tiny reductions over ``attn``).

    ``forward(query [B,Lq,D] or [B,D], prototypes [Lk,D] or [B,Lk,D], values=None, key_mask=None)``
    returns ``(out, attn)``; ``values`` defaults to the prototypes; ``key_mask`` ([Lk] or [B,Lk],
    nonzero = valid) removes prototypes (e.g. absent classes) from the softmax.
    """

    def __init__(
        self,
        dim: int,
        init_scale: float = 25.0,
        max_scale: float = 100.0,
        normalize: bool = True,
        clamp: str = "forward",
        track_stats: bool = True,
    ):
        super().__init__()
        dim = _v.as_int(dim, _NAME, "dim", min_value=1)
        init_scale = _v.as_float(init_scale, _NAME, "init_scale", low=0.0, low_open=True)
        # max_scale = inf: no cap (the scale may still be clamped after each step, by hand).
        max_scale = _v.as_float(max_scale, _NAME, "max_scale", low=0.0, low_open=True, allow_inf=True)
        normalize = _v.as_bool(normalize, _NAME, "normalize")
        track_stats = _v.as_bool(track_stats, _NAME, "track_stats")
        if not isinstance(clamp, str) or clamp not in _CLAMP_MODES:
            raise ValueError(f"LearnableScaleCrossAttention: clamp must be one of {_CLAMP_MODES}, got {clamp!r}")
        self.dim, self.max_scale, self.normalize, self.clamp, self.track_stats = (
            dim,
            float(max_scale),
            normalize,
            clamp,
            track_stats,
        )
        # Same float32 rounding as the original torch.log(torch.tensor(init)), so checkpoints match.
        self.logit_scale_log = nn.Parameter(torch.log(torch.tensor(float(init_scale))))
        self.stats: Dict[str, Tensor] = {}

    @property
    def logit_scale(self) -> Tensor:
        """The scale the forward pass uses (detached)."""
        s = self.logit_scale_log.detach().exp()
        return s.clamp(max=self.max_scale) if self.clamp == "forward" else s

    def forward(
        self, query: Tensor, prototypes: Tensor, values: Optional[Tensor] = None, key_mask: Optional[Tensor] = None
    ):
        _v.check_floating(query, _NAME, "query")
        _v.check_floating(prototypes, _NAME, "prototypes")
        if query.dim() not in (2, 3) or query.shape[-1] != self.dim:
            raise ValueError(
                f"{_NAME}: query must be [B, Lq, {self.dim}] or [B, {self.dim}], got shape {tuple(query.shape)}"
            )
        if prototypes.dim() not in (2, 3) or prototypes.shape[-1] != self.dim:
            raise ValueError(
                f"{_NAME}: prototypes must be [Lk, {self.dim}] or [B, Lk, {self.dim}], got shape "
                f"{tuple(prototypes.shape)}"
            )
        if values is None:
            values = prototypes
        else:
            _v.check_floating(values, _NAME, "values")
        if key_mask is not None:
            _v.check_mask(key_mask, _NAME, "key_mask")
        cap = self.max_scale if self.clamp == "forward" else math.inf
        out, attn = scaled_cross_attention(
            query, prototypes, values, self.logit_scale_log, cap, key_mask, self.normalize
        )
        # Not under torch.export: an exported program cannot write module attributes (export warns
        # and drops them), so the stats would be stale there anyway. Not inside torch.func
        # transforms either: the stats would hold the transform's wrapped tensors past its end.
        if self.track_stats and not _tracing.is_exporting() and not _tracing.in_func_transform():
            self.stats = self._stats(attn)
        return out, attn

    @torch.no_grad()
    def _stats(self, attn: Tensor) -> Dict[str, Tensor]:
        a = attn.detach().float()
        s = self.logit_scale_log.detach().float().exp()
        return {
            # xlogy: 0 * log 0 = 0, so masked keys (weight exactly 0) contribute nothing.
            "attn_entropy": -torch.special.xlogy(a, a).sum(-1).mean(),
            "attn_max": a.amax(-1).mean() if a.shape[-1] > 0 else a.new_zeros(()),
            "logit_scale": s.clamp(max=self.max_scale) if self.clamp == "forward" else s,
            # A relative slack of 1e-6 so that a parameter clamped in place to log(max_scale)
            # (after_step mode) counts as at the cap despite float rounding of exp(log(x)).
            "logit_scale_clipped": (s >= self.max_scale * (1 - 1e-6)).float(),
        }

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter in place to ``[0, log(max_scale)]`` (open_clip's post-step clamp)."""
        self.logit_scale_log.clamp_(0.0, math.log(self.max_scale))

    def register_optimizer_hook(self, optimizer: torch.optim.Optimizer):
        """Clamp the parameter after every ``optimizer.step()``; returns the hook's removable handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.clamp_logit_scale_())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_scale={self.max_scale}, normalize={self.normalize}, clamp={self.clamp!r}"
