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

Each mode keeps only what it needs (:func:`reduced_outputs`): loss only drops the step's outputs
as it returns, ``preprocess_logits_for_metrics`` runs on the device as the step returns, and no
batch's outputs are alive while the next batch runs, so memory peaks at one batch's logits.

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

from functrain.adapters.outputs import IGNORE_INDEX, batch_size_of, labels_of, predictions_of
from functrain.core.metrics import Average, Collection

PAD_INDEX = IGNORE_INDEX  # predictions of different lengths are padded with it, as in transformers


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
    """The prediction tensors in an eval step's ``outputs``: a dict / ``ModelOutput`` loses ``loss``
    and ``ignore_keys`` (the HF rule, :func:`functrain.adapters.predictions_of`); a tensor or a
    tuple of predictions (what the Trainer's steps return) is kept as it is."""
    if isinstance(outputs, Mapping):
        return predictions_of(outputs, ignore_keys, has_loss=True)
    return outputs


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
    include_for_metrics: Sequence[str] = (),
    batch_eval_metrics: bool = False,
    eval_do_concat_batches: bool = True,
    main_input_name: str = "input_ids",
    collect_predictions: bool | None = None,
    on_batch_end: Callable[[], None] | None = None,
    across_ranks=None,
) -> EvalLoopOutput:
    """Evaluate ``eval_step`` on every batch of ``loader``.

    Args:
        eval_step: ``eval_step(state, batch) -> {"loss", "num_items", "outputs"?, "labels"?}``.
        compute_metrics: HF-style ``fn(EvalPrediction) -> dict``; makes the loop keep
            (preprocessed) predictions and labels on the CPU.
        preprocess_logits_for_metrics: ``fn(logits, labels) -> tensor`` applied per batch on the
            device before moving to the CPU (keep an argmax, not 32k-wide logits).
        prediction_loss_only: keep nothing but the loss.
        metric_key_prefix: ``"eval"``, ``"test"`` (predict) or ``"eval_{name}"``.
        label_names: batch keys holding labels (given to ``compute_metrics`` as ``label_ids``; a
            tuple when there are several, e.g. QA's start and end positions).
        streaming_metrics: ``fn(batch, outputs) -> {name: metric}`` of mergeable metrics
            (:mod:`functrain.metrics`), merged over batches; nothing else is kept.
        include_for_metrics: HF's ``include_for_metrics``: ``"inputs"`` (the batch's
            ``main_input_name``) and/or ``"loss"`` (each example's batch loss) go into the
            ``EvalPrediction`` as ``inputs`` / ``losses``. ``include_inputs_for_metrics=True`` is
            the older spelling of ``["inputs"]``.
        batch_eval_metrics: call ``compute_metrics(EvalPrediction of one batch (tensors),
            compute_result=is_last_batch)`` batch by batch; the metrics are its last result.
            Predictions are then kept only when ``collect_predictions`` (``predict()``) asks.
        eval_do_concat_batches: ``False`` keeps ``predictions``/``label_ids`` as lists of
            per-batch arrays instead of concatenating them.
        collect_predictions: keep predictions even without ``compute_metrics`` (``predict()``);
            default: only when ``compute_metrics`` is given.
        on_batch_end: called after each batch (the Trainer fires ``on_prediction_step`` there).
        across_ranks: a :class:`functrain.parallel.gather.EvalShard` when each rank evaluated its
            share (``loader`` gives this rank's batches): per-batch arrays are gathered in dataset
            order and the loss and streaming metrics merged over ranks before ``compute_metrics``.

    Returns:
        :class:`EvalLoopOutput` with numpy ``predictions``/``label_ids`` (``None`` if not kept),
        ``metrics`` (``f"{prefix}_loss"`` = supervised-item-weighted mean loss over the whole set,
        streaming metrics, ``compute_metrics`` results, ``f"{prefix}_runtime"``) and ``num_samples``.
    """
    include = set(include_for_metrics) | ({"inputs"} if include_inputs_for_metrics else set())
    batched = batch_eval_metrics and compute_metrics is not None
    keep = compute_metrics is not None if collect_predictions is None else collect_predictions
    keep = keep and not prediction_loss_only and not (batched and not collect_predictions)
    wants_outputs = (keep or batched) and not prediction_loss_only
    if streaming_metrics is None:  # (streaming metrics see the step's raw outputs)
        eval_step = reduced_outputs(eval_step, preprocess_logits_for_metrics if wants_outputs else None,
                                    keep_outputs=wants_outputs, label_names=label_names, ignore_keys=ignore_keys)
        preprocess_logits_for_metrics = None  # done in the step
    start = time.perf_counter()
    loss = Average.empty()
    has_loss = False
    stream = Collection({})
    preds, labels, inputs, losses = [], [], [], []
    metrics: dict = {}
    num_samples = num_batches = 0
    for batch, is_last in _with_last_flag(loader):
        out = eval_step(state, batch)
        num_batches += 1
        rows = batch_size_of(batch) or 0
        num_samples += rows
        if out.get("loss") is not None:
            has_loss = True
            loss = loss.merge(Average.from_mean(out["loss"], out["num_items"]))
        outputs = out.get("outputs")
        if streaming_metrics is not None:
            stream = stream.merge(streaming_metrics(batch, outputs))
        if wants_outputs:
            batch_labels = out["labels"] if out.get("labels") is not None else labels_of(batch, label_names)
            logits = logits_from_outputs(outputs, ignore_keys)
            if logits is not None and preprocess_logits_for_metrics is not None:
                logits = preprocess_logits_for_metrics(logits, batch_labels)
            batch_inputs = batch.get(main_input_name) if "inputs" in include else None
            batch_losses = (out["loss"].detach().float().reshape(1).repeat(rows)
                            if "loss" in include and out.get("loss") is not None else None)
            if keep:
                _append_numpy(preds, logits)
                _append_numpy(labels, batch_labels)
                _append_numpy(inputs, batch_inputs)
                _append_numpy(losses, batch_losses)
            if batched and logits is not None and batch_labels is not None:
                metrics = compute_metrics(EvalPrediction(logits, batch_labels, inputs=batch_inputs,
                                                         losses=batch_losses), compute_result=is_last) or {}
        if on_batch_end is not None:
            on_batch_end()
        # Let go of this batch's outputs before the next step runs (the streaming path's are whole logits).
        out = outputs = logits = None
    if across_ranks is not None:  # every rank then holds what one process would have
        preds, labels, inputs, losses = (across_ranks.gather_batches(x) for x in (preds, labels, inputs, losses))
        loss, stream = across_ranks.merge(loss), across_ranks.merge(stream)
        has_loss = across_ranks.total(int(has_loss)) > 0
        num_samples, num_batches = across_ranks.total(num_samples), across_ranks.total(num_batches)
    if num_batches == 0:
        raise ValueError("the evaluation loader produced no batches (empty eval dataset?)")

    gather = pad_and_concatenate if eval_do_concat_batches else list
    predictions = gather(preds) if preds else None
    label_ids = gather(labels) if labels else None
    metrics = dict(metrics)
    if has_loss:
        metrics["loss"] = loss.compute()
    metrics.update(stream.compute())
    if compute_metrics is not None and not batched and predictions is not None and label_ids is not None:
        metrics.update(compute_metrics(EvalPrediction(predictions, label_ids, inputs=gather(inputs) if inputs else None,
                                                      losses=gather(losses) if losses else None)))
    runtime = time.perf_counter() - start
    metrics["runtime"] = round(runtime, 4)
    metrics["samples_per_second"] = round(num_samples / runtime, 3) if runtime > 0 else float("inf")
    metrics["steps_per_second"] = round(num_batches / runtime, 3) if runtime > 0 else float("inf")
    return EvalLoopOutput(predictions, label_ids, _prefixed(metrics, metric_key_prefix), num_samples)


