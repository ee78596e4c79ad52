"""What transformers (and hand-written HF-style) and peft models need, written once.

``outputs``: which entry of a model output is the loss, which are predictions, and the label
names a model's forward takes (HF's ``find_labels``). It imports only ``core``, so every layer
above core may use it, the pure step included: it reads Python structure only (keys, signatures,
class names, shapes), never a tensor's value, so it is safe inside a compiled step.
``peft``: a PeftModel's base (whose signature names the inputs), adapter-only saving, the merged
export (populations of adapters: :mod:`functrain.trainer.adapter_population`).
"""

from functrain.adapters.outputs import (
    IGNORE_INDEX, batch_size_of, can_return_loss, find_labels, forward_argument_names, forward_parameters, ignore_keys_of,
    label_names_of, labels_of, loss_of, no_cache_kwargs, predictions_of, split_outputs,
)

__all__ = ["IGNORE_INDEX", "batch_size_of", "can_return_loss", "no_cache_kwargs", "find_labels", "forward_argument_names", "forward_parameters",
           "ignore_keys_of", "label_names_of", "labels_of", "loss_of", "predictions_of", "split_outputs"]
