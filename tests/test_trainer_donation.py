"""The Trainer donates its state: the module's tensors are the state's params (one copy of params
and optimizer state), current after every step, and training gives the same numbers as without
donation (bitwise), also across a resume."""

import pytest
import torch

import functrain as ft
from functrain import Trainer, TrainerCallback, TrainingArguments
from _trainer_fixtures import make_dataset, make_model, params_of

train_module = __import__("functrain.step.train", fromlist=["make_train_step"])


def _args(tmp_path, name, **kw):
    base = dict(per_device_train_batch_size=4, max_steps=6, save_strategy="no", report_to="none", logging_steps=1,
                learning_rate=1e-2, weight_decay=0.1, disable_tqdm=True, seed=3)
    return TrainingArguments(str(tmp_path / name), **{**base, **kw})


class StorageProbe(TrainerCallback):
    """At every step end: is each module parameter the state's tensor, and did it change?"""

    def __init__(self):
        self.shared, self.changed, self.previous = [], [], None
        self.old_state = None

    def on_step_end(self, args, state, control, model=None, train_state=None, **kw):
        params = dict(model.named_parameters())
        self.shared.append(all(params[k].data_ptr() == v.data_ptr() for k, v in train_state.params.items()))
        now = {k: p.detach().clone() for k, p in params.items()}
        if self.previous is not None:
            self.changed.append(any(not torch.equal(now[k], self.previous[k]) for k in now))
        self.previous = now
        if self.old_state is None:
            self.old_state = train_state  # the first step's output: donated to the second step


def _undonated(monkeypatch):
    monkeypatch.setattr(Trainer, "_donates", lambda self: False)


def test_module_is_the_state_storage_and_current_after_every_step(tmp_path, monkeypatch):
    # Donated eager AdamW runs torch's fused kernel (float rounding from the chain; its own tests are
    # tests/test_step_fused_adamw.py): compare donation alone here, bitwise, through the same chain.
    monkeypatch.setattr(train_module, "fused_adamw_of", lambda tx: None)
    probe = StorageProbe()
    trainer = Trainer(make_model(), _args(tmp_path, "donated"), train_dataset=make_dataset(), callbacks=[probe])
    trainer.train()
    assert probe.shared == [True] * 6 and probe.changed == [True] * 5
    donated, donated_logs = params_of(trainer), [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with pytest.raises(ft.ConsumedStateError):  # a state kept from an earlier step is not read stale
        probe.old_state.params  # noqa: B018
    _undonated(monkeypatch)
    reference = Trainer(make_model(), _args(tmp_path, "pure"), train_dataset=make_dataset())
    reference.train()
    ref_logs = [h["loss"] for h in reference.state.log_history if "loss" in h]
    assert donated_logs == ref_logs
    assert all(torch.equal(donated[k], v) for k, v in params_of(reference).items())


def test_resume_keeps_the_module_as_storage_and_is_exact(tmp_path):
    full = Trainer(make_model(), _args(tmp_path, "full", save_strategy="steps", save_steps=3),
                   train_dataset=make_dataset())
    full.train()
    probe = StorageProbe()
    resumed = Trainer(make_model(seed=9), _args(tmp_path, "resumed"), train_dataset=make_dataset(), callbacks=[probe])
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert probe.shared == [True] * 3
    assert all(torch.equal(params_of(resumed)[k], v) for k, v in params_of(full).items())


def test_eval_and_save_model_see_the_current_weights(tmp_path):
    seen = []

    class EvalProbe(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
            seen.append((metrics["eval_loss"], {k: v.detach().clone() for k, v in model.state_dict().items()}))

    data = make_dataset()
    trainer = Trainer(make_model(), _args(tmp_path, "eval", eval_strategy="steps", eval_steps=3),
                      train_dataset=data, eval_dataset=data[:8], callbacks=[EvalProbe()])
    trainer.train()
    for loss, weights in seen:  # the eval loss is the loss of the module's weights at that moment
        check = make_model()
        check.load_state_dict(weights)
        check.eval()
        with torch.no_grad():
            x = torch.stack([r["x"] for r in data[:8]])
            y = torch.tensor([r["labels"] for r in data[:8]])
            expected = float(check(x, y)["loss"])
        assert abs(loss - expected) <= 1e-6
    trainer.save_model(str(tmp_path / "saved"))
    loaded = make_model(seed=5)
    ft.io.checkpoint.load_model_weights(loaded, str(tmp_path / "saved"))
    assert all(torch.equal(v, params_of(trainer)[k]) for k, v in loaded.state_dict().items())
