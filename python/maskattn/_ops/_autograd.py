"""Autograd for maskattn's ops that every torch.func transform understands.

``torch.library.register_autograd`` wraps an op in an ``autograd.Function`` without
``setup_context`` or ``jvp`` (torch 2.13): ``torch.func.grad`` / ``jacrev`` through such an op
raise, and forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``)
silently yields zero tangents, because that kernel enters the ``autograd.Function`` only when an
input requires grad. Here each op gets its own Autograd-key kernel instead. When autograd in either
direction may see the call, it applies an ``autograd.Function`` with ``setup_context`` /
``backward`` / ``jvp`` *at the current level only*, the way a C++ autograd kernel works under
functorch: the forward calls the op below autograd, where functorch's DynamicLayerBackMode unwraps
the tensors and hands the call to the next transform (vmap, an outer grad/jvp) or to the kernel.
Otherwise it calls the op below autograd straight away, as ``register_autograd``'s kernel does.
Every op also gets a real batching rule (``torch.library.register_vmap``) instead of the
per-example fallback. All of this sits on the op itself, so direct ``torch.ops.maskattn.<op>``
calls behave exactly like the public functions, and torch.compile / export still see one opaque
op.

Why ``_SingleLevelFunction`` (the base functorch itself uses for this) and not
``autograd.Function``: under a transform ``Function.apply`` routes through functorch's Python
``custom_function_call``, which must run above the dispatcher; from inside this kernel the
transform's dispatch keys are masked and that route fails. The single-level apply also skips
``Function.apply``'s per-call ``inspect.signature``.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwd_ad
from torch import Tensor
from torch._C import _functorch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

_lib = torch.library.Library("maskattn", "IMPL")

_any_requires_grad = torch._C._any_requires_grad
_is_grad_enabled = torch._C.is_grad_enabled
_transforms_active = torch._C._are_functorch_transforms_active
_is_wrapped = _functorch.is_functorch_wrapped_tensor
_below_autograd = torch._C._AutoDispatchBelowAutograd
_after_autograd = torch._C._after_autograd_keyset
_grad_mode = torch.autograd.grad_mode.set_grad_enabled
_fwd_grad_mode = _fwd_ad._set_fwd_grad_enabled
_is_fwd_grad_enabled = torch._C._is_fwd_grad_enabled


def _defaults(op) -> Tuple[int, tuple]:
    """(number of schema arguments, their defaults): the dispatcher may drop trailing defaults."""
    args = op._schema.arguments
    return len(args), tuple(a.default_value for a in args)


def _filler(op) -> Callable[[tuple], tuple]:
    n, defaults = _defaults(op)

    def fill(args: tuple) -> tuple:
        return args if len(args) == n else args + defaults[len(args) :]

    return fill


def _needs_function(args: tuple) -> bool:
    """Whether autograd (reverse or forward mode) may see this call."""
    if _is_grad_enabled() and _any_requires_grad(*args):
        return True
    # forward AD (torch.autograd.forward_ad, or the dual tensors of torch.func.jvp): dual tensors
    # need not require grad
    if _fwd_ad._current_level >= 0:
        return True
    # torch.func.grad / jvp hand the kernel their TensorWrappers; a vmap level alone never reaches
    # this key with wrapped tensors
    if _transforms_active():
        return any(isinstance(a, Tensor) and _is_wrapped(a) for a in args)
    return False


def register(
    name: str,
    *,
    setup_context: Callable,
    backward: Callable,
    jvp: Callable,
    vmap: Callable,
) -> None:
    """Give maskattn::<name> reverse mode, forward mode and a batching rule.

    ``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)`` and ``jvp(ctx, *tangents)``
    follow ``torch.autograd.Function`` (inputs are the op's arguments, defaults filled in; jvp reads
    what ``setup_context`` passed to ``ctx.save_for_forward``). ``vmap(info, in_dims, *args)``
    returns ``(outputs, out_dims)`` as ``torch.library.register_vmap`` asks; it sees the arguments
    with defaults filled in, and may call the op itself on the batched-up (plain) tensors.
    """
    op = getattr(torch.ops.maskattn, name).default
    fill = _filler(op)

    def forward(*args):
        with _below_autograd():
            return op(*args)

    # Under a transform the forward's call goes on to the next transform, which must see the grad
    # modes this kernel was entered with, not the ones autograd.Function switches off for the
    # forward (else an outer grad / jvp would silently record nothing). Those modes travel as one
    # extra trailing argument.
    def forward_t(*args):
        grad_mode, fwd_grad_mode = args[-1]
        with _grad_mode(grad_mode), _fwd_grad_mode(fwd_grad_mode), _below_autograd():
            return op(*args[:-1])

    def setup_context_t(ctx, inputs, output):
        ctx.maskattn_fwd_grad_mode = inputs[-1][1]
        return setup_context(ctx, inputs[:-1], output)

    def backward_t(ctx, *grads):
        ctx.needs_input_grad = ctx.needs_input_grad[:-1]
        return tuple(backward(ctx, *grads)) + (None,)

    # autograd.Function runs jvp with forward AD off, so under nested forward-mode transforms
    # (jacfwd(jacfwd(f))) the outer transforms would see the tangent as a constant: silently zero
    # second derivatives. The formula runs with forward AD as the kernel was entered, on the saved
    # tensors' primals of this level, so that only the outer levels differentiate it.
    def jvp_t(ctx, *tangents):
        if not ctx.maskattn_fwd_grad_mode:
            return jvp(ctx, *tangents[:-1])
        with _fwd_grad_mode(True):
            return jvp(_PrimalContext(ctx), *tangents[:-1])

    def function(suffix, fwd, setup, bwd, fjvp):
        cls = type(
            f"maskattn_{name}{suffix}",
            (_SingleLevelFunction,),
            {
                "forward": staticmethod(fwd),
                "setup_context": staticmethod(setup),
                "backward": staticmethod(bwd),
                "jvp": staticmethod(fjvp),
                # what autograd.Function adds: compiled autograd keys its backward graphs on it
                "_compiled_autograd_key": staticmethod(torch.autograd.Function._compiled_autograd_key),
            },
        )
        return cls.apply

    apply = function("", forward, setup_context, backward, jvp)
    apply_t = function("_transformed", forward_t, setup_context_t, backward_t, jvp_t)

    def autograd_kernel(keyset, *args):
        args = fill(args)
        if _needs_function(args):
            if _transforms_active():
                with enable_single_level_autograd_function():
                    return apply_t(*args, (_is_grad_enabled(), _is_fwd_grad_enabled()))
            return apply(*args)
        with _below_autograd():
            return op.redispatch(keyset & _after_autograd, *args)

    _lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _register_vmap(name, vmap, fill)


class _PrimalContext:
    """``ctx`` whose saved tensors are stripped of this level's tangent (torch.func.jvp's duals)."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    @property
    def saved_tensors(self):
        level = max(_fwd_ad._current_level, 0)
        return tuple(None if t is None else torch._VF._unpack_dual(t, level)[0] for t in self._ctx.saved_tensors)


