"""Bad batches fail with a clear message before anything changes."""

import pytest
import torch

import functrain as ft
from functrain.step.train import make_train_step
from step_models import MLP, bert_classifier, cls_batch, gpt2, lm_batch


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = gpt2()
    tx = ft.optim.adamw(1e-3)
    return model, tx, ft.TrainState.create(model, tx, copy=True)


def _check(model, tx, state, batch, error, match, **kw):
    before = ft.tree.clone((state.params, state.opt_state, state.step, state.rng))
    step = make_train_step(model, tx, donate=True, **kw)  # even a donating step leaves it intact
    with pytest.raises(error, match=match):
        step(state, batch)
    assert not state.consumed
    assert ft.tree.tensors_equal(before, (state.params, state.opt_state, state.step, state.rng))


def test_missing_labels_names_key_and_keys_present(lm):
    _check(*lm, {"input_ids": lm_batch()["input_ids"]}, KeyError, r"'labels'.*\['input_ids'\]")


def test_unknown_key_for_the_model():
    # Checked when forward has no **kwargs (transformers models take **kwargs: not checkable).
    model = MLP()
    tx = ft.optim.sgd(0.1)
    _check(model, tx, ft.TrainState.create(model, tx), {**cls_batch(), "z": torch.zeros(8)}, KeyError,
           r"\['z'\] are not arguments of MLP.forward")


def test_float_labels_for_a_language_model(lm):
    b = lm_batch()
    _check(*lm, {**b, "labels": b["labels"].float()}, TypeError, "integer class indices")


def test_float_class_labels_for_a_classifier():
    model = bert_classifier(num_labels=3)
    tx = ft.optim.sgd(0.1)
    b = {"input_ids": lm_batch()["input_ids"], "labels": torch.zeros(8)}
    _check(model, tx, ft.TrainState.create(model, tx), b, TypeError, "BertForSequenceClassification")


def test_mismatched_batch_sizes(lm):
    b = lm_batch()
    _check(*lm, {**b, "labels": b["labels"][:6]}, ValueError, r"'input_ids': 8.*'labels': 6")


def test_empty_batch(lm):
    b = {k: v[:0] for k, v in lm_batch().items()}
    _check(*lm, b, ValueError, "batch size 0")
    _check(*lm, {}, ValueError, "empty")


def test_not_divisible_by_accumulate(lm):
    _check(*lm, lm_batch(n=6), ValueError, "batch size 6 .*accumulate=4", accumulate=4)


def test_custom_loss_required_keys():
    model = MLP()
    tx = ft.optim.sgd(0.1)
    def loss_fn(m, batch):  # noqa: E306
        return torch.nn.functional.mse_loss(m(batch["x"])["logits"], batch["target"])
    _check(model, tx, ft.TrainState.create(model, tx), cls_batch(), KeyError, "'target'",
           loss_fn=loss_fn, required_keys=["x", "target"])


def test_custom_loss_fn_and_aux_metrics():
    torch.manual_seed(0)
    model = MLP()
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx)
    def loss_fn(m, batch):  # noqa: E306
        logits = m(batch["x"])["logits"]
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).float().mean()}
    batch = cls_batch(n=8)
    _, m = make_train_step(model, tx, loss_fn, accumulate=2)(state, batch)
    logits = model(batch["x"])["logits"]
    assert torch.allclose(m["accuracy"], (logits.argmax(-1) == batch["labels"]).float().mean())
    assert torch.allclose(m["loss"], torch.nn.functional.cross_entropy(logits, batch["labels"]))
