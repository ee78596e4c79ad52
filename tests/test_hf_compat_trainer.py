"""Behaviours of transformers' Trainer tests (tests/trainer/test_trainer*.py, trainer_test_utils.py),
ported with ``from functrain import ...``: models returning plain tuples and dicts, label names,
predictions and label_ids, batched metrics, include_for_metrics, iterable eval sets, custom
dataloaders, model_init, train metrics and the HF helper methods. Each test names the HF test it
ports; where functrain differs by design, the test asserts functrain's documented behaviour and
says so (README, "Coming from transformers")."""

import numpy as np
import pytest
import torch

from _hf_compat_fixtures import (
    AlmostAccuracy, AlmostAccuracyBatched, RegressionDataset, RegressionDictModel, RegressionModel,
    SampleIterableDataset, get_regression_trainer, regression_pretrained_model,
)
from functrain import Trainer, TrainingArguments


def _expected(dataset, a=1.5, b=2.5):
    x, y = dataset.x, dataset.ys[0]
    pred = a * x + b
    return pred, y, float(((pred - y) ** 2).mean())


# -- test_trainer_evaluation.py: TrainerEvaluationTest ----------------------------------------------


@pytest.mark.parametrize("eval_len", [64, 66])  # 66: not a multiple of the batch size
def test_evaluate(tmp_path, eval_len):
    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=eval_len, compute_metrics=AlmostAccuracy(),
                                     output_dir=tmp_path)
    results = trainer.evaluate()
    pred, y, loss = _expected(trainer.eval_dataset)
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert results["eval_accuracy"] == pytest.approx(AlmostAccuracy()((pred, y))["accuracy"])


def test_evaluate_with_preprocess_logits(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, compute_metrics=AlmostAccuracy(), output_dir=tmp_path,
                                     preprocess_logits_for_metrics=lambda logits, labels: logits + 1)
    results = trainer.evaluate()
    pred, y, loss = _expected(trainer.eval_dataset)
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert results["eval_accuracy"] == pytest.approx(AlmostAccuracy()((pred + 1, y))["accuracy"])


def test_predict(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=66, output_dir=tmp_path)
    preds = trainer.predict(trainer.eval_dataset).predictions
    assert np.allclose(preds, 1.5 * trainer.eval_dataset.x + 2.5)


def test_predict_with_more_than_one_output(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, double_output=True, output_dir=tmp_path)
    preds = trainer.predict(trainer.eval_dataset).predictions
    assert isinstance(preds, tuple) and len(preds) == 2
    assert all(np.allclose(p, 1.5 * trainer.eval_dataset.x + 2.5) for p in preds)


def test_predict_with_more_than_one_output_and_label(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, double_output=True, label_names=["labels", "labels_2"],
                                     output_dir=tmp_path)
    out = trainer.predict(trainer.eval_dataset)
    assert len(out.predictions) == 2
    assert isinstance(out.label_ids, tuple) and len(out.label_ids) == 2
    assert np.array_equal(out.label_ids[0], trainer.eval_dataset.ys[0])
    assert np.array_equal(out.label_ids[1], trainer.eval_dataset.ys[1])
    assert "test_loss" in out.metrics


def test_train_and_predict_loss_parity(tmp_path):
    """training_step and prediction_step give the same loss on the same inputs (HF's check with a
    compute_loss_func). functrain's training_step returns the loss undetached (the pure step
    differentiates it) instead of running backward."""
    model = RegressionModel(a=1.5, b=2.5)

    def loss_func(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.l1_loss(outputs[0], labels)

    trainer = Trainer(model, TrainingArguments(str(tmp_path), report_to="none"), compute_loss_func=loss_func)
    ds = RegressionDataset(length=8)
    inputs = {"input_x": torch.tensor(ds.x), "labels": torch.tensor(ds.ys[0])}
    train_loss = trainer.training_step(model, dict(inputs))
    predict_loss = trainer.prediction_step(model, dict(inputs), prediction_loss_only=True)[0]
    torch.testing.assert_close(train_loss.detach(), predict_loss, atol=1e-6, rtol=0)
    assert train_loss.requires_grad


# -- TrainerBatchEvalMetricsTest -------------------------------------------------------------------


@pytest.mark.parametrize("eval_len", [64, 66])
def test_evaluate_with_batch_eval_metrics(tmp_path, eval_len):
    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=eval_len, compute_metrics=AlmostAccuracyBatched(),
                                     batch_eval_metrics=True, output_dir=tmp_path)
    results = trainer.evaluate()
    pred, y, loss = _expected(trainer.eval_dataset)
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert results["eval_accuracy"] == pytest.approx(AlmostAccuracy()((pred, y))["accuracy"], abs=1e-6)


