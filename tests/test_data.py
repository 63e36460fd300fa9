"""maskattn.data: collate_bags / BagCollator (packed and padded batches of variable-size bags with
labels and extra fields) and BagBatchSampler (instance budget, size buckets, per-epoch shuffling,
distributed shards), alone and inside DataLoader with worker processes and pin_memory."""

import json
import math
import os
import random
import tempfile
import warnings

import pytest
import torch
from _dist import join, leave, spawn_or_fail
from conftest import DEVICES, requires_cuda  # noqa: E402
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory

import maskattn
from maskattn.data import BagBatch, BagBatchSampler, BagCollator, collate_bags

D = 6


class Bags(Dataset):
    """Bag i: features [sizes[i], D] filled so that every row names its bag and position, a label,
    per-instance coordinates [N_i, 2] and a per-bag string."""

    def __init__(self, sizes, kind="tuple"):
        self.sizes, self.kind = list(sizes), kind

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        n = self.sizes[i]
        feats = torch.arange(n * D, dtype=torch.float32).view(n, D) + 1000.0 * i
        coords = torch.stack([torch.full((n,), i), torch.arange(n)], 1)
        if self.kind == "dict":
            return {"features": feats, "label": i % 3, "coords": coords, "slide": f"s{i}", "inst": torch.arange(n) % 2}
        return feats, i % 3, coords, f"s{i}"


def lognormal_sizes(n, seed=0, mu=5.0, sigma=1.0):
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(mu, sigma))) for _ in range(n)]


# ---------------------------------------------------------------- collate


def test_packed_batch_holds_every_bag_back_to_back():
    ds = Bags([3, 0, 5, 2])
    b = collate_bags([ds[i] for i in range(4)])
    assert isinstance(b, BagBatch) and b.layout == "packed" and b.num_bags == 4
    assert torch.equal(b.features, torch.cat([ds[i][0] for i in range(4)]))
    assert b.offsets.dtype == torch.int64 and b.offsets.tolist() == [0, 3, 3, 8, 10]
    assert b.lengths.tolist() == [3, 0, 5, 2] and b.max_len == 5 and b.mask is None
    assert b.labels.tolist() == [0, 1, 2, 0] and b.labels.dtype == torch.int64
    assert torch.equal(b[2], torch.cat([ds[i][2] for i in range(4)]))  # per-instance: packed too
    assert b[3] == ["s0", "s1", "s2", "s3"]  # per-bag strings stay a list
    assert torch.equal(b.bag_index(), torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 3, 3]))


def test_padded_batch_masks_padding_and_fills_it():
    ds = Bags([3, 0, 5, 2], kind="dict")
    b = collate_bags([ds[i] for i in range(4)], "padded", padding_value={"features": -7.0, "inst": -100})
    assert b.layout == "padded" and b.offsets is None
    assert b.features.shape == (4, 5, D) and b.mask.shape == (4, 5) and b.mask.dtype == torch.bool
    assert b.mask.sum(1).tolist() == [3, 0, 5, 2]
    for i in range(4):
        n = ds.sizes[i]
        assert torch.equal(b.features[i, :n], ds[i]["features"])
        assert (b.features[i, n:] == -7.0).all() and (b["inst"][i, n:] == -100).all()
        assert (b["coords"][i, n:] == 0).all()  # fields not named in padding_value get 0
    assert b["coords"].shape == (4, 5, 2) and b["slide"] == ["s0", "s1", "s2", "s3"]
    assert b.labels.tolist() == [0, 1, 2, 0]
    # the packed batch of the same bags, padded on the fly, is the same batch
    p = collate_bags([ds[i] for i in range(4)], "packed")
    f, m = p.padded()
    assert torch.equal(m, b.mask) and torch.equal(f, b.features.masked_fill(~b.mask[..., None], 0))


