"""Per-example gradients, their norms, and per-example clipping (the DP-SGD building block).

The gradient of each example's loss is ``torch.func.vmap`` of ``torch.func.grad`` over the batch
dimension: one batched computation, not a Python loop over examples. Every function here is pure.

The loss is a function ``loss_fn(model, example_batch) -> 0-d loss`` called with the model's
parameters bound to the given ``params`` and with a batch of ONE example (leading dimension 1),
so the same loss function serves a normal batch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from functrain.core import tree

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim > 0}
    if not sizes:
        raise ValueError("batch has no tensor with a batch dimension")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sizes}")
    (n,) = set(sizes.values())
    if n == 0:
        raise ValueError("batch is empty (batch size 0)")
    return n


def per_example_grads(model: nn.Module, loss_fn: LossFn, params: dict, buffers: dict | None,
                      batch: Mapping[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """``(grads, losses)``: ``grads[name]`` has shape ``(batch, *param.shape)``, ``losses`` ``(batch,)``.

    Buffers are shared by all examples (no batch-norm statistics update; use a model without
    batch-dependent layers, as DP-SGD requires anyway). Randomness (dropout) is not supported
    inside vmap by default; call ``model.eval()`` or pass deterministic models.
    """
    _batch_size(batch)
    buffers = dict(buffers or {})
    tensor_keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim > 0]
    static = {k: v for k, v in batch.items() if k not in tensor_keys}

    def loss_of_one(p, example):
        one = {k: v.unsqueeze(0) for k, v in example.items()}
        one.update(static)
        with torch.nn.utils.stateless._reparametrize_module(model, {**p, **buffers}, tie_weights=True):
            loss = loss_fn(model, one)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a 0-d loss, got shape {tuple(loss.shape)}")
        return loss

    grad_and_loss = torch.func.grad_and_value(loss_of_one)
    examples = {k: batch[k] for k in tensor_keys}
    grads, losses = torch.func.vmap(grad_and_loss, in_dims=(None, 0))(params, examples)
    return grads, losses


def per_example_norms(grads: dict) -> torch.Tensor:
    """The l2 norm of each example's whole gradient, shape ``(batch,)``."""
    flat = [g.reshape(g.shape[0], -1) for g in tree.leaves(grads)]
    return torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)


def clip_per_example(grads: dict, max_norm: float) -> tuple[dict, torch.Tensor]:
    """Scale each example's gradient to norm at most ``max_norm``; return ``(clipped, norms)``.

    Uses the DP-SGD (Abadi et al., 2016) factor ``min(1, max_norm / norm)``, computed with
    ``clamp`` so there is no branch and no host sync.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norms = per_example_norms(grads)
    factors = torch.clamp(max_norm / (norms + 1e-12), max=1.0)

    def scale(g):
        return g * factors.view(-1, *([1] * (g.ndim - 1))).to(g.dtype)

    return tree.map(scale, grads), norms


def private_grad(model: nn.Module, loss_fn: LossFn, params: dict, buffers: dict | None,
                 batch: Mapping[str, torch.Tensor], *, max_norm: float, noise_multiplier: float = 0.0,
                 generator: torch.Generator | None = None) -> dict:
    """The DP-SGD gradient: mean over examples of clipped per-example gradients, plus Gaussian
    noise of std ``noise_multiplier * max_norm / batch_size`` (no noise when it is 0)."""
    grads, _ = per_example_grads(model, loss_fn, params, buffers, batch)
    clipped, _ = clip_per_example(grads, max_norm)
    n = _batch_size(batch)

    def reduce(g):
        mean = g.sum(0) / n
        if noise_multiplier > 0:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            mean = mean + noise * (noise_multiplier * max_norm / n)
        return mean

    return tree.map(reduce, clipped)
