"""A subclass overriding a transformers.Trainer method that functrain's Trainer never calls is
refused at construction (the override would be silently ignored); the override points it does call
(compute_loss, training_step, prediction_step, create_optimizer, ...) keep working."""

import pytest
import torch

import functrain
from functrain.trainer import registry
from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model


def _args(tmp_path, **kw):
    return TrainingArguments(str(tmp_path), report_to="none", disable_tqdm=True, save_strategy="no", **kw)


@pytest.mark.parametrize("name, what", [
    ("_get_train_sampler", "get_train_dataloader"),
    ("get_optimizer_group", "optimizer_cls_and_kwargs"),
    ("compute_loss_context_manager", "precision policy"),
    ("_maybe_log_save_evaluate", "TrainerCallback"),
    ("_save", "on_save"),
    ("evaluation_loop", "prediction_step"),
])
def test_an_override_functrain_never_calls_is_refused(tmp_path, name, what):
    Sub = type("MyTrainer", (Trainer,), {name: lambda self, *a, **k: None})
    with pytest.raises(TypeError, match=rf"MyTrainer\.{name} overrides transformers\.Trainer\.{name}.*{what}"):
        Sub(model=make_model(), args=_args(tmp_path), train_dataset=make_dataset())
    Deeper = type("Deeper", (Sub,), {})  # inherited from a user's base class: refused too
    with pytest.raises(TypeError, match=rf"MyTrainer\.{name}"):
        Deeper(model=make_model(), args=_args(tmp_path), train_dataset=make_dataset())


def test_the_table_names_only_methods_functrain_lacks():
    transformers = pytest.importorskip("transformers")
    for name in registry.HF_METHODS_NOT_CALLED:
        assert not hasattr(Trainer, name), name  # one functrain has is an override point it calls
        assert hasattr(transformers.Trainer, name), name  # and each is an HF method


def test_an_hf_style_create_optimizer_override_gets_a_clear_error(tmp_path):
    class HFStyle(Trainer):
        def create_optimizer(self):  # HF's signature, returning a torch optimizer
            self.optimizer = torch.optim.AdamW(self.model.parameters())
            return self.optimizer

    with pytest.raises(TypeError, match="create_optimizer returned a torch.optim.AdamW.*functrain.optim"):
        HFStyle(model=make_model(), args=_args(tmp_path, max_steps=2), train_dataset=make_dataset()).train()

    class Pure(Trainer):
        def create_optimizer(self):  # HF's signature, returning a functrain optimizer: used
            return functrain.optim.sgd(0.0)

    trainer = Pure(model=make_model(p=0.0), args=_args(tmp_path, max_steps=2), train_dataset=make_dataset())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # lr 0: nothing moved
