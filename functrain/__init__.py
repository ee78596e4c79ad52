"""functrain: pure, compiled training steps for PyTorch, driven like the Hugging Face Trainer.

Core (pure, no I/O): ``tree``, ``TrainState``, ``optim``, ``schedules``, ``precision``, ``rng``,
``metrics``, ``make_train_step`` / ``make_eval_step``, ``per_example``.
Drivers: ``Trainer`` / ``TrainingArguments``, callbacks, checkpoints, ``data``, evaluation.
"""

from . import metrics, optim, precision, rng, schedules, tree
from .checkpointing import checkpoint_modules
from .state import ConsumedStateError, TrainState
from .step import make_eval_step, make_train_step

# -- drivers ------------------------------------------------------------------------------------
from .training_args import Seq2SeqTrainingArguments, TrainingArguments
from .callbacks import (
    DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback,
    TrainerControl, TrainerState,
)
from .trainer import PredictionOutput, TrainOutput, Trainer

__version__ = "0.1.0"
from . import distributed  # noqa: E402  (init_distributed, data_parallel_hooks, shard_state, ...)
from .seq2seq_trainer import Seq2SeqTrainer  # noqa: E402

# -- populations / hyperparameter search (issue 9) ------------------------------------------------
from . import population
from .hp_search import BestRun
from .population import make_population_eval_step, make_population_train_step, stack_states, unstack_state
from .population_trainer import PopulationTrainer
