"""Randomness for collators from the data position, so a random collator resumes bitwise.

A collator that draws random numbers (MLM masking, noise, random crops) normally draws from the
global generators, whose state depends on everything that ran before: the DataLoader draws its
own base seed from torch's generator each time an iterator starts, a resume starts one at another
batch, and the masks change. Here each batch gets its own seed, derived from the loader's seed
(``data_seed`` or ``seed``, saved in the checkpoint's data position), the epoch, the batch index
and the rank. Around the collate call the global generators of torch, numpy and Python are
seeded from it and restored afterwards (``torch.random.fork_rng``), and a collator's own
``generator`` (functrain's or transformers' ``DataCollatorForLanguageModeling(seed=...)``) is
seeded from it and its own seed, then restored. Nothing is rebound: the collator is called as is.
So batch ``k`` of epoch ``e`` is the same tensors in an uninterrupted run, after a resume, and in
a worker process.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch

from functrain.core.rng import global_seed, mix64


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int = 0) -> int:
    """A 63-bit seed for one batch, a pure function of its position."""
    h = mix64(seed & ((1 << 64) - 1))
    for part in (epoch, batch_index, rank):
        h = mix64(h ^ (part & ((1 << 64) - 1)))
    return h >> 1


class Positioned(torch.utils.data.Dataset):
    """``dataset`` indexed by ``((epoch, batch_index), i)``; items come back as ``(position, example)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        position, i = key
        return position, self.dataset[i]

    def __getitems__(self, keys: list) -> list:
        inner = getattr(self.dataset, "__getitems__", None)
        indices = [i for _, i in keys]
        examples = inner(indices) if inner is not None else [self.dataset[i] for i in indices]
        return [(position, ex) for (position, _), ex in zip(keys, examples)]


class PositionedBatches(torch.utils.data.Sampler):
    """Wrap a batch sampler of epoch ``epoch`` starting at ``start``: index ``i`` -> ``((epoch, b), i)``."""

    def __init__(self, batches, epoch: int, start: int):
        self.batches, self.epoch, self.start = batches, epoch, start

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b, indices in enumerate(self.batches, start=self.start):
            yield [((self.epoch, b), i) for i in indices]


class SeededCollate:
    """Call ``collate_fn`` on a batch of positioned examples under the batch's own seed."""

    def __init__(self, collate_fn: Callable, seed: int, rank: int = 0):
        self.collate_fn, self.seed, self.rank = collate_fn, seed, rank
        # The collator's own seed still matters: it is folded into each batch's seed.
        own_seed = getattr(collate_fn, "seed", None)
        generator = getattr(collate_fn, "generator", None)
        if not isinstance(own_seed, int) or isinstance(own_seed, bool):
            own_seed = generator.initial_seed() if isinstance(generator, torch.Generator) else 0
        self.own_seed = own_seed

    def __call__(self, items: list) -> Any:
        (epoch, batch_index), _ = items[0]
        examples = [ex for _, ex in items]
        seed = batch_seed(self.seed, epoch, batch_index, self.rank)
        return call_seeded(self.collate_fn, examples, seed, self.own_seed)


def call_seeded(collate_fn: Callable, examples: list, seed: int, own_seed: int = 0) -> Any:
    """``collate_fn(examples)`` with every generator it may draw from seeded from ``seed``;
    the global generators and the collator's own one are left as they were."""
    generator = getattr(collate_fn, "generator", None)
    own = generator if isinstance(generator, torch.Generator) else None
    out = _call_seeded(collate_fn, examples, seed, own_seed, own)
    if own is None and isinstance(getattr(collate_fn, "generator", None), torch.Generator):
        # The collator made its generator during the call (transformers does so lazily, once per
        # process) and drew from it unseeded: collate again, now seeding it.
        out = _call_seeded(collate_fn, examples, seed, own_seed, collate_fn.generator)
    return out


def _call_seeded(collate_fn, examples, seed, own_seed, own):
    py_state, np_state = random.getstate(), np.random.get_state()
    own_state = own.get_state() if own is not None else None
    with global_seed(seed):  # (the CPU generator only on a machine without accelerators: no stack captured)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if own is not None:
            own.manual_seed(mix64(seed ^ own_seed) >> 1)
        try:
            return collate_fn(examples)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if own is not None:
                own.set_state(own_state)