def test_predict_with_batch_eval_metrics(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=66, double_output=True,
                                     label_names=["labels", "labels_2"], compute_metrics=AlmostAccuracyBatched(),
                                     batch_eval_metrics=True, output_dir=tmp_path)
    out = trainer.predict(trainer.eval_dataset)
    x = trainer.eval_dataset.x
    assert len(out.predictions) == 2 and np.allclose(out.predictions[0], 1.5 * x + 2.5)
    assert np.array_equal(out.label_ids[1], trainer.eval_dataset.ys[1])
    expected = AlmostAccuracy()((out.predictions[0], trainer.eval_dataset.ys[0]))["accuracy"]
    assert out.metrics["test_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_include_for_metrics_inputs_and_loss(tmp_path):
    seen = {}

    def metrics(p):
        seen["inputs"], seen["losses"] = p.inputs, p.losses
        return {}

    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=12, per_device_eval_batch_size=8,
                                     include_for_metrics=["inputs", "loss"], compute_metrics=metrics,
                                     output_dir=tmp_path)
    trainer.model.main_input_name = "input_x"
    trainer.evaluate()
    assert np.array_equal(seen["inputs"], trainer.eval_dataset.x)
    ds = trainer.eval_dataset
    per_batch = [float(((1.5 * ds.x[s] + 2.5 - ds.ys[0][s]) ** 2).mean()) for s in (slice(0, 8), slice(8, 12))]
    assert np.allclose(seen["losses"], [per_batch[0]] * 8 + [per_batch[1]] * 4, atol=1e-6)


def test_eval_do_concat_batches_false_keeps_batches(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, eval_len=12, per_device_eval_batch_size=8,
                                     eval_do_concat_batches=False, output_dir=tmp_path)
    out = trainer.predict(trainer.eval_dataset)
    assert isinstance(out.predictions, list) and [len(p) for p in out.predictions] == [8, 4]
    assert np.allclose(np.concatenate(out.predictions), 1.5 * trainer.eval_dataset.x + 2.5)
    assert [len(l) for l in out.label_ids] == [8, 4]


# -- tuple / dict / PreTrainedModel outputs in training ----------------------------------------------


@pytest.mark.parametrize("make_model", [RegressionModel, RegressionDictModel, regression_pretrained_model],
                         ids=["tuple", "dict", "pretrained_tuple"])
def test_trainer_works_with_tuple_dict_and_pretrained_outputs(tmp_path, make_model):
    """HF's test_trainer_works_with_dict, for the three output kinds: train, evaluate, predict."""
    trainer = get_regression_trainer(model=make_model(), train_len=16, learning_rate=0.1, num_train_epochs=2,
                                     per_device_train_batch_size=8, output_dir=tmp_path)
    before = float(trainer.evaluate()["eval_loss"])
    out = trainer.train()
    assert out.global_step == 4 and np.isfinite(out.training_loss)
    after = trainer.evaluate()
    assert after["eval_loss"] < before  # the tuple's first entry really was the loss it trained on
    preds = trainer.predict(trainer.eval_dataset).predictions
    assert preds.shape == (64,)


def test_ignore_keys_and_keys_to_ignore_at_inference(tmp_path):
    """Dict outputs: ignore_keys (per call) and config.keys_to_ignore_at_inference drop entries."""

    class TwoHeads(RegressionDictModel):
        def forward(self, input_x, labels=None, **kwargs):
            out = super().forward(input_x, labels)
            out["hidden"] = 2 * out["output"]
            return out

    trainer = get_regression_trainer(model=TwoHeads(1.5, 2.5), output_dir=tmp_path)
    assert isinstance(trainer.predict(trainer.eval_dataset).predictions, tuple)
    only = trainer.predict(trainer.eval_dataset, ignore_keys=["hidden"]).predictions
    assert np.allclose(only, 1.5 * trainer.eval_dataset.x + 2.5)
    trainer.model.config = type("Config", (), {"keys_to_ignore_at_inference": ["output"]})()
    assert np.allclose(trainer.predict(trainer.eval_dataset).predictions, 2 * (1.5 * trainer.eval_dataset.x + 2.5))


