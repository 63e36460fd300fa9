"""Few-shot classification with prototype cross-attention and a learnable, capped logit scale
(the SAP layer's CLIP-style scale ``exp(logit_scale_log).clamp(max=100)``) on synthetic episodes.

Every episode draws 3 to 5 classes ("ways") from a pool of base classes, 3 support and 6 query
samples each. An MLP embeds the samples; each class's prototype is the mean of its support
embeddings; maskattn.nn.LearnableScaleCrossAttention attends from every query to the prototypes
with cosine logits times a learned scale (init 25, capped at 100), and its attention weights are the
class probabilities. Episodes with fewer ways are padded to 5 prototypes and the padding is removed
with key_mask, so a whole batch of episodes runs as one call. The scale is kept out of weight
decay with maskattn.optim.param_groups. The log shows the layer's .stats (scale, how often the
cap is hit, attention entropy and max weight), read with .item() only at log steps, and the
accuracy on held-out (novel) classes before and after training.

    python examples/fewshot_prototypes.py                      # ~15 s on 2 CPU cores (OMP_NUM_THREADS=1 if busy)
    python examples/fewshot_prototypes.py --clamp after_step   # open_clip's clamp after each step
    MASKATTN_SMOKE=1 python examples/fewshot_prototypes.py     # a few seconds (CI)
"""

import argparse
import math
import os
import time

import torch
from torch import nn

import maskattn

SMOKE = os.environ.get("MASKATTN_SMOKE") == "1"
RAW, EMB, MAX_WAY, SHOT, QUERY = 32, 64, 5, 3, 6
BASE_CLASSES, NOVEL_CLASSES = 40, 20


def make_world(seed=0):
    """Class centres in 8 informative dims of a 32-d space, hidden by a random rotation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(BASE_CLASSES + NOVEL_CLASSES, 8, generator=g) * 1.2
    mixing = torch.linalg.qr(torch.randn(RAW, RAW, generator=g))[0]
    return centres, mixing


def episodes(centres, mixing, classes, count, g):
    """A batch of `count` episodes from `classes`: support/query samples, padded to MAX_WAY ways.

    Returns support [E, MAX_WAY, SHOT, RAW], query [E, MAX_WAY*QUERY, RAW], labels [E, MAX_WAY*QUERY]
    and the way mask [E, MAX_WAY] (True = the class is in the episode)."""
    ways = torch.randint(3, MAX_WAY + 1, (count,), generator=g)
    way_mask = torch.arange(MAX_WAY)[None, :] < ways[:, None]
    picked = torch.stack([classes[torch.randperm(len(classes), generator=g)[:MAX_WAY]] for _ in range(count)])

    def sample(cls, n):
        # informative dims: centre + small noise; the other 24 dims: strong nuisance noise that
        # a raw-feature nearest-prototype rule cannot ignore but a learned embedding can
        inf = centres[cls].unsqueeze(-2) + 0.7 * torch.randn(*cls.shape, n, 8, generator=g)
        nuisance = 1.5 * torch.randn(*cls.shape, n, RAW - 8, generator=g)
        return torch.cat([inf, nuisance], -1) @ mixing

    support = sample(picked, SHOT)  # [E, MAX_WAY, SHOT, RAW]
    # queries only from the classes present in each episode
    labels = (torch.rand(count, MAX_WAY * QUERY, generator=g) * ways[:, None]).long()
    query = sample(picked.gather(1, labels), 1).squeeze(-2)  # [E, MAX_WAY*QUERY, RAW]
    return support, query, labels, way_mask


class ProtoNet(nn.Module):
    def __init__(self, clamp):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(RAW, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, EMB))
        self.xattn = maskattn.nn.LearnableScaleCrossAttention(
            EMB, init_scale=25.0, max_scale=100.0, normalize=True, clamp=clamp
        )

    def forward(self, support, query, way_mask):
        protos = self.embed(support).mean(2)  # [E, MAX_WAY, EMB]
        q = self.embed(query)  # [E, Lq, EMB]
        _, attn = self.xattn(q, protos, key_mask=way_mask)  # [E, Lq, MAX_WAY], 0 at absent ways
        return attn


def accuracy(attn, labels):
    return (attn.argmax(-1) == labels).float().mean()


@torch.no_grad()
def evaluate(model, centres, mixing, classes, seed=123):
    g = torch.Generator().manual_seed(seed)
    s, q, y, m = episodes(centres, mixing, classes, 50 if SMOKE else 400, g)
    return float(accuracy(model(s, q, m), y))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clamp", choices=["forward", "after_step"], default="forward")
    ap.add_argument("--steps", type=int, default=40 if SMOKE else 400)
    ap.add_argument("--episodes", type=int, default=16, help="episodes per step")
    ap.add_argument("--log-every", type=int, default=10 if SMOKE else 50)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    centres, mixing = make_world()
    base, novel = torch.arange(BASE_CLASSES), torch.arange(BASE_CLASSES, BASE_CLASSES + NOVEL_CLASSES)
    model = ProtoNet(args.clamp)
    # the logit scale goes to a weight-decay-0 group (the few-shot model's get_parameters(), done for you)
    groups = maskattn.optim.param_groups(model, weight_decay=5e-4)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    if args.clamp == "after_step":
        model.xattn.register_optimizer_hook(opt)
    print(f"param groups: {[(len(gr['params']), gr['weight_decay']) for gr in groups]} (params, weight_decay)")
    acc0 = evaluate(model, centres, mixing, novel)
    print(f"novel-class accuracy before training: {acc0:.3f} (chance ~{sum(1 / w for w in (3, 4, 5)) / 3:.3f})")

    g = torch.Generator().manual_seed(1)
    clipped = torch.zeros(())  # summed on the device; read only at log steps
    loss_sum, acc_sum = torch.zeros(()), torch.zeros(())
    for step in range(1, args.steps + 1):
        support, query, labels, way_mask = episodes(centres, mixing, base, args.episodes, g)
        attn = model(support, query, way_mask)
        loss = nn.functional.nll_loss(torch.log(attn + 1e-8).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        st = model.xattn.stats  # 0-dim tensors, no host sync
        clipped += st["logit_scale_clipped"]
        loss_sum += loss.detach()
        acc_sum += accuracy(attn.detach(), labels)
        if step % args.log_every == 0 or step == args.steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            print(
                f"step {step:4d}  loss {loss_sum.item() / n:.3f}  acc {acc_sum.item() / n:.3f}  "
                f"scale {model.xattn.logit_scale.item():6.2f}  clipped {clipped.item() / n:.2f}  "
                f"entropy {st['attn_entropy'].item():.3f} (uniform {math.log(MAX_WAY):.3f})  "
                f"max {st['attn_max'].item():.3f}  {time.perf_counter() - t0:5.1f} s"
            )
            clipped.zero_(), loss_sum.zero_(), acc_sum.zero_()

    acc1 = evaluate(model, centres, mixing, novel)
    print(
        f"novel-class accuracy after training: {acc1:.3f} (before {acc0:.3f}); "
        f"logit scale {model.xattn.logit_scale.item():.2f}; total {time.perf_counter() - t0:.1f} s"
    )
    if not SMOKE:
        assert acc1 > acc0 + 0.05, "the prototype classifier did not learn"


if __name__ == "__main__":
    main()
