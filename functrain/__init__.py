"""functrain: pure, compiled training steps for PyTorch, driven like the Hugging Face Trainer.

Core (pure, no I/O): ``tree``, ``TrainState``, ``optim``, ``schedules``, ``precision``, ``rng``,
``metrics``, ``make_train_step`` / ``make_eval_step``, ``per_example``, ``population``.
Drivers: ``Trainer`` / ``TrainingArguments``, callbacks, checkpoints, ``data``, evaluation,
``distributed``, hyperparameter search.
"""

from . import metrics, optim, per_example, population, precision, rng, schedules, tree
from .checkpointing import checkpoint_modules
from .population import make_population_eval_step, make_population_train_step, stack_states, unstack_state
from .state import ConsumedStateError, TrainState
from .step import make_eval_step, make_train_step

# -- drivers ------------------------------------------------------------------------------------
from . import distributed
from .callbacks import (
    DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback,
    TrainerControl, TrainerState,
)
from .hp_search import BestRun
from .population_trainer import PopulationTrainer
from .seq2seq_trainer import Seq2SeqTrainer
from .trainer import PredictionOutput, TrainOutput, Trainer
from .training_args import Seq2SeqTrainingArguments, TrainingArguments

__version__ = "0.1.0"
