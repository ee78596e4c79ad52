"""Models and data of transformers' tests/trainer/trainer_test_utils.py, for the HF compatibility
suite (tests/test_hf_compat_*.py): hand-written models returning plain tuples, a dict model, a
PreTrainedModel, and the regression data set, rebuilt here (no download, no transformers test
package). ``get_regression_trainer`` builds a functrain Trainer the way HF's helper builds theirs.
"""

import numpy as np
import torch
from torch import nn

from functrain import Trainer, TrainingArguments


class RegressionDataset:
    def __init__(self, a=2, b=3, length=64, seed=42, label_names=None):
        rng = np.random.RandomState(seed)
        self.label_names = ["labels"] if label_names is None else label_names
        self.length = length
        self.x = rng.normal(size=(length,)).astype(np.float32)
        self.ys = [(a * self.x + b + rng.normal(scale=0.1, size=(length,))).astype(np.float32)
                   for _ in self.label_names]

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        result = {name: y[i] for name, y in zip(self.label_names, self.ys)}
        result["input_x"] = self.x[i]
        return result


class SampleIterableDataset(torch.utils.data.IterableDataset):
    def __init__(self, a=2, b=3, length=64, seed=42, label_names=None):
        self.dataset = RegressionDataset(a=a, b=b, length=length, seed=seed, label_names=label_names)

    def __iter__(self):
        for i in range(len(self.dataset)):
            yield self.dataset[i]


class AlmostAccuracy:
    def __init__(self, thresh=0.25):
        self.thresh = thresh

    def __call__(self, eval_pred):
        predictions, labels = eval_pred
        true = np.abs(predictions - labels) <= self.thresh
        return {"accuracy": true.astype(np.float32).mean().item()}


class AlmostAccuracyBatched:
    def __init__(self, thresh=0.25):
        self.thresh = thresh
        self.batch_acc = []

    def __call__(self, eval_pred, compute_result):
        predictions, labels = eval_pred
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        if isinstance(labels, tuple):
            labels = labels[0]
        true = torch.abs(predictions - labels) <= self.thresh
        self.batch_acc.extend([true.float().mean().item()] * len(predictions))
        if compute_result:
            result = {"accuracy": float(np.mean(self.batch_acc))}
            self.batch_acc = []
            return result
        return None


class RegressionModel(nn.Module):
    """Returns ``(loss, y)`` / ``(loss, y, y)`` with labels, ``(y,)`` / ``(y, y)`` without: a tuple."""

    def __init__(self, a=0, b=0, double_output=False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a).float())
        self.b = nn.Parameter(torch.tensor(b).float())
        self.double_output = double_output
        self.config = None

    def forward(self, input_x, labels=None, **kwargs):
        y = input_x * self.a + self.b
        if labels is None:
            return (y, y) if self.double_output else (y,)
        loss = nn.functional.mse_loss(y, labels)
        return (loss, y, y) if self.double_output else (loss, y)


class RegressionDictModel(nn.Module):
    def __init__(self, a=0, b=0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a).float())
        self.b = nn.Parameter(torch.tensor(b).float())
        self.config = None

    def forward(self, input_x, labels=None, **kwargs):
        y = input_x * self.a + self.b
        result = {"output": y}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(y, labels)
        return result


def regression_pretrained_model(a=0, b=0, double_output=False):
    """HF's RegressionPreTrainedModel: a ``PreTrainedModel`` returning tuples (built on demand, so
    importing this module does not need transformers)."""
    import transformers

    class RegressionModelConfig(transformers.PretrainedConfig):
        def __init__(self, a=0, b=0, double_output=False, **kwargs):
            super().__init__(**kwargs)
            self.a, self.b, self.double_output, self.hidden_size = a, b, double_output, 1

    class RegressionPreTrainedModel(transformers.PreTrainedModel):
        config_class = RegressionModelConfig
        base_model_prefix = "regression"

        def __init__(self, config):
            super().__init__(config)
            self.a = nn.Parameter(torch.as_tensor(config.a).float())
            self.b = nn.Parameter(torch.as_tensor(config.b).float())
            self.double_output = config.double_output
            self.post_init()

        def forward(self, input_x, labels=None, **kwargs):
            y = input_x * self.a + self.b
            if labels is None:
                return (y, y) if self.double_output else (y,)
            loss = nn.functional.mse_loss(y, labels)
            return (loss, y, y) if self.double_output else (loss, y)

    return RegressionPreTrainedModel(RegressionModelConfig(a=a, b=b, double_output=double_output))


def get_regression_trainer(a=0, b=0, double_output=False, train_len=64, eval_len=64, output_dir=None,
                           model=None, trainer_class=Trainer, **kwargs):
    """Like HF's helper: RegressionModel (tuple outputs) on RegressionDataset; other kwargs split into
    Trainer arguments and TrainingArguments fields."""
    label_names = kwargs.get("label_names")
    train_dataset = RegressionDataset(length=train_len, label_names=label_names)
    eval_dataset = RegressionDataset(length=eval_len, label_names=label_names)
    model_init = kwargs.pop("model_init", None)
    if model is None and model_init is None:
        model = RegressionModel(a, b, double_output)
    trainer_keys = ("compute_metrics", "preprocess_logits_for_metrics", "callbacks", "data_collator",
                    "compute_loss_func")
    trainer_kwargs = {k: kwargs.pop(k) for k in trainer_keys if k in kwargs}
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("disable_tqdm", True)
    args = TrainingArguments(output_dir, **kwargs)
    return trainer_class(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, model_init=model_init,
                         **trainer_kwargs)