def reduced_outputs(eval_step: Callable, preprocess: Callable | None, *, keep_outputs: bool,
                    label_names: Sequence[str] = ("labels",), ignore_keys: Sequence[str] = ("past_key_values",)):
    """``eval_step`` whose result carries only what the loop keeps: no ``outputs`` when
    ``keep_outputs`` is False (loss only), else ``preprocess(logits, labels)`` of them when
    ``preprocess`` is given (HF's ``preprocess_logits_for_metrics``, e.g. an argmax), computed on
    the device as the step returns, so a whole batch's logits never reach the loop."""
    if keep_outputs and preprocess is None:
        return eval_step

    def step(state, batch):
        out = eval_step(state, batch)
        outputs = out.get("outputs")
        if outputs is None:
            return out
        out = {k: v for k, v in out.items() if k != "outputs"}
        logits = logits_from_outputs(outputs, ignore_keys) if keep_outputs else None
        if logits is not None:
            labels = out["labels"] if out.get("labels") is not None else labels_of(batch, label_names)
            out["outputs"] = preprocess(logits, labels)
        return out

    return step


def _append_numpy(store: list, value) -> None:
    if value is not None:
        store.append(_to_numpy(value))


def _with_last_flag(loader: Iterable):
    """``(batch, is_last)`` pairs: one batch of look-ahead, so the last batch is known when it runs
    (``batch_eval_metrics`` computes the result there), also for loaders without a length."""
    it = iter(loader)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True
