"""Autocast registration shared by maskattn's ops (autograd, forward mode and vmap: _autograd.py).

torch.library.register_autocast casts to one fixed dtype; an op under autocast should instead run
in whatever low-precision dtype the active autocast region asks for (bfloat16 or float16, CPU or
CUDA), as native attention does. The kernels accumulate in float32 whatever the input dtype, so
casting the floating inputs down is all an op needs.
"""

import torch

_lib = torch.library.Library("maskattn", "IMPL")

_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def register_low_precision(name: str, keep: tuple = ()) -> None:
    """Under autocast, run maskattn::<name> on inputs cast to the autocast dtype.

    ``keep``: names of arguments left as they are (e.g. a learnable scalar that must stay float32).
    """
    op = getattr(torch.ops.maskattn, name).default
    arg_names = [a.name for a in op._schema.arguments]
    for device_type, key in _KEYS.items():
        keyset = torch._C.DispatchKeySet(key)

        def impl(*args, _device_type=device_type, _keyset=keyset, **kwargs):
            dtype = torch.get_autocast_dtype(_device_type)

            def cast(name, x):
                if (
                    isinstance(x, torch.Tensor)
                    and x.is_floating_point()
                    and x.device.type == _device_type
                    and name not in keep
                ):
                    return x.to(dtype)
                return x

            args = [cast(arg_names[i] if i < len(arg_names) else "", a) for i, a in enumerate(args)]
            kwargs = {k: cast(k, v) for k, v in kwargs.items()}
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return op(*args, **kwargs)

        _lib.impl(name, impl, key)