def test_prediction_loss_only(tmp_path):
    trainer = get_regression_trainer(a=1.5, b=2.5, prediction_loss_only=True, output_dir=tmp_path)
    out = trainer.predict(trainer.eval_dataset)
    assert out.predictions is None and out.label_ids is None
    assert out.metrics["test_loss"] == pytest.approx(_expected(trainer.eval_dataset)[2], abs=1e-5)


def test_predict_without_labels_uses_whole_tuple(tmp_path):
    """A batch without the label names: no loss, and outputs[0] is a prediction, not a loss."""
    trainer = get_regression_trainer(a=1.5, b=2.5, output_dir=tmp_path)
    ds = [{"input_x": x} for x in trainer.eval_dataset.x]
    out = trainer.predict(ds)
    assert out.label_ids is None and "test_loss" not in out.metrics
    assert np.allclose(out.predictions, 1.5 * trainer.eval_dataset.x + 2.5)


# -- test_trainer_data.py: iterable datasets, custom dataloaders ---------------------------------------


def test_evaluate_and_predict_on_iterable_dataset(tmp_path):
    model = regression_pretrained_model(a=1.5, b=2.5)
    args = TrainingArguments(str(tmp_path), report_to="none", disable_tqdm=True)
    eval_dataset = SampleIterableDataset(length=66)
    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset, compute_metrics=AlmostAccuracy())
    results = trainer.evaluate()
    pred, y, loss = _expected(eval_dataset.dataset)
    assert results["eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert results["eval_accuracy"] == pytest.approx(AlmostAccuracy()((pred, y))["accuracy"])
    preds = trainer.predict(SampleIterableDataset(length=66)).predictions
    assert np.allclose(preds, pred)


class MultiLoader:
    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self):
        for loader in self.loaders:
            yield from loader


class CustomDataloaderTrainer(Trainer):
    def get_train_dataloader(self):
        return MultiLoader([super().get_train_dataloader(), super().get_train_dataloader()])

    def get_eval_dataloader(self, eval_dataset):
        return MultiLoader([super().get_eval_dataloader(eval_dataset), super().get_eval_dataloader(eval_dataset)])


def test_custom_dataloaders(tmp_path):
    trainer = get_regression_trainer(trainer_class=CustomDataloaderTrainer, train_len=16, eval_len=16,
                                     per_device_train_batch_size=8, num_train_epochs=1, output_dir=tmp_path)
    assert trainer.train().global_step == 4  # two passes over 2 batches: 4 steps per epoch
    seen = []
    trainer.compute_metrics = lambda p: seen.append(len(p.predictions)) or {}
    trainer.evaluate()
    assert seen == [32]


def test_get_train_dataloader_returning_a_plain_torch_dataloader(tmp_path):
    """Any iterable of batches: here a torch DataLoader of already collated, unshuffled batches."""

    class Plain(Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=4)

    trainer = get_regression_trainer(trainer_class=Plain, train_len=16, num_train_epochs=2, learning_rate=0.1,
                                     output_dir=tmp_path)
    assert trainer.train().global_step == 8


# -- test_trainer.py: model_init, steps, metrics, helpers -------------------------------------------------


def test_model_init(tmp_path):
    """Re-training restarts from a fresh model_init() (seeded): same result twice, another with a new seed."""
    # overwrite_output_dir: functrain refuses a run next to another run's checkpoints (README, HF table)
    args = TrainingArguments(str(tmp_path), learning_rate=0.1, num_train_epochs=1, report_to="none",
                             disable_tqdm=True, per_device_train_batch_size=8, overwrite_output_dir=True)
    calls = []

    def model_init():
        calls.append(1)
        return RegressionModel(float(torch.randn(())), float(torch.randn(())))

    trainer = Trainer(args=args, train_dataset=RegressionDataset(length=16), model_init=model_init)
    trainer.train()
    first = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(calls) == 3  # __init__, then once per train()
    assert all(torch.equal(a, b) for a, b in zip(first, trainer.model.parameters()))
    trainer.args.seed = 314
    trainer.train()
    assert not all(torch.equal(a, b) for a, b in zip(first, trainer.model.parameters()))


