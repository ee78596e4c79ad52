"""HF semantics: TrainingArguments, callbacks, Trainer, evaluation, Seq2Seq, populations,
hyperparameter search."""

from functrain.trainer.trainer import PredictionOutput, TrainOutput, Trainer

__all__ = ["PredictionOutput", "TrainOutput", "Trainer"]
