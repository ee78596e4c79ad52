"""Keep only the dataset columns the model can take (``remove_unused_columns=True`` in HF).

The model's ``forward`` signature names the inputs it accepts; label columns (``label``,
``label_ids``, ``labels`` and any ``label_names``) are kept too, and the collators rename
``label``/``label_ids`` to ``labels``. Dropped columns are logged once, so a user who wonders
where a column went (transformers issue 25054) finds the answer in the log.

Datasets whose examples are built by a transform (``datasets.Dataset.with_transform``) keep their
raw columns: the filter is applied to what the transform returns, so a transform that needs the
raw ``image`` column still sees it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import torch.utils.data as tud

from functrain.adapters.outputs import forward_parameters

logger = logging.getLogger("functrain.data")

LABEL_COLUMNS = ("label", "label_ids", "labels")
_already_logged: set = set()


def _unwrap(model: Any) -> Any:
    """The user's module behind torch.compile (``_orig_mod``) / DDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            getattr(model, "module", None) if type(model).__name__ in ("DistributedDataParallel", "DataParallel") else None)
        if inner is None:
            return model
        model = inner


def signature_columns(model: Any, label_names: Sequence[str] | None = None) -> list[str]:
    """The column names a batch may carry for ``model``: ``forward``'s named parameters plus labels."""
    names = forward_parameters(_unwrap(model))
    for extra in (*LABEL_COLUMNS, *(label_names or ())):
        if extra not in names:
            names.append(extra)
    return names


def _hf_datasets():
    try:
        import datasets
        return datasets
    except ImportError:  # datasets is a dependency, but keep torch-only use possible
        return None


def column_names(dataset: Any) -> list[str] | None:
    """The columns of the dataset's examples (peeking at the first example when nothing else
    tells, or when a transform decides what an example holds)."""
    names = None if _has_transform(dataset) else getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict: the caller should pass one split
        raise TypeError(f"expected one dataset split, got a DatasetDict with splits {list(names)}")
    if names is not None:
        return list(names)
    first = _first_example(dataset)
    if first is None:
        return None
    if not isinstance(first, dict):
        raise TypeError(
            f"remove_unused_columns needs examples that are dicts of column -> value, got "
            f"{type(first).__name__}; pass remove_unused_columns=False for other example types"
        )
    return list(first)


def _first_example(dataset: Any):
    if isinstance(dataset, tud.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return next(iter(dataset), None)
    if len(dataset) == 0:
        return None
    return dataset[0]


class ColumnFilteredDataset(tud.Dataset):
    """A map-style view of ``dataset`` whose examples keep only ``columns`` (applied per example)."""

    def __init__(self, dataset, columns: Iterable[str]):
        self.dataset, self.columns = dataset, tuple(columns)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        example = self.dataset[index]
        return {k: v for k, v in example.items() if k in self.columns}

    def __getitems__(self, indices):  # keep datasets' fast batched fetch when available
        fetch = getattr(self.dataset, "__getitems__", None)
        examples = fetch(indices) if fetch else [self.dataset[i] for i in indices]
        return [{k: v for k, v in e.items() if k in self.columns} for e in examples]


class ColumnFilteredIterable(tud.IterableDataset):
    """An iterable view of ``dataset`` whose examples keep only ``columns``."""

    def __init__(self, dataset, columns: Iterable[str]):
        self.dataset, self.columns = dataset, tuple(columns)

    def __iter__(self):
        for example in self.dataset:
            yield {k: v for k, v in example.items() if k in self.columns}


def _has_transform(dataset) -> bool:
    """True for a ``datasets.Dataset`` with ``with_transform``/``set_transform``."""
    fmt = getattr(dataset, "format", None)
    return isinstance(fmt, dict) and fmt.get("type") == "custom"


def remove_unused_columns(dataset: Any, model: Any, label_names: Sequence[str] | None = None,
                          logger: logging.Logger = logger, description: str = "training") -> Any:
    """A dataset with only the columns ``model.forward`` accepts plus label columns.

    Works on ``datasets.Dataset`` / ``IterableDataset`` (``remove_columns``; a dataset with a
    transform is filtered after the transform), torch map-style and iterable datasets and lists of
    dicts (filtered per example). The input dataset is not modified. Raises ``ValueError`` listing
    the columns found and the ones expected when no usable column would be left.
    """
    accepted = signature_columns(model, label_names)
    found = column_names(dataset)
    if found is None:
        raise ValueError(f"the {description} dataset is empty: there is no example to read columns from")
    keep = [c for c in found if c in accepted]
    dropped = [c for c in found if c not in accepted]
    if not keep:
        raise ValueError(
            f"no column of the {description} dataset is accepted by {type(_unwrap(model)).__name__}.forward: "
            f"found columns {found}, expected some of {accepted}. Tokenize/transform the data into the model's "
            "inputs, or pass remove_unused_columns=False if a transform or collator builds them."
        )
    if not dropped:
        return dataset
    _log_dropped_once(logger, description, type(_unwrap(model)).__name__, dropped)
    return _drop(dataset, keep, dropped)


def _log_dropped_once(logger, description, model_name, dropped):
    key = (description, model_name, tuple(dropped))
    if key in _already_logged:
        return
    _already_logged.add(key)
    logger.info(
        "The following columns in the %s set don't have a corresponding argument in `%s.forward` and have "
        "been ignored: %s. If they are needed (e.g. by a transform), set remove_unused_columns=False.",
        description, model_name, ", ".join(dropped))


def _drop(dataset, keep, dropped):
    ds = _hf_datasets()
    if ds is not None and isinstance(dataset, ds.Dataset):
        if _has_transform(dataset):
            return ColumnFilteredDataset(dataset, keep)
        return dataset.remove_columns(dropped)
    if ds is not None and isinstance(dataset, ds.IterableDataset):
        return dataset.remove_columns(dropped)
    if isinstance(dataset, tud.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return ColumnFilteredIterable(dataset, keep)
    return ColumnFilteredDataset(dataset, keep)
