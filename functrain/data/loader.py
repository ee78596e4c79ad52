"""A data loader whose position is a small JSON-able state, so a resume starts at the next batch.

``ResumableLoader`` wraps ``torch.utils.data.DataLoader`` (workers, pinning, any collator) with a
batch sampler over this epoch's remaining indices. Its state is ``{epoch, batch_index, seed}``
(``batch_index`` = batches already consumed this epoch). Resuming with
``loader.iter_from(epoch, batch_index)`` slices the epoch's index permutation: no earlier batch
is read, collated or replayed (the HF Trainer spent hours skipping batches, issues 11284, 21934).

Iterable (streaming) datasets have no length and no random access: they run on torchdata's
``StatefulDataLoader`` and the state also holds the stream's own position (``stream``, see
:mod:`functrain.data.stream`), so a resume continues the stream where it stopped without reading
the examples before it, workers included. Without a saved stream (an older checkpoint, another
batch layout) a resume reads this rank's stream up to the position without collating it
(exact, linear in the position). They need ``max_steps``, see
:func:`check_iterable_requires_max_steps`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.data as tud
from torchdata.stateful_dataloader import StatefulDataLoader

from .collators import default_data_collator
from . import stream as st
from .sampler import DeterministicSampler, SliceBatchSampler
from .seeded import Positioned, PositionedBatches, SeededCollate

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoaderState:
    """Where a loader is: ``batch_index`` batches of epoch ``epoch`` were consumed.

    ``stream`` (streaming loaders only): the stream's own state after those batches (JSON; ``{}``
    at an epoch's start), with which the next iteration continues it in O(1).
    """

    epoch: int = 0
    batch_index: int = 0
    seed: int = 0
    stream: dict | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.stream is None:
            del d["stream"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown loader state keys {sorted(unknown)}; expected epoch, batch_index, seed, stream")
        return cls(**{k: v if k == "stream" else int(v) for k, v in d.items()})


DataLoaderState = LoaderState


def has_length(dataset: Any) -> bool:
    """True when ``len(dataset)`` works (map-style); streaming datasets have no length."""
    if isinstance(dataset, tud.IterableDataset) and not st.is_hf_iterable(dataset):
        try:
            len(dataset)
            return True
        except TypeError:
            return False
    if st.is_hf_iterable(dataset):
        return False
    try:
        len(dataset)
    except (TypeError, NotImplementedError):
        return False
    return True


def check_iterable_requires_max_steps(dataset: Any, max_steps: int | None) -> None:
    """Raise when a dataset without a length is used without a positive ``max_steps``."""
    if has_length(dataset):
        return
    if max_steps is None or max_steps <= 0:
        raise ValueError(
            f"the training dataset ({type(dataset).__name__}) has no length (a streaming/iterable dataset), so "
            "the number of steps cannot be derived from num_train_epochs: set max_steps to a positive number"
        )


def check_not_empty(dataset: Any, what: str = "dataset") -> None:
    if has_length(dataset) and len(dataset) == 0:
        raise ValueError(f"the {what} is empty (0 examples); nothing to load")


def _lengths_for_grouping(dataset, lengths, column: str):
    if lengths is not None:
        return torch.as_tensor(lengths)
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and column in column_names and not getattr(dataset, "format", {}).get("type") == "custom":
        return torch.tensor([len(x) for x in dataset[column]])
    return torch.tensor([len(dataset[i][column]) for i in range(len(dataset))])


class ResumableLoader:
    """Deterministic, rank-sharded, resumable batches over a dataset.

    Args:
        dataset: ``datasets.Dataset`` (also with ``with_transform``), ``datasets.IterableDataset``,
            torch ``Dataset``/``IterableDataset``, or a list of dicts.
        batch_size: examples per batch on this rank.
        collate_fn: any ``callable(list_of_examples) -> batch`` (default: stack).
        seed: the order of epoch ``e`` is a pure function of ``(seed, e)``.
        shuffle: ``False`` for evaluation (dataset order).
        drop_last: drop the last incomplete batch (and the tail not divisible across ranks).
        world_size, rank: data-parallel sharding.
        num_workers, pin_memory, persistent_workers, prefetch_factor, multiprocessing_context,
            in_order: passed to ``DataLoader``.
        group_by_length: length-grouped order (``lengths`` or the ``length_column_name`` column).
        shard_block: examples per rank per dealt block when sharding (the per-device batch size
            gives accelerate's order, as HF's Trainer has it; see ``sampler.shard_indices``).

    The collator runs under a seed derived from ``(seed, epoch, batch index, rank)`` (see
    :mod:`functrain.data.seeded`), so a collator that draws random numbers gives the same batch
    after a resume, and in worker processes, as in an uninterrupted run.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable | None = None, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, world_size: int = 1, rank: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None, in_order: bool = True,
                 group_by_length: bool = False, lengths: Sequence[int] | None = None,
                 length_column_name: str = "input_ids", shard_block: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_not_empty(dataset)
        self.dataset, self.batch_size = dataset, batch_size
        self.collate_fn = collate_fn or default_data_collator
        self.shuffle, self.drop_last = shuffle, drop_last
        self.world_size, self.rank = world_size, rank
        self.loader_kwargs = dict(num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=persistent_workers and num_workers > 0)
        if num_workers > 0:  # torch refuses these without worker processes
            self.loader_kwargs.update(prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context,
                                      in_order=in_order)
        self.is_iterable = not has_length(dataset)
        self.shard_block = shard_block
        self.state = LoaderState(seed=seed, stream=self._epoch_start())
        self.sampler = None
        if not self.is_iterable:
            group_lengths = _lengths_for_grouping(dataset, lengths, length_column_name) if group_by_length else None
            self.sampler = DeterministicSampler(len(dataset), seed=seed, shuffle=shuffle, world_size=world_size,
                                                rank=rank, drop_last=drop_last, lengths=group_lengths,
                                                batch_size=batch_size, block=shard_block)
            if len(self) == 0:
                raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch of {batch_size} "
                                 f"per rank with drop_last=True")

    # -- sizes ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style datasets only)."""
        if self.is_iterable:
            raise TypeError("a loader over an iterable dataset has no length; use max_steps")
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a ``state_dict()``; a checkpoint's position with every rank's
        ``streams`` gives this rank its own)."""
        state = dict(state)
        if self.is_iterable and st.STREAMS in state:
            state[st.STREAM] = st.rank_stream(state, self.rank, self.world_size)
        state.pop(st.STREAMS, None)
        new = LoaderState.from_dict(state)
        if new.seed != self.state.seed:
            raise ValueError(f"loader state has seed {new.seed} but this loader was built with seed "
                             f"{self.state.seed}; the data order would differ")
        self.state = dataclasses.replace(new, stream=new.stream if self.is_iterable else None)

    def use_seed(self, seed: int) -> None:
        """Draw the data order (and the collator's per-batch seeds) from ``seed`` from now on (a
        resume keeps the order its checkpoint was drawn with)."""
        self.state = dataclasses.replace(self.state, seed=int(seed))
        if self.sampler is not None:
            self.sampler.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        self.state = LoaderState(epoch=epoch, batch_index=0, seed=self.state.seed, stream=self._epoch_start())

    def _epoch_start(self) -> dict | None:
        return {} if self.is_iterable else None

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        """The rest of the current epoch; afterwards the state points at the next epoch."""
        return self.iter_from(self.state.epoch, self.state.batch_index)

    def iter_from(self, epoch: int, batch_index: int = 0) -> Iterator:
        """Batches of ``epoch`` starting at batch ``batch_index`` (0-based), updating ``state``.

        A streaming loader whose state holds the stream at exactly this position (a resume)
        continues the stream from it; otherwise it reads the stream up to the position.
        """
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        saved = self.state.stream if (self.state.epoch, self.state.batch_index) == (epoch, batch_index) else None
        self.state = LoaderState(epoch=epoch, batch_index=batch_index, seed=self.state.seed, stream=saved)
        if self.is_iterable:
            return self._stream_batches(epoch, batch_index, saved)
        return self._counting(self._map_loader(epoch, batch_index), epoch)

    def _counting(self, loader, epoch, stream_state: Callable[[], dict | None] = lambda: None):
        for batch in loader:
            # Count before yielding: a checkpoint taken while the caller holds this batch resumes after it.
            self.state = LoaderState(epoch=epoch, batch_index=self.state.batch_index + 1, seed=self.state.seed,
                                     stream=stream_state())
            yield batch
        self.state = LoaderState(epoch=epoch + 1, batch_index=0, seed=self.state.seed, stream=self._epoch_start())

    def _map_loader(self, epoch: int, batch_index: int) -> tud.DataLoader:
        if not self.is_iterable and batch_index > len(self):
            raise ValueError(f"batch_index {batch_index} is past the end of the epoch ({len(self)} batches)")
        remaining = self.sampler.indices(epoch)[batch_index * self.batch_size:]
        batches = PositionedBatches(SliceBatchSampler(remaining, self.batch_size, self.drop_last), epoch, batch_index)
        return tud.DataLoader(Positioned(self.dataset), batch_sampler=batches, collate_fn=self._seeded_collate(),
                              **self.loader_kwargs)

    def _seeded_collate(self) -> SeededCollate:
        return SeededCollate(self.collate_fn, self.state.seed, self.rank)

    def _stream_batches(self, epoch: int, batch_index: int, saved: dict | None) -> Iterator:
        layout = st.layout(self.batch_size, self.loader_kwargs["num_workers"], self.world_size, self.shard_block)
        view = st.rank_view(self.dataset, epoch, world_size=self.world_size, rank=self.rank, block=self.shard_block,
                            shuffle=self.shuffle)
        counted = st.CountedStream(view, epoch, self.batch_size)
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch function torch has deprecated
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            loader = StatefulDataLoader(counted, batch_size=self.batch_size, drop_last=self.drop_last,
                                        collate_fn=self._seeded_collate(), **self.loader_kwargs)
        batches: Iterator | StatefulDataLoader = loader
        if saved and saved.get("layout") == layout:
            loader.load_state_dict(saved["loader"])  # O(1): the stream continues where it stopped
        elif batch_index:
            if saved:
                logger.warning("the saved stream position was taken with %s, this loader has %s: reading the "
                               "stream up to batch %d instead", saved.get("layout"), layout, batch_index)
            # A new iterator's first batch comes from worker 0: skip whole rounds of workers, then
            # drop the few batches left, so the batches are those of an uninterrupted run.
            rounds = max(1, self.loader_kwargs["num_workers"])
            counted.skip_batches(batch_index - batch_index % rounds)
            batches = itertools.islice(loader, batch_index % rounds, None)
        if self.loader_kwargs["num_workers"] and not self.loader_kwargs.get("in_order", True):
            return self._counting(batches, epoch, dict)  # out-of-order workers have no exact position to save
        return self._counting(batches, epoch, lambda: {"layout": layout, "loader": st.json_copy(loader.state_dict())})
