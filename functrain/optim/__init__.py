"""Pure, composable optimizers in the style of optax (see :mod:`functrain.optim.base`)."""

from .base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    identity,
    stateless,
)
from .transforms import (
    ClipByGlobalNormState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_schedule,
    trace,
)
from .aliases import adam, adamw, sgd

momentum = trace
