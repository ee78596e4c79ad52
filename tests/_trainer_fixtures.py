"""Tiny models and datasets shared by the Trainer tests (no downloads)."""

import torch
from torch import nn


class TinyClassifier(nn.Module):
    """An MLP with dropout; forward(x, labels) -> {"loss", "logits"} like a transformers model."""

    def __init__(self, dim=8, hidden=16, classes=3, p=0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyClassifier(**kw)


def make_dataset(n=22, dim=8, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g)
    y = (x @ w).argmax(-1)
    return [{"x": x[i], "labels": int(y[i]), "unused": "text"} for i in range(n)]


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
