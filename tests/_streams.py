"""Streaming datasets for the resume tests: a generator-backed torch stream that counts what it
reads, and the same rows as a sharded ``datasets.IterableDataset``."""

import datasets
import torch
import torch.utils.data as tud


def stream_rows(n, seed=1, dim=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(-1)
    return [{"x": x[i], "labels": int(y[i])} for i in range(n)]


class CountingStream(tud.IterableDataset):
    """Examples made one at a time by a generator; ``reads`` counts the examples it yielded.

    Stateful as torchdata reads it: ``state_dict()`` is the position of the current iteration,
    ``load_state_dict`` makes the next ``__iter__`` start there. Workers split it (example ``i``
    goes to worker ``i % workers``), so each worker's position is its own.
    """

    def __init__(self, rows):
        self.rows, self.reads = rows, 0
        self._next, self._start = 0, None

    def state_dict(self):
        return {"next": self._next}

    def load_state_dict(self, state):
        self._start = state["next"]

    def _examples(self, first):
        info = tud.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for i in range(first, len(self.rows)):
            if i % workers == worker:
                self.reads += 1
                yield i, self.rows[i]

    def __iter__(self):
        first, self._start = self._start or 0, None
        for i, row in self._examples(first):
            self._next = i + 1
            yield row


def hf_stream(rows, num_shards=4):
    """The rows as a ``datasets`` stream of ``num_shards`` shards, torch-formatted."""
    table = datasets.Dataset.from_dict({"x": [r["x"].tolist() for r in rows], "labels": [r["labels"] for r in rows]})
    return table.to_iterable_dataset(num_shards=num_shards).with_format("torch")
