"""Multiple-instance learning on synthetic variable-size bags, CLAM-style, many bags per step.

A bag is positive when it contains "key" instances (features shifted along a hidden direction).
The model is CLAM's: a gated attention pool (``maskattn.nn.AttentionPooling``), a bag classifier,
and instance classifiers trained on each bag's top-k and bottom-k attended instances (CLAM's
instance clustering). Unlike CLAM, which trains one bag per step, every step here takes a packed
batch of bags:

- ``maskattn.data.BagBatchSampler`` groups bags under an instance budget, ``BagCollator("packed")``
  packs them (``features [T, D]`` + ``offsets [B+1]``), and a ``DataLoader`` with workers runs both;
- ``AttentionPooling(features, offsets=offsets)`` pools every bag of the batch in one call;
- ``maskattn.topk_per_bag`` picks the top-k / bottom-k instances of every bag at once.

    python examples/train_mil.py                     # under a minute on 2 CPU cores
    MASKATTN_SMOKE=1 python examples/train_mil.py    # a few seconds (CI)

Writes mil_attention.png (attention over one bag's instances) when matplotlib is installed.
"""

import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import maskattn

SMOKE = os.environ.get("MASKATTN_SMOKE") == "1"
D, HIDDEN, K_SAMPLE, BAG_WEIGHT = 32, 64, 4, 0.7


class SyntheticBags(Dataset):
    """Bags of 20-200 instances; in a positive bag about 5 % are key instances."""

    def __init__(self, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(D, generator=torch.Generator().manual_seed(0))
        direction /= direction.norm()
        self.items = []
        for _ in range(count):
            n = int(torch.randint(20, 200, (), generator=g))
            label = int(torch.rand((), generator=g) < 0.5)
            x = torch.randn(n, D, generator=g)
            key = torch.zeros(n, dtype=torch.bool)
            if label:
                idx = torch.randperm(n, generator=g)[: max(1, n // 20)]
                x[idx] += 4.0 * direction
                key[idx] = True
            self.items.append({"features": x, "label": label, "key": key})
        self.sizes = [len(it["features"]) for it in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class CLAMStyleMIL(nn.Module):
    """CLAM_SB's heads on a maskattn pool: bag classifier + one instance classifier per class."""

    def __init__(self, n_classes: int = 2):
        super().__init__()
        self.pool = maskattn.nn.AttentionPooling(D, HIDDEN, gated=True)
        self.classifier = nn.Linear(D, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(D, 2) for _ in range(n_classes))

    def forward(self, features, offsets):
        pooled, weights, scores = self.pool(features, offsets=offsets, return_scores=True)
        return self.classifier(pooled), weights, scores

    def instance_loss(self, features, offsets, scores, labels):
        """CLAM's instance clustering for all bags at once: for each bag, the classifier of its class
        learns its k highest-attended instances as positive and its k lowest as negative."""
        top = maskattn.topk_per_bag(scores.detach(), K_SAMPLE, offsets=offsets)
        bottom = maskattn.topk_per_bag(scores.detach(), K_SAMPLE, offsets=offsets, largest=False)
        idx = torch.cat([top.indices, bottom.indices], 1)  # [B, 2k] rows of the packed features
        ok = torch.cat([top.valid, bottom.valid], 1)
        targets = torch.cat([torch.ones_like(top.indices), torch.zeros_like(bottom.indices)], 1)
        inst = features[idx]  # [B, 2k, D]
        logits = torch.stack([c(inst) for c in self.instance_classifiers], 1)  # [B, classes, 2k, 2]
        logits = logits[torch.arange(len(labels)), labels]  # each bag's own class: [B, 2k, 2]
        return F.cross_entropy(logits[ok], targets[ok])


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    hits = keys = 0
    with torch.no_grad():
        for batch in loader:
            logits, _, scores = model(batch.features, batch.offsets)
            correct += int((logits.argmax(1) == batch.labels).sum())
            total += batch.num_bags
            # instance clustering quality: how many of a positive bag's top-k are key instances
            top = maskattn.topk_per_bag(scores, K_SAMPLE, offsets=batch.offsets)
            pos = (batch.labels == 1).unsqueeze(1) & top.valid
            hits += int(batch["key"][top.indices][pos].sum())
            keys += int(pos.sum())
    model.train()
    return correct / total, hits / max(keys, 1)


def main():
    torch.manual_seed(0)
    # The model is small (32-dim features): one intra-op thread does not wait on a second one at
    # every small op, and the DataLoader worker has the other core of a 2-core machine.
    torch.set_num_threads(1)
    n_train, n_test, epochs, budget = (96, 48, 2, 2048) if SMOKE else (1024, 256, 8, 4096)
    train, test = SyntheticBags(n_train, seed=1), SyntheticBags(n_test, seed=2)
    sampler = maskattn.data.BagBatchSampler(train.sizes, max_instances=budget, seed=0, bucket=False)
    collate = maskattn.data.BagCollator("packed")
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=1, persistent_workers=True)
    test_loader = DataLoader(
        test, batch_sampler=maskattn.data.BagBatchSampler(test.sizes, budget, shuffle=False), collate_fn=collate
    )
    model = CLAMStyleMIL()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-5)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            logits, _, scores = model(batch.features, batch.offsets)
            bag_loss = F.cross_entropy(logits, batch.labels)
            inst_loss = model.instance_loss(batch.features, batch.offsets, scores, batch.labels)
            loss = BAG_WEIGHT * bag_loss + (1 - BAG_WEIGHT) * inst_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc, hit = evaluate(model, test_loader)
        print(
            f"epoch {epoch}: {len(sampler)} batches, loss {loss.item():.3f}, test accuracy {acc:.3f}, "
            f"top-{K_SAMPLE} instances of positive bags that are key instances {hit:.0%}"
        )
    elapsed = time.perf_counter() - t0
    print(f"final test accuracy {acc:.3f} after {epochs} epochs in {elapsed:.1f} s")

    # The same pool on a padded batch and on one bag alone gives the same bag vectors.
    bags = [test[i]["features"] for i in range(4)]
    feats, mask = maskattn.pad_sequences(bags)
    with torch.no_grad():
        padded, _ = model.pool(feats, mask)
        single = torch.stack([model.pool(b)[0] for b in bags])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)

    # where does the attention go in a positive bag?
    j = next(i for i in range(n_test) if test[i]["label"] == 1)
    x, key = test[j]["features"], test[j]["key"]
    with torch.no_grad():
        _, w = model.pool(x)
    share = w[key].sum().item()
    print(f"bag {j}: {int(key.sum())} key instances of {len(w)} hold {share:.0%} of the attention")
    if not SMOKE:
        assert acc > 0.8, "the classifier should learn this task"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no heatmap written (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 2.2))
    ax.bar(range(len(w)), w.numpy(), color=["tab:red" if k else "tab:blue" for k in key])
    ax.set_xlabel("instance")
    ax.set_ylabel("attention weight")
    ax.set_title("AttentionPooling weights over one positive bag (red: key instances)")
    fig.tight_layout()
    fig.savefig("mil_attention.png", dpi=100)
    print("wrote mil_attention.png")


if __name__ == "__main__":
    main()
