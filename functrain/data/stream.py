"""Streaming datasets that resume in O(1): the position is the stream's own state, not a count.

A loader over a ``datasets.IterableDataset`` or a ``torch.utils.data.IterableDataset`` runs on
torchdata's ``StatefulDataLoader``. After each batch it records the loader's ``state_dict()``
(plain JSON: which shard, which example in it, for each worker, and which worker is next), and a
resume hands that back to ``load_state_dict``: the stream restarts at the next example without
reading the ones before it (``datasets`` skips whole shards, and Arrow record batches without
decoding them; a torch dataset restarts wherever its own ``load_state_dict`` puts it).

The layers, each one stateful in torchdata's sense (``state_dict`` / ``load_state_dict``):

* :class:`RankShard`: a torch iterable's share for one data-parallel rank, blocks of ``block``
  examples dealt round-robin (accelerate's ``IterableDatasetShard`` order; ``block`` = the
  per-device batch size). A ``datasets.IterableDataset`` is split by
  ``datasets.distributed.split_dataset_by_node`` instead (whole shards per rank when they divide).
* :class:`CountedStream`: numbers the examples so each batch knows its position (the collator's
  seed, :mod:`functrain.data.seeded`) and keeps the inner dataset's state with the count.

A torch dataset without ``state_dict`` / ``load_state_dict`` still resumes exactly, by reading
and dropping the examples before the position (O(position), logged once): give your dataset
those two methods (the state of its current iteration; the next ``__iter__`` starts there) to
resume in O(1). A ``datasets`` stream shuffled with a buffer (``.shuffle(buffer_size=...)``) loses
its buffer in ``state_dict`` (datasets refills it), so it resumes by reading too, to stay exact.

In a checkpoint the position is JSON (``trainer_state.json``'s ``data_position``): this rank's
``stream`` while training, every rank's ``streams`` (by rank) once gathered for saving.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Callable

import torch.utils.data as tud

logger = logging.getLogger(__name__)

STREAM = "stream"
STREAMS = "streams"


def is_stateful(obj) -> bool:
    """torchdata's ``Stateful`` protocol: ``state_dict()`` and ``load_state_dict(state)``."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def is_hf_iterable(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def has_shuffle_buffer(dataset) -> bool:
    """True for a ``datasets`` stream shuffled with a buffer (its state does not hold the buffer)."""
    from datasets.iterable_dataset import BufferShuffledExamplesIterable

    node = getattr(dataset, "_ex_iterable", None)
    while node is not None:
        if isinstance(node, BufferShuffledExamplesIterable):
            return True
        node = getattr(node, "ex_iterable", None)
    return False


def resumes_in_place(dataset) -> bool:
    """Whether this dataset's own state resumes it exactly (else the loader reads up to the position)."""
    if is_hf_iterable(dataset):
        return not has_shuffle_buffer(dataset)
    return is_stateful(dataset)


_warned_reads: set[str] = set()


def _started(inner, state: dict | None, read: int):
    """``inner`` continued after its first ``read`` examples: from its saved ``state`` when it has
    one (O(1)), else by reading and dropping them (O(read), exact)."""
    if state is not None and is_stateful(inner):
        inner.load_state_dict(state)
        return iter(inner)
    if read and type(inner).__name__ not in _warned_reads:
        _warned_reads.add(type(inner).__name__)
        why = ("no stream state was saved at this position (an older checkpoint, or another batch layout)"
               if resumes_in_place(inner) else
               "it has no state_dict/load_state_dict (give it those to resume in O(1)), or it is a datasets "
               "stream with a shuffle buffer, whose state omits the buffer")
        logger.warning("resuming %s by reading and dropping the %d examples before the position: %s",
                       type(inner).__name__, read, why)
    return itertools.islice(iter(inner), read, None)


def _state_of(inner) -> dict | None:
    return inner.state_dict() if is_stateful(inner) and resumes_in_place(inner) else None


class RankShard(tud.IterableDataset):
    """This rank's examples of ``inner``: blocks ``rank, rank + world_size, ...`` of ``block``
    examples (every rank reads the whole stream, as accelerate's ``IterableDatasetShard``)."""

    def __init__(self, inner, world_size: int, rank: int, block: int):
        self.inner, self.world_size, self.rank, self.block = inner, world_size, rank, block
        self._read, self._start = 0, None

    def state_dict(self) -> dict:
        if self._start is not None:  # loaded, not yet iterated: the position is the loaded one
            return self._start
        return {"read": self._read, "inner": _state_of(self.inner)}

    def load_state_dict(self, state: dict) -> None:
        self._start = state

    def __iter__(self):
        start, self._start = self._start, None
        read = start["read"] if start else 0
        period = self.world_size * self.block
        self._read = read
        for example in _started(self.inner, start and start["inner"], read):
            mine = (read % period) // self.block == self.rank
            read += 1
            self._read = read  # counted before yielding: a state taken now resumes after this example
            if mine:
                yield example


