"""functrain: pure, compiled training steps for PyTorch, driven like the Hugging Face Trainer.

Layers (imports point down only):
  ``core/``      tree, rng, TrainState, precision, metrics, schedules, optim   (pure, no I/O)
  ``step/``      the train and eval steps, recomputation, populations, per-example gradients
  ``data/``, ``io/``, ``parallel/``   loaders and collators; checkpoints and plots; launch and sharding
  ``runner/``    the training loop for any pure step (``run``) and its hooks
  ``trainer/``   HF semantics: TrainingArguments, callbacks, Trainer, evaluation, Seq2Seq, search
The names below are the public ones; ``functrain.optim`` and ``functrain.schedules`` are
importable paths too.
"""

from functrain import optim, schedules
from functrain.core import flat, metrics, precision, rng, tree
from functrain.core.state import ConsumedStateError, TrainState
from functrain.step import per_example, population
from functrain.step.population import make_population_eval_step, make_population_train_step, stack_states, unstack_state
from functrain.step.recompute import checkpoint_modules
from functrain.step.train import make_eval_step, make_train_step

# -- drivers ------------------------------------------------------------------------------------
from functrain.parallel import distributed
from functrain import runner
from functrain.runner import run
from functrain.trainer.args import Seq2SeqTrainingArguments, TrainingArguments
from functrain.trainer.callbacks import (
    DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback,
    TrainerControl, TrainerState,
)
from functrain.trainer.hp_search import BestRun
from functrain.trainer.population import PopulationTrainer
from functrain.trainer.seq2seq import Seq2SeqTrainer
from functrain.trainer.trainer import PredictionOutput, TrainOutput, Trainer

__version__ = "0.1.0"