def test_collated_batches_pool_like_one_bag_at_a_time():
    torch.manual_seed(0)
    bags = [(torch.randn(n, D, dtype=torch.float64), float(n)) for n in (4, 1, 0, 7)]
    w = torch.randn(D, dtype=torch.float64)
    ref = torch.stack([torch.softmax(f @ w, 0) @ f if len(f) else torch.zeros(D, dtype=torch.float64) for f, _ in bags])
    p = collate_bags(bags, "packed")
    pooled_p, _ = maskattn.masked_attention_pool_packed(p.features @ w, p.features, p.offsets)
    q = collate_bags(bags, "padded")
    pooled_q, _ = maskattn.masked_attention_pool(q.features @ w, q.features, q.mask)
    torch.testing.assert_close(pooled_p, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(pooled_q, ref, atol=1e-12, rtol=1e-12)
    assert p.labels.dtype == torch.float64 and p.labels.tolist() == [4.0, 1.0, 0.0, 7.0]


def test_sample_kinds_labels_and_instance_fields():
    import numpy as np

    # features only (no label), numpy arrays
    b = collate_bags([np.ones((2, 3), dtype=np.float32), np.zeros((1, 3), dtype=np.float32)])
    assert b.labels is None and b.features.shape == (3, 3) and b.features.dtype == torch.float32
    # multi-label [C] labels stack to [B, C]; a per-bag [C] tensor is not per-instance when N_i != C
    s = [(torch.randn(n, 2), torch.tensor([1.0, 0.0, 1.0]), torch.randn(3)) for n in (2, 5)]
    b = collate_bags(s)
    assert b.labels.shape == (2, 3) and b[2].shape == (2, 3)
    # explicit instance_fields: a per-bag field of length N_i stays per-bag when not named
    s = [(torch.randn(3, 2), 0, torch.arange(3), torch.arange(3)) for _ in range(2)]
    auto = collate_bags(s)
    assert auto[2].shape == (6,) and auto[3].shape == (6,)  # auto: both look per-instance
    named = collate_bags(s, instance_fields=[2])
    assert named[2].shape == (6,) and named[3].shape == (2, 3)
    # per-bag tensors of different shapes stay a list
    s = [(torch.randn(2, 2), 0, torch.randn(k)) for k in (1, 4)]
    assert isinstance(collate_bags(s, instance_fields=())[2], list)
    # an all-empty batch
    b = collate_bags([torch.zeros(0, 4), torch.zeros(0, 4)], "padded")
    assert b.features.shape == (2, 0, 4) and b.mask.shape == (2, 0) and b.max_len == 0


def test_collate_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples is empty"):
        collate_bags([])
    with pytest.raises(ValueError, match="layout must be 'packed' or 'padded'"):
        collate_bags([torch.zeros(1, 2)], "ragged")
    with pytest.raises(ValueError, match=r"features of samples\[1\] has shape \(2, 3\), expected \[N_i, \*\(2,\)\]"):
        collate_bags([torch.zeros(1, 2), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"features of samples\[1\] is torch.float64"):
        collate_bags([torch.zeros(1, 2), torch.zeros(2, 2, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"samples\[1\] is structured as"):
        collate_bags([(torch.zeros(1, 2), 0), torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="has no 'features' key"):
        collate_bags([{"x": torch.zeros(1, 2)}])
    with pytest.raises(ValueError, match=r"per-instance field 2 of samples\[0\] must have N_i=1 rows"):
        collate_bags([(torch.zeros(1, 2), 0, torch.zeros(3))], instance_fields=[2])
    with pytest.raises(ValueError, match="instance_fields names 5"):
        collate_bags([(torch.zeros(1, 2), 0)], instance_fields=[5])
    with pytest.raises(ValueError, match=r"features of samples\[0\] must be \[N_i, \.\.\.\]"):
        collate_bags([torch.tensor(1.0)])
    with pytest.raises(TypeError, match="must be a tensor or numpy array"):
        collate_bags([[[1.0, 2.0]]])


def test_batch_to_and_pin_memory(monkeypatch):
    b = collate_bags([Bags([2, 3], "dict")[i] for i in range(2)], "padded")
    moved = b.to("cpu")
    assert isinstance(moved, BagBatch) and torch.equal(moved.features, b.features) and moved.mask.dtype == torch.bool
    # DataLoader's pin_memory step calls BagBatch.pin_memory, which pins every tensor (recursively).
    # Without an accelerator pinning is unavailable: record the calls instead.
    pinned = []
    if not torch.cuda.is_available():

        def fake_pin(self, device=None):
            pinned.append(self)
            return self.clone()

        monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = dataloader_pin_memory(b)
    assert isinstance(out, BagBatch)
    tensors = [out.features, out.labels, out.lengths, out.mask, out["coords"], out["inst"]]
    if torch.cuda.is_available():
        assert all(t.is_pinned() for t in tensors)
    else:
        assert len(pinned) == len(tensors)
    assert out["slide"] == b["slide"] and out.max_len == b.max_len


@requires_cuda
def test_batch_to_cuda_non_blocking():
    b = collate_bags([Bags([2, 3])[i] for i in range(2)]).pin_memory()
    c = b.to("cuda", non_blocking=True)
    assert c.features.is_cuda and c.offsets.is_cuda and c.labels.is_cuda and c[2].is_cuda
    f, m = c.padded()  # no host sync: max_len travels as an int
    assert f.shape == (2, 3, D) and torch.equal(m.cpu(), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))


# ---------------------------------------------------------------- sampler


def cost(batch, sizes, budget):
    s = [sizes[i] for i in batch]
    return sum(s) if budget == "instances" else len(s) * max(s)


@pytest.mark.parametrize("budget", ["instances", "padded"])
@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_budget_respected_and_every_bag_once_per_epoch(budget, bucket, shuffle):
    sizes = lognormal_sizes(300, seed=1) + [0, 0, 5000]  # empty bags and one bag over the budget
    sampler = BagBatchSampler(sizes, 2000, shuffle=shuffle, seed=4, bucket=bucket, budget=budget, max_bags=16)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(sizes)))  # exactly once
        for b in batches:
            assert 1 <= len(b) <= 16
            assert cost(b, sizes, budget) <= 2000 or len(b) == 1  # only a lone oversize bag exceeds it
        assert [302] in batches  # the 5000-instance bag forms its own batch


def test_shuffle_is_per_epoch_and_deterministic():
    sizes = lognormal_sizes(200, seed=2)
    a = BagBatchSampler(sizes, 3000, seed=7)
    b = BagBatchSampler(sizes, 3000, seed=7)
    c = BagBatchSampler(sizes, 3000, seed=8)
    e0 = list(a)
    assert e0 == list(b)  # same seed, same epoch
    assert e0 != list(c)  # another seed
    a.set_epoch(1)
    assert list(a) != e0  # another epoch
    a.set_epoch(0)
    assert list(a) == e0  # back again
    fixed = BagBatchSampler(sizes, 3000, shuffle=False)
    first = list(fixed)
    fixed.set_epoch(5)
    assert list(fixed) == first


def test_drop_last_drops_at_most_one_partly_filled_batch():
    sizes = lognormal_sizes(400, seed=3)
    for epoch in range(3):
        keep = BagBatchSampler(sizes, 2500, seed=1, drop_last=False)
        drop = BagBatchSampler(sizes, 2500, seed=1, drop_last=True)
        keep.set_epoch(epoch)
        drop.set_epoch(epoch)
        kept, dropped = list(keep), list(drop)
        missing = set(range(400)) - {i for b in dropped for i in b}
        assert missing  # with these sizes the last batch is partly filled
        assert len(kept) - len(dropped) == 1
        # the dropped bags are exactly one batch of the drop_last=False epoch, and it is partly
        # filled: its bags fit in well under the budget
        (lost,) = [b for b in kept if set(b) & missing]
        assert set(lost) == missing and sum(sizes[i] for i in lost) < 2500
        assert sorted(map(sorted, dropped)) == sorted(sorted(b) for b in kept if b is not lost)


def test_bucketing_lowers_padding_on_skewed_sizes():
    sizes = lognormal_sizes(2000, seed=5, sigma=1.2)  # a long tail, like whole-slide bags
    fractions = {}
    for bucket in (True, False):
        s = BagBatchSampler(sizes, 20000, seed=0, bucket=bucket, budget="padded")
        fractions[bucket] = sum(s.padding_fraction(e) for e in range(3)) / 3
        # padding_fraction agrees with a direct count over the batches
        batches = list(s)
        direct = 1 - sum(sizes[i] for b in batches for i in b) / sum(len(b) * max(sizes[i] for i in b) for b in batches)
        assert math.isclose(s.padding_fraction(0), direct)
    assert fractions[True] < 0.5 * fractions[False], fractions


@pytest.mark.parametrize("ratio", [1.25, 1.5, 2.0])
def test_batches_inside_a_bucket_keep_the_size_ratio(ratio):
    sizes = lognormal_sizes(3000, seed=9, sigma=1.5) + [0] * 5
    s = BagBatchSampler(sizes, 5000, seed=3, bucket_ratio=ratio, budget="padded")
    n_buckets = len({-1 if x == 0 else math.floor(math.log(x) / math.log(ratio)) for x in sizes})
    for epoch in range(2):
        s.set_epoch(epoch)
        batches = list(s)
        wide = [b for b in batches if max(sizes[i] for i in b) >= ratio * min(sizes[i] for i in b) and len(b) > 1]
        # only the batches of the buckets' leftovers (at most one per bucket) may mix sizes
        assert len(wide) <= n_buckets < len(batches) / 3
        assert s.padding_fraction() < 1 - 1 / ratio


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_shares_of_equal_length(drop_last, world):
    sizes = lognormal_sizes(211, seed=6)
    for epoch in range(3):
        single = BagBatchSampler(sizes, 1500, seed=2, drop_last=drop_last)
        single.set_epoch(epoch)
        all_batches = list(single)
        per_rank = []
        for r in range(world):
            s = BagBatchSampler(sizes, 1500, seed=2, drop_last=drop_last, num_replicas=world, rank=r)
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert len(per_rank[-1]) == len(s)
        counts = {len(p) for p in per_rank}
        assert len(counts) == 1  # every rank the same number of batches
        n = counts.pop()
        if drop_last:
            assert n == len(all_batches) // world
        else:
            assert n == math.ceil(len(all_batches) / world)
        seen = [i for p in per_rank for b in p for i in b]
        # the batches of the ranks, interleaved, are the single-process list (padded or cut)
        interleaved = [per_rank[r][j] for j in range(n) for r in range(world)]
        unique = interleaved[: len(all_batches)] if not drop_last else interleaved
        assert unique == all_batches[: len(unique)]
        ids = [i for b in unique for i in b]
        assert len(ids) == len(set(ids))  # disjoint apart from the padding batches
        if not drop_last:
            assert set(seen) == set(range(len(sizes)))  # and nothing lost
            extra = interleaved[len(all_batches) :]
            assert extra == all_batches[: len(extra)]  # padding repeats batches from the start


def test_distributed_defaults_come_from_the_process_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 3)
    s = BagBatchSampler([5] * 10, 10)
    assert (s.num_replicas, s.rank) == (4, 3)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    s = BagBatchSampler([5] * 10, 10)
    assert (s.num_replicas, s.rank) == (1, 0)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_instances must be an int >= 1"):
        BagBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match=r"sizes\[1\] = -2 is negative"):
        BagBatchSampler([1, -2], 4)
    with pytest.raises(ValueError, match=r"sizes\[0\] = 1.5 is not an integer"):
        BagBatchSampler([1.5], 4)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, num_replicas=2\)"):
        BagBatchSampler([1, 2], 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="budget must be 'instances' or 'padded'"):
        BagBatchSampler([1, 2], 4, budget="tokens")
    with pytest.raises(ValueError, match="sizes must be a 1-D integer sequence"):
        BagBatchSampler(torch.ones(2, 2, dtype=torch.int64), 4)


