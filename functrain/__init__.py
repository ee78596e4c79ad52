"""functrain: pure, compiled training steps for PyTorch, driven like the Hugging Face Trainer."""

from . import optim, rng, tree
from .state import ConsumedStateError, TrainState

__version__ = "0.1.0"
from . import precision
from .checkpointing import checkpoint_modules
from .step import make_eval_step, make_train_step
