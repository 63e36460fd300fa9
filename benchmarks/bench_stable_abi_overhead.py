"""Per-call cost of the ops on the stable ABI (masked_softmax, patch_mask, gated_masked_mean,
foreground_mask): tiny inputs (the fixed overhead of one op call)
and large ones (the kernel), printed as one JSON line.

Run it alternately under two installs (the stable-ABI build and a build of the same ops on the
unstable API) on one machine and compare the minima; see docs/stable_abi_port.md. "op only" rows
exclude the autograd and autocast dispatch keys, whose kernels are Python (torch.library), so they
time the C++ op alone: argument checks, allocation, dispatch and the kernel.
"""

import json
import sys
import timeit

import torch

import maskattn


def best_us(fn, number, repeat=7):
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main():
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    ops = torch.ops.maskattn
    tiny = torch.randn(2, 8)
    tiny_m = torch.ones(2, 8, dtype=torch.bool)
    tiny_mi = tiny_m.int()
    tiny_img = torch.ones(1, 8, 8, dtype=torch.bool)
    B, H, N = 4, 8, 256
    big = torch.randn(B, H, N, N)
    big_m = torch.rand(B, 1, 1, N) > 0.2
    big_img = torch.rand(16, 1, 256, 256) > 0.3
    grad = torch.randn(B, H, N, N)
    y = ops.masked_softmax(big, big_m, -1, 1.0)
    tiny_f, tiny_l = torch.randn(1, 4, 2, 2), torch.randn(1, 1, 2, 2)
    feats, logits = torch.randn(8, 256, 14, 14), torch.randn(8, 1, 14, 14)
    gmask = torch.rand(8, 14, 14) > 0.3
    pooled, gate = ops.gated_masked_mean(feats, logits, gmask)
    gpool = torch.randn_like(pooled)
    tiny_im = torch.randint(0, 255, (1, 1, 8, 8), dtype=torch.uint8)
    faces = torch.randint(0, 255, (8, 3, 128, 128), dtype=torch.uint8)
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "lib": "stable" if hasattr(maskattn._build_info, "TORCH_TARGET") else "unstable",
        "tiny masked_softmax us": best_us(lambda: ops.masked_softmax(tiny, tiny_m, -1, 1.0), 2000),
        "tiny patch_mask us": best_us(lambda: ops.patch_mask(tiny_img, 4, 0.5), 2000),
    }
    keys = torch._C.DispatchKey
    python_keys = (
        torch._C.DispatchKeySet(keys.AutocastCPU)
        | torch._C.DispatchKeySet(keys.AutogradCPU)
        | torch._C.DispatchKeySet(keys.ADInplaceOrView)
    )
    with torch._C._ExcludeDispatchKeyGuard(python_keys):
        res["op only: tiny masked_softmax us"] = best_us(lambda: ops.masked_softmax(tiny, tiny_m, -1, 1.0), 5000)
        res["op only: tiny masked_softmax, int mask us"] = best_us(
            lambda: ops.masked_softmax(tiny, tiny_mi, -1, 1.0), 5000
        )
        res["op only: tiny _masked_softmax_backward us"] = best_us(
            lambda: ops._masked_softmax_backward(tiny, tiny, -1, 1.0), 5000
        )
        res["op only: tiny patch_mask us"] = best_us(lambda: ops.patch_mask(tiny_img, 4, 0.5), 5000)
        res["op only: tiny gated_masked_mean us"] = best_us(lambda: ops.gated_masked_mean(tiny_f, tiny_l, None), 5000)
        res["op only: tiny foreground_mask us"] = best_us(
            lambda: ops.foreground_mask(tiny_im, 0.1, 1, 2, True, 1.0), 2000
        )
        res["reference: torch.empty_like us"] = best_us(lambda: torch.empty_like(tiny), 5000)
    res.update(
        {
            "big masked_softmax [4,8,256,256] us": best_us(lambda: ops.masked_softmax(big, big_m, -1, 1.0), 20),
            "big masked_softmax dim=-2 us": best_us(
                lambda: ops.masked_softmax(big, big_m.transpose(-1, -2), -2, 1.0), 10
            ),
            "big _masked_softmax_backward us": best_us(lambda: ops._masked_softmax_backward(grad, y, -1, 1.0), 20),
            "big patch_mask [16,256,256] p=16 us": best_us(lambda: ops.patch_mask(big_img, 16, 0.5), 20),
            "big gated_masked_mean [8,256,14,14] us": best_us(lambda: ops.gated_masked_mean(feats, logits, gmask), 20),
            "big _gated_masked_mean_backward us": best_us(
                lambda: ops._gated_masked_mean_backward(gpool, None, feats, gate, gmask, [True, True]), 20
            ),
            "big foreground_mask [8,3,128,128] uint8 us": best_us(
                lambda: ops.foreground_mask(faces, 0.1, 1, 2, True, 1.0), 5
            ),
        }
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
