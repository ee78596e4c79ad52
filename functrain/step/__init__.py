"""Pure steps over a TrainState: batch checks, the train and eval steps, activation
recomputation, populations (vmap) and per-example gradients. Imports only ``functrain.core``."""

from functrain.step.recompute import checkpoint_modules, uncheckpoint_modules
from functrain.step.train import make_eval_step, make_train_step

__all__ = ["checkpoint_modules", "make_eval_step", "make_train_step", "uncheckpoint_modules"]
