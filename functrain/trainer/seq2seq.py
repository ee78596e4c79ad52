"""Seq2SeqTrainer: the Trainer with ``predict_with_generate``, as ``transformers.Seq2SeqTrainer``.

With ``args.predict_with_generate=True``, ``evaluate()`` (when ``compute_metrics`` or
``streaming_metrics`` is set) and ``predict()`` report the ids ``model.generate`` produces instead
of logits; the loss is still the teacher-forced loss of the pure eval step. ``generate`` is a
stateful looping driver, so it runs eagerly on the module with the state's params bound in for the
call (:func:`functrain.trainer.generation.generate_predictions`): the trained params are used without
being copied into the module.

Generation settings, as in transformers: ``generate`` kwargs given to ``evaluate()`` /
``predict()`` win, then ``args.generation_max_length`` / ``args.generation_num_beams``, then the
model's ``generation_config`` (replaced at init by ``args.generation_config`` when given). Generated
ids and labels are right-padded with the pad token to the model generation config's ``max_length``
(default 20), exactly like the HF trainer, so ``predictions`` and ``label_ids`` are the same arrays
``transformers.Seq2SeqTrainer.predict`` returns (across batches they are padded with -100).
"""

from __future__ import annotations

import copy
import os

from functrain.trainer.generation import generate_predictions, pad_to_length, seq2seq_padded_length
from functrain.trainer.trainer import PredictionOutput, Trainer


class Seq2SeqTrainer(Trainer):
    """:class:`~functrain.Trainer` for encoder-decoder models, with ``predict_with_generate``.

    Takes :class:`~functrain.Seq2SeqTrainingArguments` (plain ``TrainingArguments`` work too and
    mean ``predict_with_generate=False``). ``evaluate(..., **gen_kwargs)`` and
    ``predict(..., **gen_kwargs)`` pass extra ``model.generate`` kwargs (``max_length``,
    ``max_new_tokens``, ``num_beams``, ...) for that call.
    """

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=None,
                 streaming_metrics=None, optimizer_cls_and_kwargs=None):
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
                         compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         streaming_metrics=streaming_metrics)
        config = getattr(self.args, "generation_config", None)
        if config is not None:
            self.model.generation_config = self.load_generation_config(config)
        if self.predict_with_generate and not callable(getattr(self.model, "generate", None)):
            raise ValueError(f"predict_with_generate=True needs a model with generate(); "
                             f"{type(self.model).__name__} has none")
        self._gen_kwargs: dict = self._generation_kwargs({})

    @property
    def predict_with_generate(self) -> bool:
        return bool(getattr(self.args, "predict_with_generate", False))

    @staticmethod
    def load_generation_config(config):
        """A ``GenerationConfig`` from ``args.generation_config``: a config (copied), or a path / hub
        name for ``GenerationConfig.from_pretrained``; validated strictly as transformers does."""
        from transformers import GenerationConfig

        if isinstance(config, GenerationConfig):
            config = copy.deepcopy(config)
        elif isinstance(config, dict):
            config = GenerationConfig(**config)
        else:
            path, file_name = os.fspath(config), None
            if os.path.isfile(path):
                path, file_name = os.path.dirname(path), os.path.basename(path)
            config = GenerationConfig.from_pretrained(path, file_name)
        try:
            config.validate(strict=True)
        except ValueError as e:
            raise ValueError(f"args.generation_config is invalid: {e}") from e
        return config

    # -- evaluate / predict with generate kwargs ---------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        """:meth:`Trainer.evaluate`; ``gen_kwargs`` go to ``model.generate`` for this call."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs
                ) -> PredictionOutput:
        """:meth:`Trainer.predict`; with ``predict_with_generate`` the predictions are generated ids."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        """Call kwargs first, then the args' generation_max_length / generation_num_beams (HF order)."""
        kwargs = dict(gen_kwargs)
        max_length = getattr(self.args, "generation_max_length", None)
        if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None and max_length is not None:
            kwargs["max_length"] = max_length
        num_beams = getattr(self.args, "generation_num_beams", None)
        if kwargs.get("num_beams") is None and num_beams is not None:
            kwargs["num_beams"] = num_beams
        return {k: v for k, v in kwargs.items() if v is not None}

    # -- the eval step ---------------------------------------------------------------------------
    def _get_eval_step(self, with_outputs: bool):
        if not (with_outputs and self.predict_with_generate):
            return super()._get_eval_step(with_outputs)
        loss_step = super()._get_eval_step(False)  # teacher-forced loss only, no logits kept

        def generate_eval_step(state, batch):
            result = {}
            has_labels = batch.get("labels") is not None
            if has_labels:
                out = loss_step(state, batch)
                result = {"loss": out["loss"], "num_items": out["num_items"]}
            tokens = generate_predictions(self.model, state, batch, self._gen_kwargs, pad_to_max_length=False)
            pad_id = self._pad_token_id()
            result["outputs"] = pad_to_length(tokens, seq2seq_padded_length(self.model, tokens.shape[-1]), pad_id)
            if has_labels:
                labels = batch["labels"]
                result["labels"] = pad_to_length(labels, seq2seq_padded_length(self.model, labels.shape[-1]), pad_id)
            return result

        return generate_eval_step

    def _pad_token_id(self) -> int:
        """The processing class's pad (or eos) token, else the model config's pad token (HF's rule)."""
        tok = self.processing_class
        if tok is not None and hasattr(tok, "pad_token_id"):
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            if pad is not None:
                return int(pad)
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if pad is None:
            raise ValueError("predict_with_generate pads generated ids with the pad token: set pad_token_id in the "
                             "model's config or pass a processing_class (tokenizer) that has one")
        return int(pad)
