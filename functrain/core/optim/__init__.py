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
    FactoredState,
    ScaleByAdafactorStepState,
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByLionState,
    ScaleByRmsState,
    ScaleByRssState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adafactor_step,
    scale_by_adam,
    scale_by_factored_rms,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_rms,
    scale_by_rss,
    scale_by_schedule,
    scale_by_stddev,
    trace,
)
from .combine import (
    ApplyIfFiniteState,
    InjectHyperparamsState,
    MaskedState,
    PartitionState,
    apply_if_finite,
    inject_hyperparams,
    masked,
    multi_transform,
    partition,
)
from .aliases import adafactor, adagrad, adam, adamw, lion, rmsprop, sgd
from .masks import decay_parameter_names, default_weight_decay_mask

