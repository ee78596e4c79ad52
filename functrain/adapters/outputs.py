"""Model outputs and label names: the Hugging Face conventions, in one place.

transformers models return a ``ModelOutput`` (a dict whose ``None`` entries are left out);
hand-written models, and transformers models called with ``return_dict=False``, return a plain
tuple ``(loss, logits, ...)`` when given labels and ``(logits, ...)`` without. The HF ``Trainer``
reads them with a few rules (``compute_loss`` and ``prediction_step`` in transformers 5.x):

* the loss is ``outputs["loss"]`` of a dict, ``outputs[0]`` of a tuple;
* the predictions are the other entries, minus the config's ``keys_to_ignore_at_inference``
  (or the caller's ``ignore_keys``); one tensor when there is one, else a tuple;
* the label names are ``args.label_names``, else the forward arguments whose name contains
  "label" (plus ``start_positions`` / ``end_positions`` for question answering): ``find_labels``;
  a batch "has labels" only when every one of them is present.

Everything here reads Python structure only (keys, signatures, shapes), never a tensor's value.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from functrain.adapters.peft import forward_model
from functrain.core.metrics import IGNORE_INDEX  # noqa: F401 (re-exported: the one -100)


# -- the forward signature ------------------------------------------------------------------------


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def forward_parameters(model: Any) -> list[str]:
    """The named parameters of ``model.forward``, in order (no ``*args`` / ``**kwargs``; [] when it
    has no signature)."""
    sig = _signature(getattr(forward_model(model), "forward", model))
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def forward_argument_names(model: Any) -> frozenset | None:
    """The keyword names ``model.forward`` accepts, or ``None`` if it takes ``**kwargs`` (anything)."""
    sig = _signature(model.forward)
    if sig is None:
        return None
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def can_return_loss(model: Any) -> bool:
    """True when ``forward`` has ``return_loss=True`` by default (CLIP-style models: a loss without labels)."""
    sig = _signature(model.forward)
    param = None if sig is None else sig.parameters.get("return_loss")
    return param is not None and param.default is True


def no_cache_kwargs(model: Any, batch: Mapping) -> dict:
    """``{"use_cache": False}`` for transformers models (a KV cache is useless in training/eval forward
    passes, costs memory and is an object the compiler would have to trace); ``{}`` otherwise."""
    if "use_cache" not in batch and hasattr(getattr(model, "config", None), "use_cache"):
        return {"use_cache": False}
    return {}


def find_labels(model: Any) -> list[str]:
    """HF's ``find_labels``: forward arguments naming labels (QA heads: also the span positions)."""
    target = forward_model(model)  # a PeftModel's forward takes **kwargs: its base's labels (as HF)
    sig = _signature(type(target).forward)
    names = [] if sig is None else list(sig.parameters)
    if "QuestionAnswering" in type(target).__name__:
        return [p for p in names if "label" in p or p in ("start_positions", "end_positions")]
    return [p for p in names if "label" in p]


def label_names_of(model: Any, configured: Sequence[str] | None = None) -> list[str]:
    """``configured`` (``args.label_names``) when given, else :func:`find_labels`."""
    return list(configured) if configured is not None else find_labels(model)


def labels_of(batch: Mapping, label_names: Sequence[str]):
    """The batch's labels as HF's ``prediction_step`` takes them: ``None`` unless every label name is
    present; one tensor for one name, a tuple (in ``label_names`` order) for several."""
    if not label_names or any(batch.get(n) is None for n in label_names):
        return None
    labels = tuple(batch[n] for n in label_names)
    return labels[0] if len(labels) == 1 else labels


# -- outputs --------------------------------------------------------------------------------------


def loss_of(outputs: Any):
    """The loss in a model output: ``outputs["loss"]`` of a dict/``ModelOutput``, ``outputs[0]`` of a
    tuple/list; ``None`` when there is none."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    if isinstance(outputs, (tuple, list)):
        return outputs[0] if outputs else None
    return None


def ignore_keys_of(model: Any) -> list[str]:
    """The output keys predictions leave out by default: ``config.keys_to_ignore_at_inference``
    (HF's default when the config does not say: ``["cache"]``; no config: none)."""
    if not hasattr(model, "config"):
        return []
    return list(getattr(model.config, "keys_to_ignore_at_inference", ["cache"]) or [])


def predictions_of(outputs: Any, ignore_keys: Sequence[str] = (), has_loss: bool = True):
    """The prediction part of a model output (HF's ``prediction_step`` rule).

    With a loss (``has_loss``): every entry but ``loss`` (dict) or ``outputs[1:]`` (tuple);
    without: every entry (the model was not given labels). Dict keys in ``ignore_keys`` and
    ``None`` entries are left out. One tensor when one remains, a tuple otherwise, ``None`` if none.
    """
    if isinstance(outputs, Mapping):
        skip = set(ignore_keys) | ({"loss"} if has_loss else set())
        kept = tuple(v for k, v in outputs.items() if k not in skip and v is not None)
    elif isinstance(outputs, (tuple, list)):
        kept = tuple(v for v in (outputs[1:] if has_loss else outputs) if v is not None)
    elif outputs is None:
        kept = ()
    else:
        kept = (outputs,)
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else kept


def split_outputs(outputs: Any, has_labels: bool, ignore_keys: Sequence[str] = ()):
    """``(loss, predictions)`` of a model output. A tuple's first entry is the loss only when the
    model was given labels (``has_labels``); a dict's ``loss`` entry is the loss whenever present."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss"), predictions_of(outputs, ignore_keys, has_loss=True)
    if isinstance(outputs, (tuple, list)) and has_labels:
        return loss_of(outputs), predictions_of(outputs, ignore_keys, has_loss=True)
    return None, predictions_of(outputs, ignore_keys, has_loss=False)


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor/array in a (nested) batch (HF's ``find_batch_size``)."""
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = batch_size_of(item)
            if found is not None:
                return found
        return None
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else None
