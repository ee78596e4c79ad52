"""functrain: pure, compiled training steps for PyTorch, driven like the Hugging Face Trainer."""

from . import optim, rng, tree
from .state import ConsumedStateError, TrainState

__version__ = "0.1.0"
from . import precision  # noqa: E402
from . import schedules  # noqa: E402

# -- drivers (trainer branch) ---------------------------------------------------------------------
from .training_args import Seq2SeqTrainingArguments, TrainingArguments  # noqa: E402
from .callbacks import (  # noqa: E402
    DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback,
    TrainerControl, TrainerState,
)
from .trainer import PredictionOutput, TrainOutput, Trainer  # noqa: E402
