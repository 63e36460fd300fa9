"""CLAM's per-bag training loop against one packed AttentionPooling call, A/B only, on one thread.

The attention_pooling suite times five implementations per case; this script times the two that
the "never slower than the loop" goal compares, alternating them round by round and reading the
process CPU time, so that a busy host's waiting for a core is left out. A third contender is the
same packed module with its gated scoring written as CLAM writes it
(``attention_w(attention_v(x) * attention_u(x))``: two Linear layers with their biases, tanh,
sigmoid, product, last layer, each a separate op) instead of the fused
``maskattn.gated_attention_scores``: what that op buys at the model level, in the same run. Same head as the suite
(CLAM's gated attention net, L = 1024, hidden 256, a linear classifier), same bags (64 per median,
log-normal sizes), frozen features; the two parameter gradients are asserted equal first.

    OMP_NUM_THREADS=1 python benchmarks/mil_loop_vs_packed.py --medians 100,800,2000 --rounds 5
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import maskattn
from maskattn.bench.attention_pooling import ClamGatedNet, _check_same, bag_sizes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--medians", default="100,800,2000")
    p.add_argument("--bags", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    L, H = 1024, 256
    torch.manual_seed(0)
    net, head = ClamGatedNet(L, H), torch.nn.Linear(L, 2)
    pool, pool_head = maskattn.nn.AttentionPooling.from_clam(net), torch.nn.Linear(L, 2)
    pool_head.load_state_dict(head.state_dict())
    ref_params = list(net.parameters()) + list(head.parameters())
    our_params = list(pool.parameters()) + list(pool_head.parameters())
    print(f"torch {torch.__version__}, 1 thread, process CPU time, {args.bags} bags, L={L}, hidden {H}")
    unfused = maskattn.nn.AttentionPooling.from_clam(net)

    def unfused_scores(x, m=unfused):
        return m.attention_w(m.attention_v(x) * m.attention_u(x))

    unfused._score_rows = unfused_scores
    unfused_params = list(unfused.parameters()) + list(pool_head.parameters())
    print(
        "| median (T) | loop, ms | packed, ms | packed, unfused scoring, ms | loop / packed (median of rounds) "
        "| per round | unfused / fused scoring |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for median in (int(m) for m in args.medians.split(",")):
        sizes = bag_sizes(args.bags, median)
        T = sum(sizes)
        g = torch.Generator().manual_seed(median)
        x = torch.randn(T, L, generator=g)
        labels = torch.randint(0, 2, (args.bags,), generator=g)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        bags = [x[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

        def loop(bags=bags, labels=labels):
            for q in ref_params:
                q.grad = None
            for i, h in enumerate(bags):  # CLAM: one bag per step, gradients accumulated
                A, hh = net(h)
                A = torch.softmax(A.transpose(0, 1), dim=1)
                F.cross_entropy(head(A @ hh), labels[i : i + 1], reduction="sum").backward()

        def packed(x=x, offsets=offsets, labels=labels):
            for q in our_params:
                q.grad = None
            pooled, _ = pool(x, offsets=offsets)
            F.cross_entropy(pool_head(pooled), labels, reduction="sum").backward()

        def packed_unfused(x=x, offsets=offsets, labels=labels):
            for q in unfused_params:
                q.grad = None
            pooled, _ = unfused(x, offsets=offsets)
            F.cross_entropy(pool_head(pooled), labels, reduction="sum").backward()

        loop()
        packed()
        _check_same("packed", [q.grad for q in ref_params], [q.grad for q in our_params])
        packed_unfused()
        _check_same("packed, unfused scoring", [q.grad for q in ref_params], [q.grad for q in unfused_params])
        fns = [("loop", loop), ("packed", packed), ("unfused", packed_unfused)]
        times = {name: [] for name, _ in fns}
        for r in range(args.rounds):
            for name, fn in fns[r % 3 :] + fns[: r % 3]:  # rotating order
                t = time.process_time()
                fn()
                times[name].append(time.process_time() - t)
        per_round = [a / b for a, b in zip(times["loop"], times["packed"])]
        fused_gain = statistics.median(a / b for a, b in zip(times["unfused"], times["packed"]))
        lm, pm, um = (statistics.median(times[n]) for n in ("loop", "packed", "unfused"))
        print(
            f"| {median} ({T:,}) | {lm * 1e3:,.0f} | {pm * 1e3:,.0f} | {um * 1e3:,.0f} | "
            f"{statistics.median(per_round):.3f}x | "
            + ", ".join(f"{v:.3f}" for v in per_round)
            + f" | {fused_gain:.3f}x |"
        )


if __name__ == "__main__":
    main()
