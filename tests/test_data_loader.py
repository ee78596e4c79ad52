import json
import time

import datasets
import pytest
import torch

from functrain.data.collators import DataCollatorWithPadding, default_data_collator
from functrain.data.loader import LoaderState, ResumableLoader, check_iterable_requires_max_steps
from functrain.data.sampler import DeterministicSampler, epoch_permutation, length_grouped_permutation


class Counting:
    """A collator that counts its calls (to show a resume collates nothing it skips)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, features):
        self.calls += 1
        return default_data_collator(features)


class Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": i}


def _ids(batches):
    return [b["x"].tolist() for b in batches]


def test_same_seed_same_order_epochs_differ():
    a = epoch_permutation(100, seed=3, epoch=0)
    assert torch.equal(a, epoch_permutation(100, seed=3, epoch=0))
    assert not torch.equal(a, epoch_permutation(100, seed=3, epoch=1))
    assert not torch.equal(a, epoch_permutation(100, seed=4, epoch=0))
    assert sorted(a.tolist()) == list(range(100))


@pytest.mark.parametrize("n,drop_last", [(10, False), (11, False), (11, True)])
def test_two_ranks_cover_disjointly(n, drop_last):
    shards = [DeterministicSampler(n, seed=0, world_size=2, rank=r, drop_last=drop_last).indices(epoch=2).tolist()
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    if n % 2 == 0 or drop_last:
        assert not set(shards[0]) & set(shards[1])
        assert len(set(shards[0]) | set(shards[1])) == n - (n % 2 if drop_last else 0)
    else:  # padded by wrapping around, like DistributedSampler: everything covered, one repeat
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        assert len(shards[0]) + len(shards[1]) == n + 1


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_yields_exactly_remaining_batches(num_workers, drop_last):
    data = [{"x": i} for i in range(37)]
    full = ResumableLoader(data, batch_size=4, seed=7, drop_last=drop_last, num_workers=num_workers)
    everything = _ids(full.iter_from(epoch=1))
    assert len(everything) == len(full)
    for k in (0, 3, len(everything) - 1, len(everything)):
        resumed = ResumableLoader(data, batch_size=4, seed=7, drop_last=drop_last, num_workers=num_workers)
        assert _ids(resumed.iter_from(epoch=1, batch_index=k)) == everything[k:]


def test_state_roundtrip_through_json_and_epoch_rollover():
    data = [{"x": i} for i in range(10)]
    loader = ResumableLoader(data, batch_size=3, seed=1)
    it = iter(loader)
    first_two = [next(it), next(it)]
    saved = json.loads(json.dumps(loader.state_dict()))
    assert saved == {"epoch": 0, "batch_index": 2, "seed": 1}
    rest = _ids(it)
    assert loader.state == LoaderState(epoch=1, batch_index=0, seed=1)
    fresh = ResumableLoader(data, batch_size=3, seed=1)
    fresh.load_state_dict(saved)
    assert _ids(fresh) == rest
    assert sorted(sum(_ids(first_two) + rest, [])) == list(range(10))
    with pytest.raises(ValueError, match="seed"):
        ResumableLoader(data, batch_size=3, seed=2).load_state_dict(saved)


def test_resume_deep_into_a_million_examples_is_constant_work():
    collate = Counting()
    loader = ResumableLoader(Range(1_000_000), batch_size=8, collate_fn=collate, seed=0)
    t0 = time.perf_counter()
    it = loader.iter_from(epoch=0, batch_index=100_000)
    batch = next(it)
    elapsed = time.perf_counter() - t0
    print(f"resume at batch 100,000 of 1,000,000 examples: first batch after {elapsed * 1e3:.1f} ms")
    assert collate.calls == 1
    expected = epoch_permutation(1_000_000, seed=0, epoch=0)[800_000:800_008]
    assert batch["x"].tolist() == expected.tolist()
    assert loader.state.batch_index == 100_001


def test_hf_dataset_with_transform_sees_raw_column():
    raw = datasets.Dataset.from_dict({"image": [[float(i)] * 3 for i in range(10)], "label": list(range(10))})

    def transform(batch):
        return {"pixel_values": [torch.tensor(img) * 2 for img in batch["image"]], "labels": batch["label"]}

    loader = ResumableLoader(raw.with_transform(transform), batch_size=4, shuffle=False)
    batches = list(loader)
    assert batches[0]["pixel_values"].shape == (4, 3)
    assert torch.equal(batches[2]["pixel_values"][:, 0], torch.tensor([16.0, 18.0]))
    assert batches[2]["labels"].tolist() == [8, 9]


def test_padding_collator_and_hf_dataset_text_flow():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 5 + 1) for i in range(20)], "label": [i % 2 for i in range(20)]})
    loader = ResumableLoader(ds, batch_size=8, collate_fn=DataCollatorWithPadding(pad_token_id=0, pad_to_multiple_of=8))
    shapes = {tuple(b["input_ids"].shape[1:]) for b in loader}
    assert shapes == {(8,)}


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_iterable_resume_skips_examples_and_shards(kind):
    rows = [{"x": i} for i in range(23)]
    if kind == "hf":
        ds = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=1)
    else:
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(rows)
        ds = Stream()
    collate = Counting()
    loader = ResumableLoader(ds, batch_size=4, collate_fn=collate, shuffle=False)
    full = _ids(loader.iter_from(0))
    assert sum(full, []) == list(range(23))
    collate.calls = 0
    assert _ids(loader.iter_from(0, batch_index=3)) == full[3:]
    assert collate.calls == len(full) - 3
    ranks = [sum(_ids(ResumableLoader(ds, batch_size=2, shuffle=False, world_size=2, rank=r)), []) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(range(23))
    with pytest.raises(TypeError, match="max_steps"):
        len(loader)


def test_iterable_requires_max_steps():
    stream = datasets.Dataset.from_dict({"x": [1, 2]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="max_steps"):
        check_iterable_requires_max_steps(stream, None)
    with pytest.raises(ValueError, match="max_steps"):
        check_iterable_requires_max_steps(stream, -1)
    check_iterable_requires_max_steps(stream, 10)
    check_iterable_requires_max_steps([{"x": 1}], None)


def test_empty_dataset_errors():
    with pytest.raises(ValueError, match="empty"):
        ResumableLoader([], batch_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableLoader([{"x": 1}], batch_size=2, drop_last=True)


def test_group_by_length_groups_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g)
    order = length_grouped_permutation(lengths, batch_size=8, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert torch.equal(order, length_grouped_permutation(lengths, batch_size=8, seed=0, epoch=0))
    assert lengths[order[0]] == lengths.max()
    # batches are much more uniform in length than a random order
    def spread(o):
        return (lengths[o].view(-1, 8).float().std(dim=1)).mean()
    assert spread(order) < 0.3 * spread(epoch_permutation(1000, 0, 0))
    data = [{"input_ids": [1] * int(n)} for n in lengths[:64]]
    loader = ResumableLoader(data, batch_size=8, group_by_length=True, collate_fn=DataCollatorWithPadding(pad_token_id=0))
    assert len(list(loader)) == 8