class CountedStream(tud.IterableDataset):
    """``inner``'s examples as ``((epoch, batch key), example)``, resumable from a JSON state.

    The batch key is this worker's batch number x workers + worker id: the batch's index in the
    loader's in-order round robin over workers, so the collator's seed is a function of position.
    State: ``{"examples": yielded by this worker, "inner": inner.state_dict() or None}``.
    """

    def __init__(self, inner, epoch: int, batch_size: int):
        self.inner, self.epoch, self.batch_size = inner, epoch, batch_size
        self._yielded, self._start = 0, None

    def state_dict(self) -> dict:
        if self._start is not None:  # loaded, not yet iterated (a worker that has not yielded yet)
            return self._pending_start()
        return {"examples": self._yielded, "inner": _state_of(self.inner)}

    def load_state_dict(self, state: dict) -> None:
        self._start = state

    def skip_batches(self, batches: int) -> None:
        """Start after the loader's first ``batches`` batches, by reading (no saved state)."""
        self._start = {"batches": batches}

    def _pending_start(self) -> dict:
        start = self._start or {}
        if "batches" in start:  # this worker's share of the first batches (in-order round robin)
            workers, worker = _worker()
            return {"examples": len(range(worker, start["batches"], workers)) * self.batch_size, "inner": None}
        return start

    def __iter__(self):
        workers, worker = _worker()
        start, self._start = self._pending_start(), None
        n = start.get("examples", 0)
        self._yielded = n
        for example in _started(self.inner, start.get("inner"), n):
            self._yielded = n + 1  # counted before yielding: a state taken now resumes after this example
            yield (self.epoch, (n // self.batch_size) * workers + worker), example
            n += 1


def _worker() -> tuple[int, int]:
    """``(workers, this worker's id)``; ``(1, 0)`` in the main process."""
    info = tud.get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


def rank_view(dataset, epoch: int, *, world_size: int, rank: int, block: int, shuffle: bool):
    """This rank's stream of ``dataset`` for ``epoch``; the user's dataset object is left as it is
    (a resume loads state into a view, never into it)."""
    if is_hf_iterable(dataset):
        from datasets.distributed import split_dataset_by_node

        view = split_dataset_by_node(dataset, rank=rank, world_size=world_size)  # a new view, also for 1 rank
        if shuffle:
            view.set_epoch(epoch)  # reshuffles the shards / buffer of a shuffled stream per epoch
        return view
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return dataset if world_size == 1 else RankShard(dataset, world_size, rank, block)


def layout(batch_size: int, num_workers: int, world_size: int, block: int) -> dict:
    """What a saved stream state depends on: a resume with another layout reads to the position."""
    return {"batch_size": batch_size, "num_workers": num_workers, "world_size": world_size, "block": block}


def json_copy(state: Any) -> Any:
    """A JSON round trip: a detached copy, and proof that the state can go into a checkpoint."""
    return json.loads(json.dumps(state))


def gathered(position: dict | None, all_gather: Callable[[Any], list]) -> dict | None:
    """The position to save: this rank's ``stream`` replaced by every rank's (``streams``, by rank).

    Every rank must call it at the same point (``all_gather`` is a collective); positions without
    a stream (map-style loaders) pass through.
    """
    if not isinstance(position, dict) or STREAM not in position:
        return position
    rest = {k: v for k, v in position.items() if k != STREAM}
    return {**rest, STREAMS: all_gather(position[STREAM])}


def rank_stream(position: dict, rank: int, world_size: int) -> dict | None:
    """This rank's saved stream state from a position (``None``: resume by reading up to it)."""
    if STREAM in position:
        return position[STREAM]
    streams = position.get(STREAMS)
    if streams is None:
        return None
    if len(streams) != world_size:
        logger.warning("the checkpoint's data position holds the streams of %d ranks, this run has %d: each rank "
                       "reads its stream up to the position instead (exact, but O(position))", len(streams),
                       world_size)
        return None
    return streams[rank]
