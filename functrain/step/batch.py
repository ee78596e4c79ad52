"""What a step needs to know about a batch: validation, splitting, and counting supervised items.

Everything here that runs on the hot path reads host metadata only (keys, shapes, dtypes), so
checking a batch never syncs the device. Counting items is a tensor op and stays on the device.

Counting follows the Hugging Face ``Trainer`` after its gradient-accumulation fix (transformers
PRs 34191, 34198, 34283; ``Trainer._get_num_items_in_batch`` in transformers 5.x): the number of
items is ``labels.ne(-100).sum()``, taken over ``batch["shift_labels"]`` when present, else over
``labels[..., 1:]`` for models whose loss shifts the labels (decoder-only causal LMs), else over
``labels``. For 1-d class labels that is the number of examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from functrain.adapters.outputs import batch_size_of, forward_argument_names  # noqa: F401 (step's names)
from functrain.core.metrics import IGNORE_INDEX

# Model heads whose loss reads labels as class indices (float labels are a bug for them).
_INDEX_LABEL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification",
                         "ForMultipleChoice", "ForConditionalGeneration", "ForPreTraining")


def loss_shifts_labels(model: nn.Module) -> bool:
    """True for models whose loss predicts ``labels[i + 1]`` at position ``i`` (decoder-only LMs).

    Same test as ``transformers.Trainer``: the model's ``loss_type`` maps to ``ForCausalLMLoss``
    and the config is not encoder-decoder. Falls back to the class name (``...ForCausalLM``,
    ``...LMHeadModel``) when transformers is absent or the model has no ``loss_type``.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        if LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss:
            return True
    except Exception:  # transformers missing or moved: use the name rule below
        pass
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def make_count_items(model: nn.Module) -> Callable[[Mapping], torch.Tensor]:
    """The default ``count_items(batch) -> 0-d tensor`` for ``model`` (see the module docstring).

    A batch with no ``labels`` counts its examples (the size of dim 0).
    """
    shifts = loss_shifts_labels(model)

    def count_items(batch: Mapping) -> torch.Tensor:
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        elif "labels" in batch:
            labels = batch["labels"][..., 1:] if shifts else batch["labels"]
        else:
            first = next(iter(batch.values()))
            return torch.full((), first.shape[0], dtype=torch.int64, device=first.device)
        return labels.ne(IGNORE_INDEX).sum()

    return count_items


def batch_size(batch: Mapping) -> int:
    return batch_size_of(batch)


def split(batch: Mapping, num: int) -> list[dict]:
    """``num`` microbatches of equal size along dim 0 (views, no copies)."""
    if num == 1:
        return [dict(batch)]
    pieces = {k: v.chunk(num, dim=0) for k, v in batch.items()}
    return [{k: pieces[k][i] for k in batch} for i in range(num)]


def validate(batch, *, accumulate: int, required_keys=(), model: nn.Module | None = None,
             forward_keys: frozenset | None = None) -> None:
    """Raise a clear error for a batch the step cannot use (host metadata only, no device sync)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    if not batch:
        raise ValueError("batch is empty (no keys)")
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"batch[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.ndim == 0:
            raise ValueError(f"batch[{k!r}] is 0-d; every batch entry needs a leading batch dimension")
    missing = [k for k in required_keys if k not in batch]
    if missing:
        raise KeyError(f"batch has no key {missing[0]!r}, which the loss needs; keys present: {sorted(batch)}")
    if forward_keys is not None:
        unknown = sorted(set(batch) - forward_keys)
        if unknown:
            raise KeyError(f"batch key(s) {unknown} are not arguments of {type(model).__name__}.forward; "
                           f"keys present: {sorted(batch)}")
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch entries disagree on the batch size (dim 0): {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"batch is empty: batch size 0 (shapes {({k: tuple(v.shape) for k, v in batch.items()})})")
    if n % accumulate != 0:
        raise ValueError(f"batch size {n} is not divisible into accumulate={accumulate} microbatches; "
                         f"use a batch size that is a multiple of {accumulate}")
    if model is not None and "labels" in batch:
        _check_label_dtype(model, batch["labels"])
        resolve_problem_type(model, batch)


def resolve_problem_type(model: nn.Module, batch: Mapping) -> None:
    """Set ``config.problem_type`` as an HF sequence classifier would on its first forward.

    ``...ForSequenceClassification.forward`` writes ``config.problem_type`` the first time it
    sees labels. Inside a compiled step that write changes what the graph was guarded on and
    forces a recompile on the second step; doing the same (host-side, same rule) before the
    first step keeps one graph.
    """
    config = getattr(model, "config", None)
    if (config is None or getattr(config, "problem_type", "") is not None or "labels" not in batch
            or not type(model).__name__.endswith("ForSequenceClassification")):
        return
    labels = batch["labels"]
    if config.num_labels == 1:
        config.problem_type = "regression"
    elif labels.dtype in (torch.long, torch.int):
        config.problem_type = "single_label_classification"
    else:
        config.problem_type = "multi_label_classification"


def _check_label_dtype(model: nn.Module, labels: torch.Tensor) -> None:
    if not labels.is_floating_point():
        return
    name = type(model).__name__
    config = getattr(model, "config", None)
    wants_index = name.endswith(_INDEX_LABEL_SUFFIXES) or loss_shifts_labels(model)
    if name.endswith("ForSequenceClassification") and config is not None:
        # HF reads float labels as regression (num_labels == 1) or multi-label targets
        # (shape (batch, num_labels)); single-label classification needs class indices.
        num_labels = getattr(config, "num_labels", 1)
        wants_index = config.problem_type == "single_label_classification" or (
            config.problem_type is None and num_labels > 1 and labels.ndim == 1)
    if wants_index:
        raise TypeError(f"labels have dtype {labels.dtype}, but {name} expects integer class indices "
                        f"(torch.long, with {IGNORE_INDEX} for ignored positions)")