# ---------------------------------------------------------------- DataLoader


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_dataloader_with_two_workers_and_pin_memory(layout):
    sizes = lognormal_sizes(60, seed=7, mu=3.0)
    ds = Bags(sizes, kind="dict")
    sampler = BagBatchSampler(sizes, 300, seed=1, budget="padded" if layout == "padded" else "instances")
    collate = BagCollator(layout, padding_value={"inst": -100})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator warns and does nothing
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, pin_memory=True)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            expected = list(sampler)
            got = list(loader)
            assert len(got) == len(loader) == len(expected)
            for b, idx in zip(got, expected):
                assert isinstance(b, BagBatch) and b.layout == layout
                ref = collate([ds[i] for i in idx])
                assert torch.equal(b.features, ref.features) and torch.equal(b.labels, ref.labels)
                assert torch.equal(b["inst"], ref["inst"]) and b["slide"] == [f"s{i}" for i in idx]
                if layout == "packed":
                    assert torch.equal(b.offsets, ref.offsets)
                    assert b.features.shape[0] <= 300 or len(idx) == 1
                else:
                    assert torch.equal(b.mask, ref.mask)
                    assert b.features.shape[0] * b.features.shape[1] <= 300 or len(idx) == 1


class SharedFlagCollator(BagCollator):
    """Also reports whether the collated features were allocated in shared memory."""

    def __call__(self, samples):
        b = super().__call__(samples)
        return b, b.features.is_shared()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_worker_batches_are_written_to_shared_memory(layout):
    # A worker's batch travels to the main process through shared memory: collating straight into
    # it saves a copy of every batch (default_collate does the same for its stacks).
    ds = Bags([4, 2, 3])
    collate = SharedFlagCollator(layout)
    ((b, shared),) = list(DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=1))
    assert shared
    assert torch.equal(b.features, collate_bags([ds[i] for i in range(3)], layout).features)
    _, shared_in_process = collate([ds[i] for i in range(3)])
    assert not shared_in_process


