"""Argument checks shared by the Python layer (modules, transforms, masks, losses, optim, padding).

Two kinds of check live here:

* **The mask rule.** A mask is a *valid* mask: nonzero = takes part, for every dtype (bool, any
  integer, any floating type; NaN is nonzero, so valid; -0.0 is zero). :func:`valid_mask` turns
  any such mask into a bool one; complex masks are rejected as the C++ checks of the ops reject
  them, with the same wording.
* **Scalar arguments** (sizes, probabilities, thresholds, flags): checked on the Python values only,
  so nothing here syncs with a device or breaks a ``torch.compile`` graph.

Every message is ``"<function>: <argument> must be ..., got <value>"``, the wording of the ops.
"""

import math
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor


class MaskDtypeError(TypeError, RuntimeError):
    """A mask of a dtype that has no notion of zero/nonzero validity (complex).

    A ``TypeError`` (it is the wrong kind of tensor) that is also a ``RuntimeError``, the class the
    ops' C++ checks raise for the same mistake, so ``except RuntimeError`` keeps working whichever
    layer catches it first.
    """


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(x, fn: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
    return x


def reject_complex(mask, fn: str, name: str = "mask") -> None:
    """Raise when ``mask`` is a complex tensor (anything else is left to the caller's checks)."""
    if isinstance(mask, Tensor) and mask.is_complex():
        raise MaskDtypeError(f"{fn}: {name} must be a bool, integer or floating tensor, got {_dtype_name(mask.dtype)}")


def check_mask(mask, fn: str, name: str = "mask") -> Tensor:
    """``mask`` is a tensor of a dtype the mask rule covers (bool, integer or floating)."""
    check_tensor(mask, fn, name)
    reject_complex(mask, fn, name)
    return mask


def valid_mask(mask, fn: str, name: str = "mask") -> Tensor:
    """The bool form of a valid mask: ``mask != 0`` (the mask itself when it is bool already)."""
    check_mask(mask, fn, name)
    return mask if mask.dtype == torch.bool else mask != 0


def check_floating(x, fn: str, name: str) -> Tensor:
    check_tensor(x, fn, name)
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must be a float32, float64, float16 or bfloat16 tensor, got {_dtype_name(x.dtype)}"
        )
    return x


def check_same_device(a: Tensor, an: str, b: Optional[Tensor], bn: str, fn: str) -> None:
    if b is not None and a.device != b.device:
        raise ValueError(f"{fn}: {an} ({a.device}) and {bn} ({b.device}) must be on the same device")


def as_int(value, fn: str, name: str, min_value: Optional[int] = None) -> int:
    """A Python integer (numpy integers and SymInts too; never a bool, a float or a string)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r} ({type(value).__name__})")
    # operator.index only for other integral types (numpy's): on a size that torch.compile traces
    # symbolically it would specialise the graph to that one value.
    if not isinstance(value, (int, torch.SymInt)):
        value = operator.index(value)
    if min_value is not None and value < min_value:
        bound = "positive" if min_value == 1 else f">= {min_value}"
        raise ValueError(f"{fn}: {name} must be {bound}, got {value}")
    return value


def as_float(
    value,
    fn: str,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """A real number (not a bool, a string or a tensor), not NaN, finite unless ``allow_inf``,
    inside the interval given by ``low``/``high`` (``*_open``: the bound itself is excluded)."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not isinstance(value, float):
        value = float(value)
    # Comparisons, not math.isnan / math.isfinite: Dynamo folds them on constants without a break.
    in_range = value == value and (allow_inf or abs(value) != math.inf)
    if in_range and low is not None:
        in_range = value > low if low_open else value >= low
    if in_range and high is not None:
        in_range = value < high if high_open else value <= high
    if not in_range:
        if low is not None and high is not None:
            interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            interval = f"{'>' if low_open else '>='} {low}" + ("" if allow_inf else " and finite")
        elif high is not None:
            interval = f"{'<' if high_open else '<='} {high}" + ("" if allow_inf else " and finite")
        else:
            interval = "finite" if not allow_inf else "a number (not NaN)"
        raise ValueError(f"{fn}: {name} must be {interval}, got {value}")
    return value


def as_probability(value, fn: str, name: str) -> float:
    """A dropout probability: in [0, 1) (1 would drop everything and scale by 1 / 0)."""
    return as_float(value, fn, name, low=0.0, high=1.0, high_open=True)


def as_bool(value, fn: str, name: str) -> bool:
    """A flag: a bool (numpy's too) or the integers 0 and 1; a string such as ``"no"`` is rejected
    rather than read as True."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{fn}: {name} must be a bool, got {value!r} ({type(value).__name__})")