def register_backward(name: str, *, vmap: Callable) -> None:
    """A backward op (maskattn::_<op>_backward): batched by ``vmap``; differentiating it raises.

    Without this, PyTorch would treat the backward op as a constant: a double backward (gradient
    penalties, Hessian-vector products) or a forward-mode derivative of a gradient
    (``jacfwd(jacrev(f))``, ``torch.func.hessian``) would be wrong without a word.
    """
    message = (
        f"maskattn::{name}: double backward (differentiating a gradient: create_graph=True, or "
        "forward-over-reverse such as torch.func.jacfwd(torch.func.jacrev(f)) and torch.func.hessian) "
        "is not supported; compute such terms on a pure-PyTorch path, take second derivatives "
        "reverse-over-forward (torch.func.jacrev(torch.func.jacfwd(f))), or detach the first-order gradient"
    )

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(message)

    def jvp(ctx, *tangents):
        raise RuntimeError(message)

    register(name, setup_context=setup_context, backward=backward, jvp=jvp, vmap=vmap)


def register_vmap_only(name: str, vmap: Callable) -> None:
    """A batching rule for an op without derivatives (masks: piecewise constant in their inputs)."""
    op = getattr(torch.ops.maskattn, name).default
    _register_vmap(name, vmap, _filler(op))


def _register_vmap(name: str, vmap: Callable, fill: Callable[[tuple], tuple]) -> None:
    def rule(info, in_dims, *args):
        args = fill(args)
        in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
        return vmap(info, in_dims, *args)

    torch.library.register_vmap(f"maskattn::{name}", rule, lib=_lib)


# ---- helpers for batching rules ----


def batched(x: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """``x`` with the vmapped dim in front, expanded (not copied) where ``x`` is not vmapped."""
    if x is None:
        return None
    if bdim is None:
        return x.unsqueeze(0).expand((size,) + tuple(x.shape))
    return x.movedim(bdim, 0)


def fold(x: Optional[Tensor], bdim: Optional[int], size: int) -> Optional[Tensor]:
    """``[V, B, ...]`` -> ``[V * B, ...]``: the vmapped dim folded into the batch dim."""
    if x is None:
        return None
    b = batched(x, bdim, size)
    return b.reshape((b.shape[0] * b.shape[1],) + tuple(b.shape[2:]))


def unfold(x: Tensor, size: int) -> Tensor:
    """``[V * B, ...]`` -> ``[V, B, ...]``."""
    return x.reshape((size, x.shape[0] // size) + tuple(x.shape[1:]))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def concat_offsets(offsets, od, rows: int, V: int, op: str):
    """V examples' offsets ``[B+1]`` over ``rows`` rows each -> offsets of the V * B bags back to back
    (the packed ops' vmap rules run the V examples as one packed call)."""
    o = batched(offsets, od, V)  # [V, B+1]
    if o.device.type == "cpu":
        # the op checks the joined offsets; a bad first or last entry of one example would only
        # shift bags between examples
        torch._check(
            bool((o[:, 0] == 0).all()) and bool((o[:, -1] == rows).all()),
            lambda: f"{op}: every offsets must start at 0 and end at T = {rows}",
        )
    shift = torch.arange(V, device=o.device, dtype=o.dtype).unsqueeze(1) * rows
    return torch.cat([(o[:, :-1] + shift).reshape(-1), o.new_full((1,), V * rows)])
