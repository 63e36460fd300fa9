"""Multiple-instance learning on synthetic variable-size bags with maskattn.nn.AttentionPooling.

A bag is positive when it contains at least one "key" instance (features shifted along a hidden
direction). Bags of different sizes are batched two ways: padded with a mask, and packed with
offsets (no padding at all). The classifier learns; the attention should land on the key instances.

    python examples/train_mil.py            # ~10 s on 2 CPU cores
    MASKATTN_SMOKE=1 python examples/train_mil.py   # a few seconds (CI)

Writes mil_attention.png (attention over one bag's instances) when matplotlib is installed.
"""

import os
import time

import torch
from torch import nn

import maskattn

SMOKE = os.environ.get("MASKATTN_SMOKE") == "1"
D, HIDDEN = 32, 64
torch.manual_seed(0)
direction = torch.randn(D)
direction /= direction.norm()


def make_bag(positive: bool):
    n = int(torch.randint(20, 120, ()).item())
    x = torch.randn(n, D)
    key = torch.zeros(n, dtype=torch.bool)
    if positive:
        idx = torch.randperm(n)[: max(1, n // 20)]
        x[idx] += 4.0 * direction
        key[idx] = True
    return x, key


def make_set(count):
    labels = torch.rand(count) < 0.5
    bags = [make_bag(bool(y)) for y in labels]
    return [b[0] for b in bags], [b[1] for b in bags], labels.float()


class MILClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = maskattn.nn.AttentionPooling(D, HIDDEN, gated=True)
        self.head = nn.Linear(D, 1)

    def forward(self, feats, mask):
        pooled, weights = self.pool(feats, mask)
        return self.head(pooled).squeeze(-1), weights

    def forward_packed(self, packed, offsets):
        scores = self.pool.scores(packed)
        pooled, weights = maskattn.masked_attention_pool_packed(scores, packed, offsets)
        return self.head(pooled).squeeze(-1), weights


def accuracy(model, bags, labels, packed=False):
    with torch.no_grad():
        if packed:
            offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
            logits, _ = model.forward_packed(torch.cat(bags), offsets)
        else:
            feats, mask = maskattn.pad_sequences(bags)
            logits, _ = model(feats, mask)
    return ((logits > 0).float() == labels).float().mean().item()


def main():
    n_train, n_test, epochs, batch = (64, 32, 2, 16) if SMOKE else (768, 256, 20, 32)
    train_bags, _, train_y = make_set(n_train)
    test_bags, test_keys, test_y = make_set(n_test)
    model = MILClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lossf = nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n_train)
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch].tolist()
            bags = [train_bags[j] for j in idx]
            if epoch % 2 == 0:  # padded batches
                feats, mask = maskattn.pad_sequences(bags)
                logits, _ = model(feats, mask)
            else:  # packed batches: the same model, no padding at all
                offsets = torch.tensor([0] + [len(b) for b in bags]).cumsum(0)
                logits, _ = model.forward_packed(torch.cat(bags), offsets)
            loss = lossf(logits, train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(
            f"epoch {epoch}: loss {loss.item():.3f}  test acc padded {accuracy(model, test_bags, test_y):.3f}"
            f"  packed {accuracy(model, test_bags, test_y, packed=True):.3f}"
        )
    elapsed = time.perf_counter() - t0
    acc = accuracy(model, test_bags, test_y)
    print(f"final test accuracy {acc:.3f} in {elapsed:.1f} s")

    # where does the attention go in a positive bag?
    j = int(torch.nonzero(test_y).flatten()[0])
    feats, mask = maskattn.pad_sequences([test_bags[j]])
    with torch.no_grad():
        _, w = model(feats, mask)
    w = w[0]
    share = w[test_keys[j]].sum().item()
    print(f"bag {j}: {int(test_keys[j].sum())} key instances of {len(w)} hold {share:.0%} of the attention")
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
    ax.bar(range(len(w)), w.numpy(), color=["tab:red" if k else "tab:blue" for k in test_keys[j]])
    ax.set_xlabel("instance")
    ax.set_ylabel("attention weight")
    ax.set_title("AttentionPooling weights over one positive bag (red: key instances)")
    fig.tight_layout()
    fig.savefig("mil_attention.png", dpi=100)
    print("wrote mil_attention.png")


if __name__ == "__main__":
    main()
