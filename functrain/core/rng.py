"""Explicit random keys, in the style of JAX, for deterministic dropout.

A key is a 1-d int64 CPU tensor ``[seed, counter]``. Keys are values: deriving a new key never
changes the old one, and every derivation is a pure function of its inputs. A key lives on the
CPU whatever device the model uses, so reading it to seed a generator never syncs a device.

``torch`` draws random numbers from a stateful generator, so a step turns its key into a seed
(:func:`seed_of`) and runs the model under a forked, freshly seeded generator: dropout becomes a
function of ``(state, batch)`` and the caller's global RNG is left exactly as it was.
"""

from __future__ import annotations

import contextlib

import torch

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap bijective hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _to_int64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def key(seed: int) -> torch.Tensor:
    """A fresh key from an integer seed."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.tensor([_to_int64(seed), 0], dtype=torch.int64)


def _check(k: torch.Tensor) -> None:
    if not (isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.shape == (2,)):
        raise TypeError(f"expected a key (int64 tensor of shape (2,)), got {k!r}")


def fold_in(k: torch.Tensor, data: int) -> torch.Tensor:
    """A new key derived from ``k`` and an integer (a step number, a microbatch index, a rank)."""
    _check(k)
    seed, counter = (int(v) for v in k.tolist())
    mixed = mix64((seed & _MASK64) ^ mix64((counter & _MASK64) ^ mix64(data & _MASK64)))
    return torch.tensor([_to_int64(mixed), 0], dtype=torch.int64)


def split(k: torch.Tensor, num: int = 2) -> list[torch.Tensor]:
    """``num`` independent keys derived from ``k``."""
    return [fold_in(k, i) for i in range(num)]


def next_key(k: torch.Tensor) -> torch.Tensor:
    """The key a step hands to the next step: same stream, counter advanced by one.

    Also takes stacked keys of shape ``(..., 2)`` (a population's), advancing each.
    """
    if not (isinstance(k, torch.Tensor) and k.dtype == torch.int64 and k.ndim >= 1 and k.shape[-1] == 2):
        raise TypeError(f"expected a key (int64 tensor of shape (2,) or (..., 2)), got {k!r}")
    return k + torch.tensor([0, 1], dtype=torch.int64)


def seed_of(k: torch.Tensor) -> int:
    """A non-negative 63-bit integer seed for ``torch.manual_seed``, a pure function of ``k``."""
    _check(k)
    seed, counter = (int(v) for v in k.tolist())
    return mix64((seed & _MASK64) ^ mix64(counter & _MASK64)) >> 1


@contextlib.contextmanager
def seeded(k: torch.Tensor, devices=None):
    """Run the body with the global generators seeded from ``k``, restoring them afterwards."""
    with global_seed(seed_of(k), devices):
        yield


@contextlib.contextmanager
def global_seed(seed: int, devices=None):
    """Run the body with torch's global generators seeded from the integer ``seed``, restoring them
    afterwards (the CPU one, and the CUDA devices already initialized, or ``devices``)."""
    if devices is None:
        # torch.manual_seed reseeds every CUDA device, so every one must be forked and restored.
        initialized = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if initialized else []
    with torch.random.fork_rng(devices=devices):
        if _any_accelerator():
            torch.manual_seed(seed)
        else:
            # The CPU generator is the only one: torch.manual_seed would also queue a lazy seed for
            # each accelerator backend, formatting the Python stack for each (~1 ms a step), and
            # that queued seed would leak into a later initialization.
            torch.default_generator.manual_seed(seed)
        yield


def _any_accelerator() -> bool:
    """Whether this machine has an accelerator backend (True where torch cannot say: the old path)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if hasattr(accelerator, "is_available") else True
