"""Label smoothing as transformers' ``LabelSmoother`` (``label_smoothing_factor``), as a loss function.

``(1 - eps) * nll + eps * mean_over_classes(-log_softmax)``, both averaged over the supervised
(``labels != -100``) positions of the microbatch; the train step weights microbatches by their
supervised items, which gives transformers' normalization over the whole accumulation window.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from functrain.step.batch import IGNORE_INDEX


def label_smoothed_loss(outputs, labels: torch.Tensor, epsilon: float, shift_labels: bool = False) -> torch.Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if shift_labels:  # causal LMs predict the next token
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    log_probs = -nn.functional.log_softmax(logits, dim=-1)
    if labels.dim() == log_probs.dim() - 1:
        labels = labels.unsqueeze(-1)
    padding = labels.eq(IGNORE_INDEX)
    nll = log_probs.gather(dim=-1, index=labels.clamp(min=0)).masked_fill(padding, 0.0)
    smoothed = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32).masked_fill(padding, 0.0)
    active = padding.numel() - padding.long().sum()
    return (1 - epsilon) * nll.sum() / active + epsilon * smoothed.sum() / (active * log_probs.shape[-1])
