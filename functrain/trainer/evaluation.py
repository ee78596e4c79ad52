"""The evaluation loop (driver side): run a pure ``eval_step`` over a loader and reduce.

Two ways to get metrics, usable together:

* Streaming (the pure style): the loss is an :class:`~functrain.metrics.Average` weighted by
  the number of supervised items, merged batch by batch; ``streaming_metrics(batch, outputs)``
  returns more mergeable metrics per batch. Nothing is kept per batch, so memory stays at one
  batch's worth however large the eval set.
* HF style: ``compute_metrics(EvalPrediction)``. Model outputs (after
  ``preprocess_logits_for_metrics``, e.g. an argmax that turns ``(B, T, V)`` logits into
  ``(B, T)`` ids) and labels are moved to the CPU batch by batch and concatenated as numpy at the
  end, padded with -100 where sequence lengths differ across batches.

``eval_step(state, batch)`` is any callable returning a dict with ``"loss"`` (mean over the
batch's supervised items), ``"num_items"`` and, when predictions are wanted, ``"outputs"``. A step
may also return ``"labels"``: they replace the batch's labels as ``label_ids`` (the seq2seq
generate step pads them to the generation length, as transformers' ``Seq2SeqTrainer`` does).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from functrain.core.metrics import Average, Collection

PAD_INDEX = -100


class EvalPrediction:
    """What ``compute_metrics`` receives; behaves like ``transformers.EvalPrediction``.

    Unpacks as ``predictions, label_ids = eval_pred`` (``inputs``/``losses`` follow when set).
    """

    def __init__(self, predictions, label_ids, inputs=None, losses=None):
        self.predictions, self.label_ids, self.inputs, self.losses = predictions, label_ids, inputs, losses
        self._elements = (predictions, label_ids) + tuple(x for x in (inputs, losses) if x is not None)

    def __iter__(self):
        return iter(self._elements)

    def __getitem__(self, idx):
        return self._elements[idx]

    def __len__(self):
        return len(self._elements)


class EvalLoopOutput(NamedTuple):
    """Like ``transformers.trainer_utils.EvalLoopOutput``; ``predict()`` returns the same fields."""

    predictions: Any
    label_ids: Any
    metrics: dict
    num_samples: int


# -- moving outputs to the host ---------------------------------------------------------------------


def logits_from_outputs(outputs: Any, ignore_keys: Sequence[str] = ("past_key_values",)) -> Any:
    """The prediction tensors in model outputs (HF rule): everything but ``loss`` and ``ignore_keys``;
    one tensor when there is one."""
    if outputs is None or isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "items"):
        values = tuple(v for k, v in outputs.items() if k not in ("loss", *ignore_keys) and v is not None)
    else:
        values = tuple(outputs)
    return values[0] if len(values) == 1 else values


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bf16
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_numpy(v) for v in x)
    if isinstance(x, Mapping):
        return {k: _to_numpy(v) for k, v in x.items()}
    return np.asarray(x)


def pad_and_concatenate(arrays: list, padding_index: int = PAD_INDEX):
    """Concatenate along axis 0, padding the other axes with ``padding_index`` where they differ.

    Works on nested tuples/lists/dicts of arrays (like ``transformers``' ``nested_concat``).
    """
    first = arrays[0]
    if isinstance(first, (tuple, list)):
        return type(first)(pad_and_concatenate([a[i] for a in arrays], padding_index) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: pad_and_concatenate([a[k] for a in arrays], padding_index) for k in first}
    arrays = [np.atleast_1d(a) for a in arrays]
    if all(a.shape[1:] == first.shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    trailing = tuple(max(a.shape[d] for a in arrays) for d in range(1, first.ndim))
    out = np.full((sum(len(a) for a in arrays), *trailing), padding_index, dtype=np.result_type(*arrays))
    row = 0
    for a in arrays:
        out[(slice(row, row + len(a)), *(slice(0, s) for s in a.shape[1:]))] = a
        row += len(a)
    return out


def _labels_of(batch: Mapping, label_names: Sequence[str]):
    present = [batch[n] for n in label_names if n in batch and batch[n] is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else tuple(present)


def _batch_size(batch) -> int:
    for v in batch.values() if isinstance(batch, Mapping) else batch:
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 0


# -- the loop -------------------------------------------------------------------------------------


def _prefixed(metrics: Mapping, prefix: str) -> dict:
    out = {}
    for k, v in metrics.items():
        key = k if not prefix or k.startswith(f"{prefix}_") else f"{prefix}_{k}"
        out[key] = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    return out


def evaluation_loop(
    eval_step: Callable,
    state: Any,
    loader: Iterable,
    *,
    compute_metrics: Callable | None = None,
    preprocess_logits_for_metrics: Callable | None = None,
    prediction_loss_only: bool = False,
    metric_key_prefix: str = "eval",
    label_names: Sequence[str] = ("labels",),
    streaming_metrics: Callable | None = None,
    ignore_keys: Sequence[str] = ("past_key_values",),
    include_inputs_for_metrics: bool = False,
    collect_predictions: bool | None = None,
    across_ranks=None,
) -> EvalLoopOutput:
    """Evaluate ``eval_step`` on every batch of ``loader``.

    Args:
        eval_step: ``eval_step(state, batch) -> {"loss", "num_items", "outputs"?}``.
        compute_metrics: HF-style ``fn(EvalPrediction) -> dict``; makes the loop keep
            (preprocessed) predictions and labels on the CPU.
        preprocess_logits_for_metrics: ``fn(logits, labels) -> tensor`` applied per batch on the
            device before moving to the CPU (keep an argmax, not 32k-wide logits).
        prediction_loss_only: keep nothing but the loss.
        metric_key_prefix: ``"eval"``, ``"test"`` (predict) or ``"eval_{name}"``.
        label_names: batch keys holding labels (given to ``compute_metrics`` as ``label_ids``).
        streaming_metrics: ``fn(batch, outputs) -> {name: metric}`` of mergeable metrics
            (:mod:`functrain.metrics`), merged over batches; nothing else is kept.
        collect_predictions: keep predictions even without ``compute_metrics`` (``predict()``);
            default: only when ``compute_metrics`` is given.
        across_ranks: a :class:`functrain.parallel.gather.EvalShard` when each rank evaluated its
            share (``loader`` gives this rank's batches): per-batch arrays are gathered in dataset
            order and the loss and streaming metrics merged over ranks before ``compute_metrics``.

    Returns:
        :class:`EvalLoopOutput` with numpy ``predictions``/``label_ids`` (``None`` if not kept),
        ``metrics`` (``f"{prefix}_loss"`` = supervised-item-weighted mean loss over the whole set,
        streaming metrics, ``compute_metrics`` results, ``f"{prefix}_runtime"``) and ``num_samples``.
    """
    keep = (compute_metrics is not None if collect_predictions is None else collect_predictions)
    keep = keep and not prediction_loss_only
    start = time.perf_counter()
    loss = Average.empty()
    has_loss = False
    stream = Collection({})
    preds, labels, inputs = [], [], []
    num_samples = num_batches = 0
    for batch in loader:
        out = eval_step(state, batch)
        num_batches += 1
        num_samples += _batch_size(batch)
        if out.get("loss") is not None:
            has_loss = True
            loss = loss.merge(Average.from_mean(out["loss"], out["num_items"]))
        outputs = out.get("outputs")
        if streaming_metrics is not None:
            stream = stream.merge(streaming_metrics(batch, outputs))
        if keep:
            batch_labels = out["labels"] if out.get("labels") is not None else _labels_of(batch, label_names)
            logits = logits_from_outputs(outputs, ignore_keys)
            if logits is not None and preprocess_logits_for_metrics is not None:
                logits = preprocess_logits_for_metrics(logits, batch_labels)
            if logits is not None:
                preds.append(_to_numpy(logits))
            if batch_labels is not None:
                labels.append(_to_numpy(batch_labels))
            if include_inputs_for_metrics and "input_ids" in batch:
                inputs.append(_to_numpy(batch["input_ids"]))
    if across_ranks is not None:  # every rank then holds what one process would have
        preds, labels, inputs = (across_ranks.gather_batches(x) for x in (preds, labels, inputs))
        loss, stream = across_ranks.merge(loss), across_ranks.merge(stream)
        has_loss = across_ranks.total(int(has_loss)) > 0
        num_samples, num_batches = across_ranks.total(num_samples), across_ranks.total(num_batches)
    if num_batches == 0:
        raise ValueError("the evaluation loader produced no batches (empty eval dataset?)")

    predictions = pad_and_concatenate(preds) if preds else None
    label_ids = pad_and_concatenate(labels) if labels else None
    metrics: dict = {}
    if has_loss:
        metrics["loss"] = loss.compute()
    metrics.update(stream.compute())
    if compute_metrics is not None and predictions is not None and label_ids is not None:
        eval_inputs = pad_and_concatenate(inputs) if inputs else None
        metrics.update(compute_metrics(EvalPrediction(predictions, label_ids, inputs=eval_inputs)))
    runtime = time.perf_counter() - start
    metrics["runtime"] = round(runtime, 4)
    metrics["samples_per_second"] = round(num_samples / runtime, 3) if runtime > 0 else float("inf")
    metrics["steps_per_second"] = round(num_batches / runtime, 3) if runtime > 0 else float("inf")
    return EvalLoopOutput(predictions, label_ids, _prefixed(metrics, metric_key_prefix), num_samples)
