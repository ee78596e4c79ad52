"""End-to-end Trainer tests on a tiny MLP (CPU, fp32)."""

import json
import os
import signal

import pytest
import torch

from functrain.io import checkpoint as ck
from functrain.trainer.callbacks import EarlyStoppingCallback, TrainerCallback
from functrain.trainer.trainer import Trainer
from functrain.trainer.args import TrainingArguments

from _trainer_fixtures import make_dataset, make_model, params_of

pytest.importorskip("functrain.step")
pytest.importorskip("functrain.data")


def _args(out, **kw):
    base = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=3,
                learning_rate=5e-2, weight_decay=0.01, warmup_steps=2, logging_steps=2, save_strategy="steps",
                save_steps=1, report_to="none", disable_tqdm=True, seed=7)
    base.update(kw)
    return TrainingArguments(str(out), **base)


def _trainer(out, callbacks=None, **kw):
    return Trainer(model=make_model(), args=_args(out, **kw), train_dataset=make_dataset(),
                   callbacks=callbacks)


class StopAt(TrainerCallback):
    def __init__(self, step, sig=None):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kw):
        # Sent while step k+1 is about to run: the trainer must finish it, save, and return.
        if self.sig is not None and state.global_step == self.step - 1:
            os.kill(os.getpid(), self.sig)

    def on_step_end(self, args, state, control, **kw):
        if self.sig is None and state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    t = _trainer(out)
    result = t.train()
    return out, result, params_of(t), t