def test_number_of_steps_in_training(tmp_path):
    trainer = get_regression_trainer(learning_rate=0.1, train_len=32, output_dir=tmp_path)
    assert trainer.train().global_step == 3 * 32 / 8
    # overwrite_output_dir: functrain refuses a run next to another run's checkpoints (README, HF table)
    trainer = get_regression_trainer(learning_rate=0.1, train_len=32, num_train_epochs=1.5, output_dir=tmp_path,
                                     overwrite_output_dir=True)
    assert trainer.train().global_step == int(1.5 * 32 / 8)
    trainer = get_regression_trainer(learning_rate=0.1, train_len=32, max_steps=5, output_dir=tmp_path,
                                     overwrite_output_dir=True)
    assert trainer.train().global_step == 5


def test_train_metrics_keys_and_total_flos(tmp_path):
    """Train metrics carry HF's keys; total_flos is a float, 6 x tokens x non-embedding params for
    models with num_parameters (transformers models), 0 for others (as HF)."""
    model = regression_pretrained_model()
    model.main_input_name = "input_x"
    trainer = get_regression_trainer(model=model, train_len=16, num_train_epochs=1, output_dir=tmp_path)
    metrics = trainer.train().metrics
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss",
            "epoch"} <= set(metrics)
    assert isinstance(trainer.state.total_flos, float)
    assert metrics["total_flos"] == trainer.state.total_flos == 6 * 16 * 2  # 16 inputs, 2 params
    assert trainer.state.log_history[-1]["total_flos"] == metrics["total_flos"]


def test_state_epoch_is_zero_before_training(tmp_path):
    trainer = get_regression_trainer(output_dir=tmp_path)
    assert trainer.state.epoch == 0
    trainer.evaluate()
    assert trainer.state.log_history[-1]["epoch"] == 0


def test_helper_methods(tmp_path):
    trainer = get_regression_trainer(train_len=16, num_train_epochs=1, learning_rate=0.1,
                                     lr_scheduler_type="constant", output_dir=tmp_path)
    assert trainer.is_world_process_zero() and trainer.is_local_process_zero()
    assert trainer.get_num_trainable_parameters() == 2
    trainer.model.b.requires_grad_(False)
    assert trainer.get_num_trainable_parameters() == 1
    trainer.model.b.requires_grad_(True)
    with pytest.raises(ValueError, match="train"):
        trainer.get_learning_rates()
    trainer.train()
    assert trainer.get_learning_rates() == [pytest.approx(0.1)]
    loader = trainer.get_train_dataloader()
    assert trainer.num_examples(loader) == 16
    assert trainer.num_examples(MultiLoader([])) == 0
    assert trainer.label_names == ["labels"]


