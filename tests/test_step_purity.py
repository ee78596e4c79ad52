"""The step is a pure function of (state, batch): inputs untouched, outputs reproducible."""

import pytest
import torch

import functrain as ft
from functrain.step.train import make_eval_step, make_train_step
from step_models import MLP, TinyGPTForCausalLM, bert_classifier, cls_batch, gpt2, lm_batch


def _cases():
    return {
        "mlp": (lambda: MLP(dropout=0.3), cls_batch),
        "tiny_gpt": (lambda: TinyGPTForCausalLM(dropout=0.2), lambda: lm_batch(pad_rows={1: 5})),
        "gpt2": (lambda: gpt2(dropout=0.2), lambda: lm_batch(pad_rows={2: 7})),
        "bert": (lambda: bert_classifier(dropout=0.2),
                 lambda: {"input_ids": lm_batch()["input_ids"], "labels": torch.arange(8) % 3}),
    }


def _snapshot(state, batch):
    return ft.tree.clone((state.params, state.buffers, state.opt_state, state.step, state.rng, batch))


@pytest.mark.parametrize("name", list(_cases()))
def test_step_leaves_inputs_and_global_rng_alone_and_is_reproducible(name):
    make_model, make_batch = _cases()[name]
    torch.manual_seed(0)
    model = make_model()
    tx = ft.optim.adamw(1e-2)
    state = ft.TrainState.create(model, tx, copy=True)
    batch = make_batch()
    step = make_train_step(model, tx, accumulate=2)
    before = _snapshot(state, batch)
    global_rng = torch.get_rng_state()

    s1, m1 = step(state, batch)
    s2, m2 = step(state, batch)

    assert ft.tree.tensors_equal(before, _snapshot(state, batch)), "a non-donated step mutated its inputs"
    assert torch.equal(global_rng, torch.get_rng_state()), "the step changed the global RNG"
    assert ft.tree.tensors_equal((s1.params, s1.opt_state, s1.step), (s2.params, s2.opt_state, s2.step))
    assert ft.tree.tensors_equal(m1, m2)
    # The update really happened, and the key advanced.
    assert not ft.tree.tensors_equal(s1.params, state.params)
    assert int(s1.step) == 1 and not torch.equal(s1.rng, state.rng)


def test_dropout_depends_on_the_key():
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    tx = ft.optim.sgd(0.1)
    step = make_train_step(model, tx)
    batch = cls_batch()
    a = ft.TrainState.create(model, tx, seed=1, copy=True)
    b = a.replace(rng=ft.rng.key(2))
    assert not ft.tree.tensors_equal(step(a, batch)[0].params, step(b, batch)[0].params)
    # Two steps in a row see different dropout masks (the key advances), same batch.
    s1, m1 = step(a, batch)
    _, m2 = step(s1.replace(params=a.params, opt_state=a.opt_state), batch)
    assert not torch.equal(m1["loss"], m2["loss"])


def test_eval_step_is_pure_and_uses_eval_mode():
    torch.manual_seed(0)
    model = gpt2(dropout=0.5)
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx, copy=True)
    batch = lm_batch(pad_rows={0: 4})
    model.train()
    eval_step = make_eval_step(model, return_outputs=True)
    out1, out2 = eval_step(state, batch), eval_step(state, batch)
    assert model.training, "the eval step must restore the module's mode"
    assert torch.equal(out1["loss"], out2["loss"]) and torch.equal(out1["outputs"], out2["outputs"])
    # Reference: the model itself in eval mode, no dropout.
    model.eval()
    with torch.no_grad():
        ref = model(**batch)
    assert torch.allclose(out1["loss"], ref.loss) and torch.allclose(out1["outputs"], ref.logits)
    assert int(out1["num_items"]) == 8 * 15 - 4
