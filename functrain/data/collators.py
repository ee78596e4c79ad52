"""Data collators: turn a list of examples (dicts) into one batch of tensors.

A collator is any callable ``collate(features: list[dict]) -> dict[str, Tensor]``; the loader only
calls it, so transformers' own collators work as well. These ones need no tokenizer: give the ids
(``pad_token_id``, ``mask_token_id``, ``vocab_size``) directly, or pass a tokenizer and they read
``pad_token_id``, ``padding_side``, ``mask_token_id`` and the special tokens from it. On the same
features they produce the same tensors as transformers' ``DataCollatorWithPadding``,
``DataCollatorForLanguageModeling`` and ``DataCollatorForSeq2Seq`` (the MLM masking draws random
numbers in the same order, so the same generator seed gives the same masks).

``pad_to_multiple_of`` rounds the padded length up so that a compiled step sees a few shapes
instead of one per batch (each new sequence length would otherwise recompile).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch

from functrain.core.metrics import IGNORE_INDEX

LABEL_PAD_TOKEN_ID = IGNORE_INDEX

# Sequence columns the padding collators pad, with the value used to pad them. ``None`` means
# "the pad token id". HF's ``tokenizer.pad`` pads exactly these.
_PADDED_COLUMNS = {
    "input_ids": None,
    "attention_mask": 0,
    "token_type_ids": 0,
    "special_tokens_mask": 1,
}


class CollateError(ValueError):
    """A column could not be turned into a batch tensor (raised with the column's name)."""


# -- helpers shared by every collator ---------------------------------------------------------------


def _as_dicts(features: Sequence[Any]) -> list[Mapping]:
    if len(features) == 0:
        raise CollateError("cannot collate an empty list of examples")
    if isinstance(features[0], Mapping):
        return list(features)
    if hasattr(features[0], "__dict__"):  # dataclass-like examples, as HF accepts
        return [vars(f) for f in features]
    raise CollateError(
        f"examples must be dicts of column -> value, got {type(features[0]).__name__}; "
        "wrap plain token lists as {'input_ids': [...]}"
    )


def _is_text(value: Any) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, bytes)):
        return True
    return False


def _check_tensorable(name: str, value: Any) -> None:
    """Raise a clear error for values no collator can batch (text, images, dicts)."""
    if _is_text(value):
        raise CollateError(
            f"column {name!r} holds text ({type(value).__name__}), which cannot be batched into a "
            "tensor. Tokenize it first, drop the column (remove_unused_columns=True or "
            "dataset.remove_columns), or pass a collator that handles it."
        )
    if isinstance(value, Mapping):
        raise CollateError(f"column {name!r} holds a dict; collators expect tensors, numbers or lists of them")
    if not isinstance(value, (torch.Tensor, np.ndarray, np.generic, int, float, bool, list, tuple)):
        raise CollateError(
            f"column {name!r} holds a {type(value).__name__}, which cannot be batched into a tensor. "
            "Convert it in a transform (e.g. images -> pixel_values) before the collator."
        )


