"""Mergeable metric accumulators, in the style of clu.metrics (pure: no I/O, no host syncs).

A metric is a small immutable pytree of tensors (a NamedTuple) with:

* ``empty()``: the identity of ``merge``;
* ``from_batch(...)`` (or ``from_mean``/``from_logits``): the metric of one batch;
* ``merge(other)``: the metric of both (associative, so batches, steps and ranks combine in any
  grouping);
* ``compute()``: the final value, a 0-d tensor (call ``float()`` on it when logging).

Evaluation folds ``merge`` over the batches, so its memory does not grow with the eval set
(HF Trainer accumulated every logit: transformers issues 7232, 8476, 17089). Nothing here calls
``.item()``: a step may return these from a compiled function.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch

IGNORE_INDEX = -100
_ACC_DTYPE = torch.float64  # sums over millions of tokens keep their precision


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=_ACC_DTYPE)


def _all_zero(cls):
    """``empty()`` of a metric whose fields are all running sums: every field a 0-d zero."""
    return cls(*(_zero() for _ in cls._fields))


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # empty() lives on the CPU; follow the device of the other operand (no host sync).
    if a.device != b.device:
        a = a.to(b.device) if a.device.type == "cpu" else a
        b = b.to(a.device)
    return a + b


class Average(NamedTuple):
    """A weighted mean: ``total / count``."""

    total: torch.Tensor
    count: torch.Tensor

    empty = classmethod(_all_zero)

    @classmethod
    def from_batch(cls, values: torch.Tensor, weights: torch.Tensor | None = None) -> "Average":
        """The mean of ``values`` (any shape), each weighted by ``weights`` (default 1)."""
        values = values.detach().to(_ACC_DTYPE)
        if weights is None:
            return cls(values.sum(), torch.tensor(values.numel(), dtype=_ACC_DTYPE, device=values.device))
        weights = torch.as_tensor(weights, device=values.device).to(_ACC_DTYPE)
        return cls((values * weights).sum(), weights.sum())

    @classmethod
    def from_mean(cls, mean: torch.Tensor, count) -> "Average":
        """From a mean over ``count`` items (a step's loss over its supervised tokens).

        A batch with ``count == 0`` adds nothing, even if its mean is NaN (0/0).
        """
        mean = torch.as_tensor(mean).detach().to(_ACC_DTYPE)
        count = torch.as_tensor(count, device=mean.device).detach().to(_ACC_DTYPE)
        total = torch.where(count > 0, mean * count, torch.zeros_like(mean))
        return cls(total.reshape(()), count.reshape(()))

    def merge(self, other: "Average") -> "Average":
        return Average(_add(self.total, other.total), _add(self.count, other.count))

    def compute(self) -> torch.Tensor:
        """``total / count``; NaN when nothing was counted."""
        return self.total / self.count


class Accuracy(NamedTuple):
    """The fraction of correct predictions among labels that are not ``ignore_index``."""

    correct: torch.Tensor
    count: torch.Tensor

    empty = classmethod(_all_zero)

    @classmethod
    def from_batch(cls, predictions: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> "Accuracy":
        """From predicted ids and labels of the same shape."""
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must have "
                             "the same shape (pass logits to Accuracy.from_logits)")
        valid = labels != ignore_index
        correct = ((predictions == labels) & valid).sum().to(_ACC_DTYPE)
        return cls(correct, valid.sum().to(_ACC_DTYPE))

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    shift: bool = False) -> "Accuracy":
        """From logits ``(..., classes)``; ``shift=True`` compares position ``t``'s prediction with
        label ``t+1`` (causal language models)."""
        predictions = logits.detach().argmax(dim=-1)
        if shift:
            predictions, labels = predictions[..., :-1], labels[..., 1:]
        return cls.from_batch(predictions, labels, ignore_index)

    def merge(self, other: "Accuracy") -> "Accuracy":
        return Accuracy(_add(self.correct, other.correct), _add(self.count, other.count))

    def compute(self) -> torch.Tensor:
        return self.correct / self.count


class Collection(NamedTuple):
    """Named metrics merged together: ``Collection({"loss": Average(...), "accuracy": Accuracy(...)})``."""

    metrics: Mapping

    @classmethod
    def empty(cls, **metric_types) -> "Collection":
        """``Collection.empty(loss=Average, accuracy=Accuracy)``."""
        return cls({name: t.empty() for name, t in metric_types.items()})

    def merge(self, other: "Collection | Mapping") -> "Collection":
        other = other.metrics if isinstance(other, Collection) else other
        merged = dict(self.metrics)
        for name, metric in other.items():
            merged[name] = merged[name].merge(metric) if name in merged else metric
        return Collection(merged)

    def compute(self) -> dict:
        """``{name: 0-d tensor}``."""
        return {name: metric.compute() for name, metric in self.metrics.items()}