def test_train_returns_hf_metrics(reference):
    out, result, _, t = reference
    # 22 examples, windows of 6 -> 4 steps per epoch (the last window has 4 rows), 3 epochs
    assert result.global_step == 12 and t.state.max_steps == 12
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch"):
        assert key in result.metrics
    assert result.metrics["epoch"] == 3.0
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert result.training_loss == pytest.approx(result.metrics["train_loss"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in ck.checkpoint_dirs(str(out))] == list(range(1, 13))


@pytest.mark.parametrize("k", [1, 5, 7])
def test_interrupt_and_resume_is_bitwise_equal(reference, tmp_path, k):
    _, ref_result, ref_params, _ = reference
    first = _trainer(tmp_path, callbacks=[StopAt(k)])
    assert first.train().global_step == k
    second = _trainer(tmp_path)
    result = second.train(resume_from_checkpoint=True)
    assert result.global_step == 12
    got = params_of(second)
    assert all(torch.equal(got[n], ref_params[n]) for n in ref_params)
    assert [h.get("loss") for h in second.state.log_history if "loss" in h] == \
        [h.get("loss") for h in reference[3].state.log_history if "loss" in h]


def test_sigterm_finishes_step_saves_and_resumes(reference, tmp_path):
    _, _, ref_params, _ = reference
    previous = signal.getsignal(signal.SIGTERM)
    first = _trainer(tmp_path, save_strategy="no", callbacks=[StopAt(4, signal.SIGTERM)])
    result = first.train()
    assert first.interrupted == signal.SIGTERM and result.global_step == 4
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert [s for s, _ in ck.checkpoint_dirs(str(tmp_path))] == [4]
    second = _trainer(tmp_path, save_strategy="no")
    second.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-4"))
    assert all(torch.equal(params_of(second)[n], ref_params[n]) for n in ref_params)


def test_explicit_corrupted_checkpoint_is_clear_error(reference, tmp_path):
    import shutil

    src = os.path.join(reference[0], "checkpoint-3")
    dst = tmp_path / "checkpoint-3"
    shutil.copytree(src, dst)
    with open(dst / ck.STATE_FILE, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ck.CheckpointError, match="checksum"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(dst))


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def _add(self, name, state):
        self.events.append((name, state.global_step))

    def on_train_begin(self, args, state, control, **kw): self._add("train_begin", state)
    def on_epoch_begin(self, args, state, control, **kw): self._add("epoch_begin", state)
    def on_epoch_end(self, args, state, control, **kw): self._add("epoch_end", state)
    def on_log(self, args, state, control, logs=None, **kw):
        self._add("log_eval" if "eval_loss" in logs else "log_train" if "train_runtime" in logs else "log", state)
    def on_evaluate(self, args, state, control, **kw): self._add("evaluate", state)
    def on_save(self, args, state, control, **kw): self._add("save", state)
    def on_train_end(self, args, state, control, **kw): self._add("train_end", state)


def test_cadence_events_in_order(tmp_path):
    rec = Recorder()
    t = Trainer(model=make_model(), args=_args(tmp_path, num_train_epochs=2, logging_steps=3, save_steps=5,
                                               eval_strategy="epoch"),
                train_dataset=make_dataset(), eval_dataset=make_dataset(n=7, seed=3), callbacks=[rec])
    t.train()
    assert rec.events == [
        ("train_begin", 0), ("epoch_begin", 0), ("log", 3),
        ("epoch_end", 4), ("log_eval", 4), ("evaluate", 4),
        ("epoch_begin", 4), ("save", 5), ("log", 6),
        ("save", 8),  # the last step always saves
        ("epoch_end", 8), ("log_eval", 8), ("evaluate", 8),
        ("log_train", 8), ("train_end", 8),
    ]


def _scripted_metrics(values):
    calls = iter(values)

    def compute_metrics(pred):
        return {"score": next(calls)}

    return compute_metrics


def test_early_stopping_and_best_checkpoint_kept(tmp_path):
    scores = [0.1, 0.5, 0.3, 0.4, 0.2, 0.45, 0.9]
    t = Trainer(model=make_model(), args=_args(tmp_path, num_train_epochs=5, eval_strategy="steps", eval_steps=1,
                                               save_steps=1, save_total_limit=1, load_best_model_at_end=True,
                                               metric_for_best_model="score"),
                train_dataset=make_dataset(), eval_dataset=make_dataset(n=5, seed=3),
                compute_metrics=_scripted_metrics(scores), callbacks=[EarlyStoppingCallback(3)])
    result = t.train()
    # best 0.5 at step 2; steps 3, 4, 5 do not improve -> stop at step 5
    assert result.global_step == 5
    assert t.state.best_metric == 0.5 and t.state.best_global_step == 2
    assert [s for s, _ in ck.checkpoint_dirs(str(tmp_path))] == [2, 5]
    assert t.state.best_model_checkpoint == ck.checkpoint_path(str(tmp_path), 2)
    best = make_model()
    ck.load_model_weights(best, t.state.best_model_checkpoint)
    assert all(torch.equal(best.state_dict()[n], v) for n, v in params_of(t).items())  # best loaded at end


def test_optimizer_checks(tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="functrain.optim GradientTransformation"):
        Trainer(model=model, args=_args(tmp_path), train_dataset=make_dataset(),
                optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        Trainer(model=model, args=_args(tmp_path, eval_strategy="epoch"), train_dataset=make_dataset())


def test_custom_optimizer_and_evaluate_predict(tmp_path):
    import functrain as ft

    t = Trainer(model=make_model(), args=_args(tmp_path, save_strategy="no", max_steps=3),
                train_dataset=make_dataset(), eval_dataset=make_dataset(n=7, seed=3),
                optimizers=(ft.optim.sgd(0.1), None),
                compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    before = params_of(t)
    t.train()
    assert any(not torch.equal(before[n], v) for n, v in params_of(t).items())
    metrics = t.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_runtime"} <= set(metrics)
    pred = t.predict(make_dataset(n=7, seed=3))
    assert pred.predictions.shape == (7, 3) and pred.label_ids.shape == (7,)
    assert pred.metrics["test_loss"] == pytest.approx(metrics["eval_loss"])


def test_a_model_on_the_meta_device_is_refused_outside_sharded_runs(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device.*not sharded across ranks.*model_init"):
        Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none"))