def _length(value: Any):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def stack_column(name: str, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stack one column of equal-shaped values into a tensor; ragged values raise, naming the column."""
    first = values[0]
    _check_tensorable(name, first)
    lengths = {_length(v) for v in values}
    if len(lengths) > 1:
        raise CollateError(
            f"column {name!r} has values of different lengths in one batch ({sorted(map(str, lengths))[:4]}), "
            "and this collator does not pad. Use DataCollatorWithPadding (or "
            "DataCollatorForSeq2Seq for ragged labels), or pad/truncate in preprocessing."
        )
    if isinstance(first, torch.Tensor):
        out = torch.stack(values)
    elif isinstance(first, np.ndarray):
        out = torch.from_numpy(np.stack(values))
    else:
        try:
            out = torch.tensor(values)
        except (ValueError, TypeError) as e:
            raise CollateError(f"column {name!r} could not be converted to a tensor: {e}") from e
    return out if dtype is None else out.to(dtype)


def _label_tensor(values: list) -> torch.Tensor:
    """Class labels: int64 for integers, float32 otherwise (what the HF default collator does).

    The type is decided over the whole batch, not the first example (as HF does), so a float
    label after an int one (1.7 after 1) is never truncated to an int."""
    scalars = [v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 else v for v in values]
    first = scalars[0]
    if any(isinstance(v, (float, np.floating)) for v in scalars):
        return stack_column("labels", values, torch.float)
    if isinstance(first, (int, np.integer)) and not isinstance(first, bool):
        return stack_column("labels", values, torch.long)
    if isinstance(first, (float, np.floating)):
        return stack_column("labels", values, torch.float)
    return stack_column("labels", values)


def default_data_collator(features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Stack every column (no padding). ``label``/``label_ids`` become ``labels``.

    ``None`` values are skipped like in transformers; text, images and ragged lists raise a
    :class:`CollateError` naming the column.
    """
    features = _as_dicts(features)
    first = features[0]
    batch: dict[str, torch.Tensor] = {}
    if first.get("label") is not None:
        batch["labels"] = _label_tensor([f["label"] for f in features])
    elif first.get("label_ids") is not None:
        batch["labels"] = stack_column("label_ids", [f["label_ids"] for f in features], torch.long)
    for name, value in first.items():
        if name in ("label", "label_ids") or value is None:
            continue
        if name == "labels":
            batch[name] = _label_tensor([f[name] for f in features])
        else:
            batch[name] = stack_column(name, [f[name] for f in features])
    return batch


class DefaultDataCollator:
    """Object form of :func:`default_data_collator` (mirrors ``transformers.DefaultDataCollator``)."""

    def __call__(self, features):
        return default_data_collator(features)


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return (n + multiple - 1) // multiple * multiple


def pad_sequences(
    sequences: list, pad_value: int, *, pad_to_multiple_of: int | None = None, padding_side: str = "right",
    name: str = "input_ids", dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Pad a list of 1-d sequences (lists, arrays or tensors) into a ``(batch, length)`` tensor."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    _check_tensorable(name, sequences[0])
    rows = [torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s) for s in sequences]
    if any(r.ndim != 1 for r in rows):
        raise CollateError(f"column {name!r}: padding expects 1-d sequences, got shapes {[tuple(r.shape) for r in rows[:3]]}")
    length = _round_up(max(r.numel() for r in rows), pad_to_multiple_of)
    out = torch.full((len(rows), length), pad_value, dtype=dtype)
    for i, r in enumerate(rows):
        if padding_side == "right":
            out[i, : r.numel()] = r
        else:
            out[i, length - r.numel():] = r
    return out


def _tokenizer_settings(tokenizer, pad_token_id, padding_side):
    """Read pad id / side from a tokenizer when one is given (explicit arguments win)."""
    if tokenizer is None:
        return pad_token_id, padding_side or "right", True
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        if tok_pad is None:
            raise ValueError(
                "the tokenizer has no pad_token_id; set tokenizer.pad_token (e.g. to eos_token) or "
                "pass pad_token_id= to the collator"
            )
        pad_token_id = tok_pad
    padding_side = padding_side or getattr(tokenizer, "padding_side", "right")
    # HF's tokenizer.pad adds attention_mask only when the model takes one.
    wants_mask = "attention_mask" in getattr(tokenizer, "model_input_names", ["attention_mask"])
    return pad_token_id, padding_side, wants_mask


def _split_tokenizer_arg(pad_token_id):
    """Allow ``Collator(tokenizer)`` positionally, as in transformers."""
    if pad_token_id is not None and not isinstance(pad_token_id, (int, np.integer)):
        return None, pad_token_id
    return pad_token_id, None


class DataCollatorWithPadding:
    """Pad ``input_ids`` / ``attention_mask`` / ``token_type_ids`` / ``special_tokens_mask`` to the
    longest example in the batch (rounded up to ``pad_to_multiple_of``); stack the other columns.

    Args:
        pad_token_id: the id used for padding ``input_ids``, or a tokenizer (positional, like HF).
        tokenizer: a transformers tokenizer to read ``pad_token_id`` and ``padding_side`` from.
        pad_to_multiple_of: round the padded length up to a multiple (bounds recompiles).
        padding_side: ``"right"`` (default) or ``"left"``; defaults to the tokenizer's side.
    """

    def __init__(self, pad_token_id=None, *, tokenizer=None, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None):
        pad_token_id, tok = _split_tokenizer_arg(pad_token_id)
        tokenizer = tokenizer or tok
        pad_token_id, self.padding_side, self._add_attention_mask = _tokenizer_settings(
            tokenizer, pad_token_id, padding_side)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def pad(self, features: list[Mapping]) -> dict[str, torch.Tensor]:
        """Pad the sequence columns and stack the rest (no label renaming here)."""
        first = features[0]
        batch: dict[str, torch.Tensor] = {}
        padded_names = [n for n in _PADDED_COLUMNS if n in first]
        for name in padded_names:
            pad_value = self.pad_token_id if _PADDED_COLUMNS[name] is None else _PADDED_COLUMNS[name]
            batch[name] = pad_sequences([f[name] for f in features], pad_value, name=name,
                                        pad_to_multiple_of=self.pad_to_multiple_of, padding_side=self.padding_side)
        if "input_ids" in batch and "attention_mask" not in batch and self._add_attention_mask:
            lengths = [len(f["input_ids"]) for f in features]
            batch["attention_mask"] = pad_sequences([[1] * n for n in lengths], 0, name="attention_mask",
                                                    pad_to_multiple_of=self.pad_to_multiple_of,
                                                    padding_side=self.padding_side)
        rest = [{k: v for k, v in f.items() if k not in _PADDED_COLUMNS} for f in features]
        if rest[0]:
            batch.update(_stack_others(rest))
        return batch

    def __call__(self, features):
        features = _as_dicts(features)
        batch = self.pad(features)
        for old in ("label", "label_ids"):
            if old in batch:
                batch["labels"] = batch.pop(old)
        return batch


def _stack_others(features: list[Mapping]) -> dict[str, torch.Tensor]:
    """Stack the non-padded columns, keeping their names (``label`` stays ``label`` here)."""
    out = {}
    for name, value in features[0].items():
        if value is None:
            continue
        values = [f[name] for f in features]
        out[name] = _label_tensor(values) if name in ("label", "labels") else stack_column(name, values)
    return out


class DataCollatorForLanguageModeling:
    """Batches for language modeling: causal (``mlm=False``) or masked (``mlm=True``).

    Causal: ``labels`` are a copy of the padded ``input_ids`` with padding set to -100 (the model
    shifts them). Masked: each non-special token is selected with probability ``mlm_probability``;
    of the selected, ``mask_replace_prob`` (80%) become ``mask_token_id``, ``random_replace_prob``
    (10%) a random id in ``[0, vocab_size)``, the rest stay; labels are -100 except on selected
    tokens. Examples may be dicts or plain token lists.

    Randomness comes from ``generator`` (a ``torch.Generator``) or a fresh one seeded with ``seed``;
    with neither, the global torch RNG is used (like transformers).
    """

    def __init__(self, pad_token_id=None, *, tokenizer=None, mlm: bool = False, mlm_probability: float = 0.15,
                 mask_token_id: int | None = None, vocab_size: int | None = None,
                 special_token_ids: Sequence[int] | None = None, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None):
        pad_token_id, tok = _split_tokenizer_arg(pad_token_id)
        tokenizer = tokenizer or tok
        self.tokenizer = tokenizer
        self.padder = DataCollatorWithPadding(pad_token_id, tokenizer=tokenizer,
                                              pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side)
        # Causal LM without any pad id: nothing is set to -100 (as in transformers).
        self.pad_token_id = self.padder.pad_token_id if (pad_token_id is not None or tokenizer is not None) else None
        self.mlm = mlm
        self.mlm_probability = float(mlm_probability)
        self.mask_replace_prob = float(mask_replace_prob)
        self.random_replace_prob = float(random_replace_prob)
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("mask_replace_prob + random_replace_prob must not exceed 1")
        if tokenizer is not None:
            mask_token_id = mask_token_id if mask_token_id is not None else getattr(tokenizer, "mask_token_id", None)
            vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self.mask_token_id, self.vocab_size = mask_token_id, vocab_size
        self.special_token_ids = special_token_ids
        if mlm and (mask_token_id is None or vocab_size is None):
            raise ValueError(
                "masked language modeling needs mask_token_id and vocab_size (or a tokenizer with a "
                "mask token); for causal LM pass mlm=False"
            )
        self.generator = generator
        if generator is None and seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def _pad_inputs(self, features):
        if isinstance(features[0], Mapping):
            return self.padder.pad(list(features))
        return {"input_ids": pad_sequences(list(features), self.padder.pad_token_id,
                                           pad_to_multiple_of=self.padder.pad_to_multiple_of,
                                           padding_side=self.padder.padding_side)}

    def __call__(self, features):
        if len(features) == 0:
            raise CollateError("cannot collate an empty list of examples")
        batch = self._pad_inputs(features)
        special = batch.pop("special_tokens_mask", None)
        if self.mlm:
            batch["input_ids"], batch["labels"] = self.mask_tokens(batch["input_ids"], special)
        else:
            labels = batch["input_ids"].clone()
            if self.pad_token_id is not None:
                labels[labels == self.pad_token_id] = LABEL_PAD_TOKEN_ID
            batch["labels"] = labels
        return batch

    def _special_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is not None and self.special_token_ids is None:
            rows = [self.tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                    for r in input_ids.tolist()]
            return torch.tensor(rows, dtype=torch.bool)
        ids = self.special_token_ids
        if ids is None:
            ids = [i for i in (self.pad_token_id, self.mask_token_id) if i is not None]
        return torch.isin(input_ids, torch.tensor(list(ids), dtype=input_ids.dtype))

    def mask_tokens(self, inputs: torch.Tensor, special_tokens_mask=None):
        """``(masked inputs, labels)``; draws in transformers' order so one seed gives one mask."""
        inputs, labels = inputs.clone(), inputs.clone()
        g = self.generator
        probability = torch.full(labels.shape, self.mlm_probability)
        no_mask = special_tokens_mask.bool() if special_tokens_mask is not None else self._special_mask(inputs)
        probability.masked_fill_(no_mask, 0.0)
        selected = torch.bernoulli(probability, generator=g).bool()
        labels[~selected] = LABEL_PAD_TOKEN_ID
        replaced = torch.bernoulli(torch.full(labels.shape, self.mask_replace_prob), generator=g).bool() & selected
        inputs[replaced] = self.mask_token_id
        if self.mask_replace_prob == 1 or self.random_replace_prob == 0:
            return inputs, labels
        scaled = self.random_replace_prob / (1 - self.mask_replace_prob)
        randomized = torch.bernoulli(torch.full(labels.shape, scaled), generator=g).bool() & selected & ~replaced
        random_words = torch.randint(self.vocab_size, labels.shape, dtype=torch.long, generator=g)
        inputs[randomized] = random_words[randomized]
        return inputs, labels


class DataCollatorForSeq2Seq:
    """Pad encoder inputs like :class:`DataCollatorWithPadding` and ``labels`` with
    ``label_pad_token_id`` (-100); when ``model`` has ``prepare_decoder_input_ids_from_labels``
    (T5, BART, ...), add ``decoder_input_ids`` built from the padded labels.
    """

    def __init__(self, pad_token_id=None, *, tokenizer=None, model=None, label_pad_token_id: int = LABEL_PAD_TOKEN_ID,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None):
        pad_token_id, tok = _split_tokenizer_arg(pad_token_id)
        self.padder = DataCollatorWithPadding(pad_token_id, tokenizer=tokenizer or tok,
                                              pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side)
        self.model = model
        self.label_pad_token_id = label_pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        features = _as_dicts(features)
        label_name = "label" if "label" in features[0] else "labels"
        labels = [f.get(label_name) for f in features]
        if all(label is None for label in labels):
            labels = None
        batch = self.padder.pad([{k: v for k, v in f.items() if k != label_name} for f in features])
        if labels is not None:
            batch["labels"] = pad_sequences(labels, self.label_pad_token_id, name=label_name,
                                            pad_to_multiple_of=self.pad_to_multiple_of,
                                            padding_side=self.padder.padding_side)
            prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
            if prepare is not None:
                batch["decoder_input_ids"] = prepare(labels=batch["labels"])
        return batch
