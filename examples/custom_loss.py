"""A custom loss two ways: a Trainer subclass overriding ``compute_loss``, and a ``loss_fn`` in a hand loop.

    python examples/custom_loss.py            # a few seconds
    python examples/custom_loss.py --quick    # fewer steps

What it shows: on an imbalanced 3-class problem (70% / 20% / 10%), a class-weighted cross
entropy (weights 1, 2, 3, as in the transformers docs) is the loss that gets optimized.

1. ``WeightedLossTrainer(Trainer)`` overrides ``compute_loss`` exactly as one would with
   transformers. functrain runs the override *inside* the pure step, with the state's parameters
   bound to ``model``, so it is also what evaluation reports as ``eval_loss``.
2. The same loss as a plain function ``loss_fn(model, batch) -> loss`` given to
   ``make_train_step``, in a hand loop with no Trainer.

The loss must be the mean over the batch's items (here the weighted mean, as
``nn.CrossEntropyLoss(weight=...)`` computes it).
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from torch import nn

import functrain as ft
from functrain import Trainer, TrainingArguments

CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 3.0])
CLASS_FREQUENCIES = (0.7, 0.2, 0.1)


class MLPClassifier(nn.Module):
    """``forward(features, labels=None) -> {"logits", "loss"?}``, shaped like a transformers model."""

    def __init__(self, dim: int = 8, hidden: int = 32, num_labels: int = 3):
        super().__init__()
        self.num_labels = num_labels
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_labels))

    def forward(self, features, labels=None):
        logits = self.net(features)
        out = {"logits": logits}
        if labels is not None:  # the model's own (unweighted) loss, which the custom loss replaces
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def imbalanced_data(n: int, dim: int = 8, seed: int = 0) -> dict:
    """Gaussian clusters, one per class, drawn with CLASS_FREQUENCIES."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor(CLASS_FREQUENCIES), n, replacement=True, generator=g)
    centers = torch.randn(len(CLASS_FREQUENCIES), dim, generator=torch.Generator().manual_seed(1234))
    features = centers[labels] + 1.5 * torch.randn(n, dim, generator=g)
    return {"features": features, "labels": labels}


def as_dataset(data: dict) -> Dataset:
    return Dataset.from_dict({k: v.tolist() for k, v in data.items()}).with_format("torch")


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, weight=CLASS_WEIGHTS.to(logits.device))


# -- 1. the Trainer way: override compute_loss ---------------------------------------------------


class WeightedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = weighted_cross_entropy(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss


def train_with_trainer(output_dir: str, steps: int, batch_size: int = 64, seed: int = 0) -> WeightedLossTrainer:
    train_ds = as_dataset(imbalanced_data(1024, seed=seed))
    torch.manual_seed(seed)
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, seed=seed)
    trainer = WeightedLossTrainer(model=MLPClassifier(), args=args, train_dataset=train_ds)
    trainer.train()
    return trainer


# -- 2. the hand-loop way: a loss_fn for make_train_step -----------------------------------------


def weighted_loss_fn(model, batch):
    """``loss_fn(model, batch) -> loss``: ``model`` has the state's params bound inside the step."""
    logits = model(features=batch["features"])["logits"]
    return weighted_cross_entropy(logits, batch["labels"])


def train_by_hand(steps: int, batch_size: int = 64, seed: int = 0, tx=None):
    torch.manual_seed(seed)
    model = MLPClassifier()
    tx = tx if tx is not None else ft.optim.adamw(1e-2, weight_decay=0.0)
    state = ft.TrainState.create(model, tx, seed=seed, copy=True)
    train_step = ft.make_train_step(model, tx, weighted_loss_fn)
    data = imbalanced_data(batch_size * steps, seed=seed)
    losses = []
    for i in range(steps):
        batch = {k: v[i * batch_size:(i + 1) * batch_size] for k, v in data.items()}
        state, metrics = train_step(state, batch)
        losses.append(metrics["loss"])  # tensors; read them after the loop
    return model, state, [float(x) for x in losses]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/custom_loss")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="20 steps")
    args = p.parse_args(argv)
    steps = 20 if args.quick else args.steps

    trainer = train_with_trainer(args.output_dir, steps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"Trainer + compute_loss override: weighted loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    _, _, hand_losses = train_by_hand(steps)
    print(f"hand loop + loss_fn:             weighted loss {hand_losses[0]:.3f} -> {hand_losses[-1]:.3f}")
    return {"trainer": trainer, "trainer_losses": losses, "hand_losses": hand_losses}


if __name__ == "__main__":
    main()
