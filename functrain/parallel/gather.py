"""Distributed evaluation: each rank evaluates its share; results come back in dataset order.

The eval set is dealt to the ranks as HF's Trainer deals it (accelerate's ``BatchSamplerShard``):
per-device batches round-robin, rank ``r`` taking batches ``r, r + N, ...``
(:func:`functrain.data.sampler.shard_indices` with ``block = per_device_eval_batch_size``). The
tail is padded to whole rounds by wrapping around; :meth:`EvalShard.batches` cuts those padding
duplicates off before the forward, so nothing is counted twice (accelerate's
``gather_for_metrics`` drops them after gathering instead). A batch made only of duplicates is
not evaluated, but when the params are sharded its forward still runs (``ghost``) and is
discarded, so every rank issues the same collectives.

After the loop, :meth:`EvalShard.gather_batches` all-gathers every rank's per-batch arrays and
orders them by their position in the dataset: the result is the list of batches one process
evaluating the whole set would have made (same rows per batch), so padding and concatenation
give exactly its arrays. :meth:`EvalShard.merge` merges mergeable metrics (``Average``,
``Collection``, ...) across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from functrain.data.sampler import shard_indices
from functrain.parallel import distributed as fd


class EvalShard:
    """This rank's share of an eval set of ``num_examples`` in batches of ``batch_size``."""

    def __init__(self, num_examples: int, batch_size: int, world_size: int | None = None, rank: int | None = None):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.world_size = fd.world_size() if world_size is None else world_size
        self.rank = fd.rank() if rank is None else rank
        local = len(shard_indices(torch.arange(num_examples), self.world_size, self.rank, block=batch_size))
        self.num_batches = -(-local // batch_size)
        self.forwarded = 0  # rows this rank ran forward on (duplicates excluded)

    def block_of(self, k: int) -> int:
        """The global batch index (position in dataset order) of this rank's k-th batch."""
        return k * self.world_size + self.rank

    def real_rows(self, k: int) -> int:
        """Rows of this rank's k-th batch that are not tail padding (0 to ``batch_size``)."""
        start = self.block_of(k) * self.batch_size
        return max(0, min(self.batch_size, self.num_examples - start))

    def batches(self, loader: Iterable, ghost: Callable | None = None):
        """The loader's batches with the padding duplicates cut off; batches of duplicates only are
        not yielded (``ghost(batch)`` runs instead, when given: a forward whose result is dropped)."""
        for k, batch in enumerate(loader):
            keep = self.real_rows(k)
            if keep == 0:
                if ghost is not None:
                    ghost(batch)
                continue
            self.forwarded += keep
            yield take_rows(batch, keep)

    def gather_batches(self, per_batch: list, group=None) -> list:
        """Every rank's per-batch values (this rank's in loader order, duplicates cut), in dataset
        order; on every rank. One process: ``per_batch`` itself."""
        if self.world_size == 1:
            return list(per_batch)
        keyed = [(self.block_of(k), v) for k, v in enumerate(per_batch)]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, keyed, group=group)
        return [v for _, v in sorted((kv for rank in everyone for kv in rank), key=lambda kv: kv[0])]

    def merge(self, metric, group=None):
        """A mergeable metric (``.merge``) merged over every rank's, in rank order."""
        if self.world_size == 1:
            return metric
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, metric, group=group)
        merged = everyone[0]
        for other in everyone[1:]:
            merged = merged.merge(other)
        return merged

    def total(self, value: int, group=None) -> int:
        """``value`` summed over ranks (e.g. the number of samples evaluated)."""
        return int(fd.all_reduce_sum(torch.tensor([value], dtype=torch.int64), group)[0])


def take_rows(batch, rows: int):
    """The first ``rows`` rows of every batched value of ``batch`` (tensors, lists, nested dicts)."""
    if isinstance(batch, Mapping):
        return {k: take_rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch[:rows] if batch.ndim > 0 else batch
    if isinstance(batch, (list, tuple)):
        return batch[:rows]
    return batch
