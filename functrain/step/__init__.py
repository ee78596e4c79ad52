"""Pure steps over a TrainState: batch checks, the train and eval steps, activation
recomputation, populations (vmap) and per-example gradients. Imports only ``functrain.core``."""

from functrain.step.compile import compile_step
from functrain.step.grads import WindowGrads, make_grad_fn
from functrain.step.recompute import checkpoint_modules, uncheckpoint_modules
from functrain.step.train import make_eval_step, make_train_step
from functrain.step.update import apply_update, keep_if_finite, unscale_grads

__all__ = ["WindowGrads", "apply_update", "checkpoint_modules", "compile_step", "keep_if_finite", "make_eval_step", "make_grad_fn",
           "make_train_step", "uncheckpoint_modules", "unscale_grads"]
