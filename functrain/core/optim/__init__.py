"""Pure, composable optimizers in the style of optax (see :mod:`functrain.optim.base`)."""

from .base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    GradientTransformationExtraArgs,
    chain,
    identity,
    named_chain,
    stateless,
    update_with_extra_args,
    with_extra_args_support,
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
    ScaleByScheduleState,
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
from .adam_family import (
    ScaleByAdaDeltaState,
    ScaleByAdamaxState,
    ScaleByNAdamState,
    ScaleByRAdamState,
    scale_by_adadelta,
    scale_by_adamax,
    scale_by_nadam_torch,
    scale_by_radam,
)
from .trust_ratio import scale_by_trust_ratio, set_to_zero
from .muon import ScaleByMuonState, scale_by_muon
from .plateau import ReduceLROnPlateauState, observe_plateau, plateau_arguments_from_torch, reduce_on_plateau
from .schedule_free import (
    ScheduleFreeState,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
    schedule_free_step,
)
from .prodigy import ProdigyState, prodigy
from .galore import GaLoreAdafactorState, GaLoreAdamState, galore_adafactor, galore_adamw, galore_target_names
from .wrappers import (
    LookaheadState,
    MultiSteps,
    MultiStepsState,
    ParamEmaState,
    lookahead,
    param_ema,
    with_param_ema,
)
from .aliases import (
    adadelta,
    adafactor,
    adagrad,
    adam,
    adamax,
    adamw,
    lamb,
    lars,
    lion,
    muon,
    nadam,
    nadam_torch,
    radam,
    rmsprop,
    sgd,
)
from .masks import decay_parameter_names, default_weight_decay_mask

