"""``predict_with_generate`` (Seq2SeqTrainer semantics) over a functional state.

``model.generate`` is a stateful, looping driver, so it runs on the module with the state's
tensors swapped in for the module's own for the duration of the call
(``torch.nn.utils.stateless._reparametrize_module``, what ``functional_call`` uses inside): the
module keeps its parameters afterwards and nothing is copied.

Generated ids are padded to the generation ``max_length`` with the pad token (as the
Seq2SeqTrainer does); :func:`functrain.trainer.evaluation.pad_and_concatenate` pads across batches.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.nn.utils.stateless import _reparametrize_module

from functrain.adapters.outputs import find_labels, labels_of


def state_tensors(state: Any) -> dict:
    """``{name: tensor}`` of everything the module needs: a TrainState's params and buffers, or a dict."""
    if isinstance(state, Mapping):
        return dict(state)
    if hasattr(state, "params"):
        return {**state.params, **getattr(state, "buffers", {})}
    raise TypeError(f"state must be a TrainState or a dict of tensors, got {type(state).__name__}")


def generation_kwargs_from_args(generation_max_length: int | None = None, generation_num_beams: int | None = None,
                                generation_config=None, **extra) -> dict:
    """``model.generate`` kwargs as the Seq2SeqTrainer builds them (``None`` values dropped)."""
    kwargs = dict(extra)
    if generation_max_length is not None:
        kwargs["max_length"] = generation_max_length
    if generation_num_beams is not None:
        kwargs["num_beams"] = generation_num_beams
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    return kwargs


def _pad_token_id(model) -> int:
    config = getattr(model, "generation_config", None)
    for source in (config, getattr(model, "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError("cannot pad generated ids: set pad_token_id (or eos_token_id) in the model's config")


def _target_length(model, kwargs: dict) -> int | None:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("max_new_tokens") is not None:
        return None
    if kwargs.get("max_length") is not None:
        return int(kwargs["max_length"])
    if config is not None and getattr(config, "max_new_tokens", None) is None:
        return getattr(config, "max_length", None)
    return None


def generation_inputs(batch: Mapping) -> dict:
    """The batch without labels and without decoder inputs built from labels (the model must
    generate freely rather than continue the padded labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels, dec = batch.get("labels"), batch.get("decoder_input_ids")
    if labels is not None and dec is not None and labels.shape == dec.shape:
        inputs.pop("decoder_input_ids", None)
        inputs.pop("decoder_attention_mask", None)
    return inputs


def generate_predictions(model: torch.nn.Module, state: Any, batch: Mapping, generation_kwargs: dict | None = None,
                         *, pad_to_max_length: bool = True) -> torch.Tensor:
    """Generated ids for ``batch`` with the state's parameters bound into ``model``.

    ``generation_kwargs`` go to ``model.generate`` (``max_length``, ``num_beams``,
    ``generation_config``, ...; see :func:`generation_kwargs_from_args`). Outputs shorter than
    the generation max length are right-padded with the pad token, like the Seq2SeqTrainer.
    """
    kwargs = {k: v for k, v in (generation_kwargs or {}).items() if v is not None}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _reparametrize_module(model, state_tensors(state), tie_weights=True):
            tokens = model.generate(**generation_inputs(batch), **kwargs)
    finally:
        model.train(was_training)
    target = _target_length(model, kwargs) if pad_to_max_length else None
    if target is not None and tokens.shape[-1] < target:
        pad = tokens.new_full((tokens.shape[0], target - tokens.shape[-1]), _pad_token_id(model))
        tokens = torch.cat([tokens, pad], dim=-1)
    return tokens


def make_generate_eval_step(model: torch.nn.Module, eval_step: Callable | None = None,
                            generation_kwargs: dict | None = None) -> Callable:
    """An ``eval_step`` for ``evaluation_loop`` whose ``outputs`` are generated ids.

    The loss (when ``eval_step`` is given and the batch has labels) comes from ``eval_step``'s
    teacher-forced forward; predictions come from ``generate``.
    """

    label_names = find_labels(model)

    def step(state, batch):
        result = {}
        if eval_step is not None and labels_of(batch, label_names) is not None:
            out = eval_step(state, batch)
            result = {"loss": out["loss"], "num_items": out["num_items"]}
        result["outputs"] = generate_predictions(model, state, batch, generation_kwargs)
        return result

    return step


# -- Seq2SeqTrainer padding rule ------------------------------------------------------------------

# transformers' GenerationConfig default max_length (``_get_default_generation_params``).
DEFAULT_MAX_LENGTH = 20


def seq2seq_padded_length(model: torch.nn.Module, length: int) -> int:
    """The width ``transformers.Seq2SeqTrainer.prediction_step`` pads generated ids and labels to.

    It reads the *model's* generation config (not the per-call ``max_length``): shorter than its
    ``max_length`` (default 20) -> ``max_length``; else shorter than ``max_new_tokens + 1`` ->
    that; else unchanged. Matching it keeps ``predictions`` identical to the HF trainer's.
    """
    config = getattr(model, "generation_config", None)
    max_length = getattr(config, "max_length", None)
    max_length = DEFAULT_MAX_LENGTH if max_length is None else int(max_length)
    max_new = getattr(config, "max_new_tokens", None)
    if length < max_length:
        return max_length
    if max_new is not None and length < max_new + 1:
        return int(max_new) + 1
    return length


def pad_to_length(tokens: torch.Tensor, length: int, pad_token_id: int) -> torch.Tensor:
    """Right-pad ``(batch, seq)`` ids to ``length`` with ``pad_token_id`` (no-op when long enough)."""
    if tokens.shape[-1] >= length:
        return tokens
    pad = tokens.new_full((tokens.shape[0], length - tokens.shape[-1]), pad_token_id)
    return torch.cat([tokens, pad], dim=-1)
