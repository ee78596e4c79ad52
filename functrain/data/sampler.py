"""Deterministic, shardable example orders: a pure function of ``(seed, epoch, rank)``.

The order of an epoch is the one ``transformers.Trainer`` visits for the same seed: accelerate's
``SeedableRandomSampler`` draws ``torch.randperm`` from a generator seeded with ``seed + epoch``
(``seed`` = ``data_seed``, else the Trainer's ``seed``). Any process can recompute it without saved
RNG state, and a resume at batch ``k`` is a slice of it (no replay). Sharding across ranks follows
``torch.utils.data.DistributedSampler``: pad (by wrapping around) or drop the tail so every rank
gets the same number of examples, then rank ``r`` takes positions ``r, r + world_size, ...``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


def epoch_permutation(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """All example indices in this epoch's order (int64 tensor); HF's order for the same seed."""
    if not shuffle:
        return torch.arange(num_examples)
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=g)


def length_grouped_permutation(lengths: Sequence[int] | torch.Tensor, batch_size: int, seed: int, epoch: int,
                               mega_batch_mult: int = 50) -> torch.Tensor:
    """HF ``group_by_length`` order: shuffle, cut into mega-batches of ``mega_batch_mult``
    batches, sort each by length (longest first), and put the longest batch first so an
    out-of-memory shows up at step 0."""
    lengths = torch.as_tensor(lengths)
    order = epoch_permutation(len(lengths), seed, epoch)
    mega = mega_batch_mult * batch_size
    chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
    chunks = [c[torch.argsort(lengths[c], descending=True, stable=True)] for c in chunks]
    heads = torch.stack([lengths[c[0]] for c in chunks])
    longest = int(torch.argmax(heads))
    chunks[0][0], chunks[longest][0] = chunks[longest][0].clone(), chunks[0][0].clone()
    return torch.cat(chunks)


def shard_indices(indices: torch.Tensor, world_size: int = 1, rank: int = 0, drop_last: bool = False,
                  block: int = 1) -> torch.Tensor:
    """This rank's share of ``indices``, equal in size on every rank.

    ``indices`` is cut into blocks of ``block`` examples dealt round-robin: rank ``r`` takes blocks
    ``r, r + world_size, ...``. With ``block`` = the per-device batch size this is the order
    accelerate's ``BatchSamplerShard`` gives HF's Trainer; with ``block=1`` it is
    ``DistributedSampler``'s. The tail is padded by wrapping around (or dropped with ``drop_last``)
    to whole rounds of ``world_size * block``, so the union of the ranks' k-th windows is always a
    contiguous slice of ``indices`` (what makes resume across world sizes exact).
    """
    if world_size < 1 or not 0 <= rank < world_size or block < 1:
        raise ValueError(f"need world_size >= 1, 0 <= rank < world_size and block >= 1, got "
                         f"world_size={world_size}, rank={rank}, block={block}")
    if world_size == 1:
        return indices
    n, round_size = len(indices), world_size * block
    if drop_last:
        indices = indices[: n - n % round_size]
    elif n % round_size:
        extra = round_size - n % round_size
        repeats = -(-extra // n)
        indices = torch.cat([indices, indices.repeat(repeats)[:extra]])
    return indices.view(-1, block)[rank::world_size].reshape(-1)


class DeterministicSampler(torch.utils.data.Sampler):
    """A ``Sampler`` over this rank's indices for one epoch; ``set_epoch`` picks the epoch.

    Args:
        num_examples: the dataset's length.
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        shuffle: ``False`` keeps the dataset order (evaluation).
        world_size, rank: shard across data-parallel ranks.
        drop_last: drop the tail that does not divide evenly across ranks (else pad by wrapping).
        block: examples per rank per dealt block (see :func:`shard_indices`).
        lengths, batch_size: when ``lengths`` is given, use the length-grouped order.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, shuffle: bool = True, world_size: int = 1,
                 rank: int = 0, drop_last: bool = False, lengths=None, batch_size: int | None = None,
                 block: int = 1):
        if num_examples <= 0:
            raise ValueError("the dataset is empty: a sampler needs at least one example")
        if lengths is not None and (len(lengths) != num_examples or not batch_size):
            raise ValueError("group_by_length needs one length per example and the batch_size")
        self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
        self.world_size, self.rank, self.drop_last = world_size, rank, drop_last
        self.lengths, self.batch_size, self.block = lengths, batch_size, block
        self.epoch = 0
        shard_indices(torch.arange(0), world_size, rank, block=block)  # validate the arguments early

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.lengths is not None and self.shuffle:
            order = length_grouped_permutation(self.lengths, self.batch_size * self.world_size, self.seed, epoch)
        else:
            order = epoch_permutation(self.num_examples, self.seed, epoch, self.shuffle)
        return shard_indices(order, self.world_size, self.rank, self.drop_last, self.block)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_examples
        n, round_size = self.num_examples, self.world_size * self.block
        rounds = n // round_size if self.drop_last else -(-n // round_size)
        return rounds * self.block


class SliceBatchSampler(torch.utils.data.Sampler):
    """Batches of consecutive slices of an index tensor: resuming is slicing, not replaying."""

    def __init__(self, indices: torch.Tensor, batch_size: int, drop_last: bool = False):
        self.indices, self.batch_size, self.drop_last = indices, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            yield self.indices[b * self.batch_size:(b + 1) * self.batch_size].tolist()
