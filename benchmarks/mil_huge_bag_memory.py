"""Peak memory of forward + backward of attention-MIL pooling over one huge bag, chunked or not.

Each configuration runs in its own subprocess, which reports its resident set size after importing
torch (the process baseline) and its high-water mark (VmHWM) after fwd+bwd. The bag is frozen
features (as in MIL: patch embeddings from a frozen encoder), scored by CLAM's gated attention
network (Attn_Net_Gated: tanh(Linear) * sigmoid(Linear) -> Linear, hidden 256), whose parameters get
gradients. The table gives (peak - process baseline) / bytes of the features: 1.0 is the features
alone.

    python benchmarks/mil_huge_bag_memory.py                       # 400,000 x 1024 float32
    python benchmarks/mil_huge_bag_memory.py --n 100000 --d 256    # quicker

Each configuration runs twice: with glibc's malloc as it comes, and with ``MALLOC_MMAP_THRESHOLD_``
fixed (1 MiB). glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
the chunked mode's per-chunk activations come from the heap, where the small tensors each chunk
keeps (its scores, its partial state) are placed into the freed blocks and split them: the next
chunk cannot reuse them and the heap grows by about one activation per chunk. A fixed threshold
(or jemalloc / tcmalloc) returns every large block to the system on free; then the peak is what
the program holds. Chunks whose activations exceed 32 MiB are always mmapped.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(args):
    import torch

    import maskattn
    from maskattn.bench.attention_pooling import ClamGatedNet  # CLAM's Attn_Net_Gated

    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    clam = ClamGatedNet(args.d, args.hidden)

    def net(x):  # the attention scores A; CLAM's forward also passes the features through
        return clam(x)[0]

    base = _status("VmRSS")
    h = torch.randn(args.n, args.d)  # frozen features: no gradient wanted
    held = _status("VmRSS")
    t0 = time.perf_counter()
    if args.mode == "features":
        pooled = None
    elif args.mode == "unchunked":
        A = net(h).T  # [1, N], as CLAM
        pooled, _ = maskattn.masked_attention_pool(A, h[None])
    elif args.mode == "torch":
        A = torch.softmax(net(h).T, dim=1)  # CLAM_SB's own pooling: softmax, then A @ h
        pooled = A @ h
    else:
        pooled, _ = maskattn.chunked_attention_pool(lambda x: net(x).squeeze(-1), h, args.chunk)
    if pooled is not None:
        pooled.square().sum().backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    if pooled is not None and args.save:
        torch.save(
            {"pooled": pooled.detach().reshape(-1), **{k: p.grad for k, p in clam.named_parameters()}}, args.save
        )
    print(json.dumps({"base": base, "held": held, "peak": peak, "features": h.nbytes, "seconds": seconds}))


def _rel(got, ref, keys):
    import torch

    err = torch.cat([(got[k] - ref[k]).reshape(-1) for k in keys]).norm()
    return float(err / torch.cat([ref[k].reshape(-1) for k in keys]).norm())


def run(args, mode, chunk, save, mmap_threshold):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--n", str(args.n), "--d", str(args.d)]
    cmd += ["--hidden", str(args.hidden), "--chunk", str(chunk), "--threads", str(args.threads), "--save", save or ""]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {chunk}: exit {out.returncode}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400_000, help="instances in the bag")
    p.add_argument("--d", type=int, default=1024, help="feature size")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the gated attention network")
    p.add_argument("--chunks", default="4096,16384,65536", help="chunk sizes of the chunked mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--no-torch", action="store_true", help="leave out CLAM's own softmax + matmul pooling")
    p.add_argument(
        "--mmap-thresholds",
        default="0,1048576",
        help="glibc M_MMAP_THRESHOLD per run, 0 = glibc's default (dynamic); see the module docstring",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    configs = [("features", 0), ("unchunked", 0)] + ([] if args.no_torch else [("torch", 0)])
    configs += [("chunked", int(c)) for c in args.chunks.split(",") if c]
    gb = 1024**3
    print(
        f"one bag {args.n} x {args.d} float32 ({args.n * args.d * 4 / gb:.2f} GiB), CLAM gated attention hidden {args.hidden}"
    )
    print(
        "| malloc | mode | chunk | peak - process baseline (GiB) | / features | fwd+bwd s | rel. diff vs unchunked: pooled / grads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    runs = [(int(t), mode, chunk) for t in args.mmap_thresholds.split(",") for mode, chunk in configs]
    with tempfile.TemporaryDirectory() as d:
        ref = None
        for threshold, mode, chunk in runs:
            save = os.path.join(d, f"{mode}{chunk}.pt") if mode != "features" else None
            r = run(args, mode, chunk, save, threshold)
            diff = ""
            if save:
                got = torch.load(save)
                if ref is None:
                    ref = got
                else:
                    # relative to the whole vector: attention_c.bias's gradient is zero up to
                    # rounding (softmax is shift-invariant), so its own relative error is noise
                    grads = [k for k in ref if k != "pooled"]
                    diff = f"{_rel(got, ref, ['pooled']):.1e} / {_rel(got, ref, grads):.1e}"
            extra = r["peak"] - r["base"]
            print(
                f"| {f'mmap >= {threshold}' if threshold else 'glibc'} | {mode} | {chunk or '-'} | {extra / gb:.2f} | "
                f"{extra / r['features']:.2f} | "
                f"{r['seconds']:.1f} | {diff} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
