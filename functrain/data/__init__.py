"""Data drivers: column handling, collators, deterministic resumable loading."""

from .collators import (
    CollateError,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    DefaultDataCollator,
    default_data_collator,
)
from .columns import remove_unused_columns, signature_columns
from .loader import (
    DataLoaderState,
    LoaderState,
    ResumableLoader,
    check_iterable_requires_max_steps,
    has_length,
)
from .sampler import DeterministicSampler, epoch_permutation, length_grouped_permutation, shard_indices
