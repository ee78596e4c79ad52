"""What some TrainingArguments fields do to the Trainer's pieces (loaders, compiled steps, loggers).

Small pure helpers, so the Trainer reads each field in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch


def loader_options(args) -> dict:
    """``torch.utils.data.DataLoader`` options from the ``dataloader_*`` fields."""
    return dict(num_workers=args.dataloader_num_workers, persistent_workers=args.dataloader_persistent_workers,
                # Pinning only serves host-to-accelerator copies; torch warns about it on CPU.
                pin_memory=args.dataloader_pin_memory and args.device.type != "cpu",
                prefetch_factor=args.dataloader_prefetch_factor,
                multiprocessing_context=args.dataloader_multiprocessing_context, in_order=args.dataloader_in_order)


def group_lengths(dataset, column: str) -> list[int]:
    """Per-example lengths for ``train_sampling_strategy="group_by_length"``, as transformers: the
    ``length_column_name`` column when the dataset has it, else the length of each ``input_ids``."""
    names = getattr(dataset, "column_names", None)
    if names is not None and column in names:
        return [int(n) for n in dataset[column]]
    first = dataset[0]
    if not isinstance(first, Mapping) or ("input_ids" not in first and column not in first):
        raise ValueError(f"train_sampling_strategy='group_by_length' needs a {column!r} column (length_column_name) "
                         "or 'input_ids' in every example to measure lengths")
    if column in first:
        return [int(dataset[i][column]) for i in range(len(dataset))]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def full_eval_params(args, inner=None):
    """The eval step's param transform: ``fp16_full_eval`` / ``bf16_full_eval`` evaluate with the
    floating-point params cast to that dtype (transformers casts the model), after ``inner``."""
    dtype = torch.float16 if args.fp16_full_eval else torch.bfloat16 if args.bf16_full_eval else None
    if dtype is None:
        return inner

    def cast(params):
        params = inner(params) if inner is not None else params
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in params.items()}

    return cast


def compile_kwargs(args) -> dict:
    """``torch.compile`` options from ``torch_compile_backend`` / ``torch_compile_mode``."""
    out = {}
    if args.torch_compile_backend is not None:
        out["backend"] = args.torch_compile_backend
    if args.torch_compile_mode is not None:
        out["mode"] = args.torch_compile_mode
    return out


def set_log_level(args) -> None:
    """``log_level`` (main process) / ``log_level_replica`` (others) on the ``functrain`` logger."""
    name = args.log_level if args.should_log else args.log_level_replica
    if name != "passive":  # passive: leave the logger as the script configured it
        logging.getLogger("functrain").setLevel(args.get_process_log_level())
