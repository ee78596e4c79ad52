"""Pieces of the Hugging Face ``Trainer`` surface that map onto functrain's driver.

* :class:`IterableBatches`: a subclass's ``get_train_dataloader()`` may return any iterable of
  batches (a ``torch.utils.data.DataLoader``, a list, a generator factory, ...). The Trainer reads
  the resumable-loader interface (``iter_from(epoch, batch_index)``, ``state``); this gives it to
  a plain iterable. Resume then re-iterates the iterable and skips the batches already trained
  on: exact only when the iterable yields the same batches in the same order each time it is
  iterated (set your sampler's seed per epoch yourself), and it costs the skipped batches' loading.
* :func:`optimizer_events`: the callback events HF fires around one optimizer step, in HF's order.
* :func:`floating_point_ops`: HF's FLOP estimate of one forward + backward.
* :func:`restore_callbacks`: stateful callbacks (``ExportableState``) from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator

from functrain.data.loader import LoaderState


class IterableBatches:
    """Give a plain iterable of batches the loader interface the Trainer's loop reads."""

    is_iterable = False

    def __init__(self, batches: Iterable):
        if not hasattr(batches, "__iter__"):
            raise TypeError(f"get_train_dataloader() must return an iterable of batches, got {type(batches).__name__}")
        self.batches = batches
        self.dataset = getattr(batches, "dataset", None)
        self.state = LoaderState()
        if not hasattr(batches, "__len__"):
            self.is_iterable = True  # the run needs max_steps

    def __len__(self) -> int:
        return len(self.batches)

    def iter_from(self, epoch: int, batch_index: int = 0) -> Iterator:
        set_epoch = getattr(getattr(self.batches, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self.state = LoaderState(epoch=epoch, batch_index=batch_index)
        for i, batch in enumerate(self.batches):
            if i < batch_index:
                continue  # replayed to reach the resume position
            self.state = LoaderState(epoch=epoch, batch_index=i + 1)
            yield batch
        self.state = LoaderState(epoch=epoch + 1, batch_index=0)


def as_train_loader(loader: Any):
    """The Trainer's loader for what ``get_train_dataloader()`` returned."""
    return loader if hasattr(loader, "iter_from") and hasattr(loader, "state") else IterableBatches(loader)


def optimizer_events(handler, args, state, control, microbatches: int):
    """HF's events of one optimizer step after the step ran: ``on_substep_end`` for each microbatch
    but the last, then ``on_pre_optimizer_step`` and ``on_optimizer_step``. The pure step runs the
    microbatches and the update in one call, so the events come after it (gradients are not kept
    on the model for callbacks to read)."""
    for _ in range(microbatches - 1):
        control = handler.on_substep_end(args, state, control)
    control = handler.on_pre_optimizer_step(args, state, control)
    return handler.on_optimizer_step(args, state, control)


def floating_point_ops(model: Any, inputs: Any, parameters: int | None = None) -> int:
    """HF's estimate: ``6 * tokens * non-embedding parameters`` for models with ``num_parameters``
    (transformers models), 0 otherwise (as HF; override ``Trainer.floating_point_ops`` for others).
    ``parameters``: that count, when the caller has it already."""
    main_input = getattr(model, "main_input_name", "input_ids")
    if isinstance(inputs, Mapping) and main_input in inputs and hasattr(model, "num_parameters"):
        if parameters is None:
            parameters = model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * parameters
    return 0


def restore_callbacks(handler, saved: dict, rebuild: bool) -> None:
    """Give the stateful callbacks the state a checkpoint saved (``TrainerState.stateful_callbacks``).

    Their ``attributes`` are always restored, so a resumed run continues as the uninterrupted one
    would (e.g. the early-stopping patience counter); HF restores nothing unless asked. With
    ``rebuild`` (``restore_callback_states_from_checkpoint=True``) each one is rebuilt as HF does:
    a new instance from the saved constructor ``args``, then the attributes, replacing the one
    passed to the Trainer.
    """
    from functrain.trainer.callbacks import ExportableState

    for i, cb in enumerate(list(handler.callbacks)):
        data = saved.get(type(cb).__name__)
        if not isinstance(cb, ExportableState) or data is None:
            continue
        if rebuild:
            cb = type(cb)(**data.get("args", {}))
            handler.callbacks[i] = cb
        cb.restore(data.get("attributes", {}))
