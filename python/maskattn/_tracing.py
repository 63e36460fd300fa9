"""What kind of tracing a module's forward is running under, on every torch release from 2.11 on."""

import torch


def in_func_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, ...) run eagerly, where tensors are wrapped."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def is_exporting() -> bool:
    """True under torch.export only, not under torch.compile.

    ``torch.compiler.is_exporting()`` returns the flag that export sets, but dynamo before torch 2.13
    folds the call itself to True under every ``torch.compile``; the flag read as a value is right on
    every release.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)