def _dist_worker(rank, world, port, out_dir):
    join(rank, world, port)
    sizes = lognormal_sizes(97, seed=8)
    sampler = BagBatchSampler(sizes, 1200, seed=5)  # num_replicas and rank from the process group
    record = {"replicas": sampler.num_replicas, "rank": sampler.rank, "epochs": []}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        record["epochs"].append(list(sampler))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    leave()


def test_two_gloo_processes_shard_the_epoch():
    with tempfile.TemporaryDirectory() as d:
        spawn_or_fail(_dist_worker, d)
        recs = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
    assert [(r["replicas"], r["rank"]) for r in recs] == [(2, 0), (2, 1)]
    sizes = lognormal_sizes(97, seed=8)
    for epoch in range(2):
        a, b = recs[0]["epochs"][epoch], recs[1]["epochs"][epoch]
        assert len(a) == len(b)
        single = BagBatchSampler(sizes, 1200, seed=5)
        single.set_epoch(epoch)
        ref = list(single)
        interleaved = [x for pair in zip(a, b) for x in pair]
        assert interleaved[: len(ref)] == ref
        assert {i for x in a + b for i in x} == set(range(97))
    assert recs[0]["epochs"][0] != recs[0]["epochs"][1]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_over_a_collated_packed_batch(device):
    # the CLAM instance-selection step of batched training: scores per packed row -> rows per bag
    ds = Bags([5, 0, 2, 7])
    b = collate_bags([ds[i] for i in range(4)]).to(device)
    scores = b.features[:, 0]  # increases within each bag
    top = maskattn.topk_per_bag(scores, 3, offsets=b.offsets)
    assert top.valid.sum(1).tolist() == [3, 0, 2, 3]
    picked = b.features[top.indices][top.valid]  # [valid slots, D]
    assert torch.equal(picked[:, 0], scores[top.indices][top.valid])
    assert top.indices[0].tolist() == [4, 3, 2] and top.indices[3].tolist() == [13, 12, 11]