def test_training_step_override_maps_onto_the_pure_step(tmp_path):
    """A training_step override (returning the loss) is what the step differentiates."""

    class DoubledLoss(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return 2 * super().training_step(model, inputs, num_items_in_batch)

    kw = dict(train_len=16, num_train_epochs=1, learning_rate=0.05, optim="sgd", max_grad_norm=0,
              lr_scheduler_type="constant")
    plain = get_regression_trainer(output_dir=tmp_path / "a", **kw)
    plain.train()
    doubled = get_regression_trainer(trainer_class=DoubledLoss, output_dir=tmp_path / "b", **kw)
    doubled.train()
    # SGD with a doubled loss = SGD with a doubled learning rate
    twice = get_regression_trainer(output_dir=tmp_path / "c", **{**kw, "learning_rate": 0.1})
    twice.train()
    for p, q, r in zip(doubled.model.parameters(), twice.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, r)


def test_training_step_override_that_detaches_is_refused(tmp_path):
    class Detaching(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs).detach()

    trainer = get_regression_trainer(trainer_class=Detaching, train_len=8, max_steps=1, output_dir=tmp_path)
    with pytest.raises(ValueError, match="without a graph"):
        trainer.train()


def test_prediction_step_override(tmp_path):
    """A prediction_step override decides loss, predictions and labels of evaluate()/predict()."""

    class Shifted(Trainer):
        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            return loss * 0 + 7.0, None if logits is None else logits + 1, labels

    trainer = get_regression_trainer(trainer_class=Shifted, a=1.5, b=2.5, output_dir=tmp_path)
    out = trainer.predict(trainer.eval_dataset)
    assert out.metrics["test_loss"] == pytest.approx(7.0)
    assert np.allclose(out.predictions, 1.5 * trainer.eval_dataset.x + 3.5)


def test_include_for_metrics_refuses_unknown(tmp_path):
    trainer = get_regression_trainer(include_for_metrics=["logits"], compute_metrics=AlmostAccuracy(),
                                     output_dir=tmp_path)
    with pytest.raises(ValueError, match="include_for_metrics"):
        trainer.evaluate()


class DynamicShapesDataset:
    """HF's: every ``batch_size`` consecutive examples share a length, lengths differ across batches."""

    def __init__(self, length=32, seed=42, batch_size=8):
        rng = np.random.RandomState(seed)
        sizes = rng.randint(1, 20, (length // batch_size,))
        self.xs = [rng.normal(size=(s,)).astype(np.float32) for s in sizes.repeat(batch_size)]
        self.ys = [rng.normal(size=(s,)).astype(np.float32) for s in sizes.repeat(batch_size)]

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return {"input_x": self.xs[i], "labels": self.ys[i]}


def test_dynamic_shapes(tmp_path):
    """Predictions and labels of different lengths are padded with -100 across batches."""
    eval_dataset = DynamicShapesDataset()
    trainer = Trainer(RegressionModel(a=2, b=1), TrainingArguments(str(tmp_path), report_to="none",
                                                                   disable_tqdm=True), eval_dataset=eval_dataset)
    trainer.evaluate()
    preds = trainer.predict(eval_dataset)
    for expected, seen in zip(eval_dataset.ys, preds.label_ids):
        assert np.array_equal(expected, seen[: expected.shape[0]]) and np.all(seen[expected.shape[0]:] == -100)
    for expected, seen in zip(eval_dataset.xs, preds.predictions):
        assert np.allclose(2 * expected + 1, seen[: expected.shape[0]]) and np.all(seen[expected.shape[0]:] == -100)


def test_evaluation_with_keys_to_drop(tmp_path):
    """HF's test: GPT-2's past_key_values are dropped from predictions (keys_to_ignore_at_inference).
    Design difference: functrain's eval forward passes use_cache=False, so ignore_keys=[] gives the
    logits alone where HF gives (logits, past_key_values)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=16,
                                                                 n_layer=1, n_head=2))
    x = torch.randint(0, 100, (16,))
    eval_dataset = [{"input_ids": x, "labels": x} for _ in range(8)]
    trainer = Trainer(model, TrainingArguments(str(tmp_path), report_to="none", disable_tqdm=True),
                      eval_dataset=eval_dataset)
    assert isinstance(trainer.predict(eval_dataset).predictions, np.ndarray)
    assert isinstance(trainer.predict(eval_dataset, ignore_keys=[]).predictions, np.ndarray)


def test_hand_loop_step_reads_tuple_outputs():
    """The pure step's default loss takes outputs[0] of a tuple; its eval step gives the rest as outputs,
    and a batch without labels gives the whole tuple as predictions (the same adapters rules)."""
    from functrain import TrainState, make_eval_step, make_train_step, optim

    model = RegressionModel(a=1.5, b=2.5, double_output=True)
    state = TrainState.create(model, optim.sgd(0.1), seed=0)
    ds = RegressionDataset(length=8)
    batch = {"input_x": torch.tensor(ds.x), "labels": torch.tensor(ds.ys[0])}
    new_state, metrics = make_train_step(model, optim.sgd(0.1))(state, batch)
    expected = torch.nn.functional.mse_loss(1.5 * batch["input_x"] + 2.5, batch["labels"])
    torch.testing.assert_close(metrics["loss"], expected)
    assert not torch.equal(new_state.params["a"], state.params["a"])
    out = make_eval_step(model, return_outputs=True)(state, batch)
    torch.testing.assert_close(out["loss"], expected)
    assert isinstance(out["outputs"], tuple) and len(out["outputs"]) == 2
    unlabeled = make_eval_step(model, return_outputs=True)(state, {"input_x": batch["input_x"]})
    assert "loss" not in unlabeled and len(unlabeled["outputs"]) == 2
