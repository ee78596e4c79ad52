"""compile=True: one fullgraph torch.compile graph, same numbers as eager, no recompiles.

Graph capture on the transformer models uses the ``aot_eager`` backend (dynamo + AOTAutograd,
no inductor codegen), which keeps these tests to seconds on 2 CPU cores; inductor numerics,
compiled dropout and compiled donation are checked on the MLP.
"""

import pytest
import torch

import functrain as ft
from functrain.step.train import make_train_step
from step_models import MLP, TinyGPTForCausalLM, bert_classifier, cls_batch, gpt2, lm_batch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled-code caches are per code object; keep tests independent
    yield
    torch._dynamo.reset()


def no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


def schedule(count):
    return 1e-2 / (1.0 + count)  # a 0-d tensor in, a 0-d tensor out: the lr changes every step


def _run(step, state, batches):
    metrics = []
    for i, batch in enumerate(batches):
        if i == 0:
            state, m = step(state, batch)  # first call compiles
        else:
            with no_recompile():
                state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


TRANSFORMERS = {
    "tiny_gpt": (lambda: TinyGPTForCausalLM(dropout=0.0), lambda i: lm_batch(seed=i, pad_rows={i: 3})),
    "gpt2": (lambda: gpt2(dropout=0.0), lambda i: lm_batch(seed=i, pad_rows={i: 3})),
    "bert": (lambda: bert_classifier(dropout=0.0),
             lambda i: {"input_ids": lm_batch(seed=i)["input_ids"], "labels": (torch.arange(8) + i) % 3}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_fullgraph_no_recompile_and_eager_parity(name):
    make_model, make_batch = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = make_model()
    tx = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(schedule, weight_decay=0.01))
    state = ft.TrainState.create(model, tx, copy=True)
    batches = [make_batch(i) for i in range(3)]
    compiled = make_train_step(model, tx, accumulate=2, compile=True, compile_kwargs={"backend": "aot_eager"})
    eager = make_train_step(model, tx, accumulate=2)
    s_c, m_c = _run(compiled, state, batches)  # fullgraph=True: any graph break raises
    s_e, m_e = _run(eager, state, batches)
    assert [float(m["learning_rate"]) for m in m_c] == pytest.approx([1e-2, 5e-3, 1e-2 / 3])
    assert ft.tree.relative_difference(s_c.params, s_e.params) <= 1e-5
    assert ft.tree.relative_difference(s_c.opt_state, s_e.opt_state) <= 1e-5


@pytest.mark.slow
def test_inductor_matches_eager_over_10_steps_with_changing_lr():
    """Tolerance: 1e-5 global relative norm (inductor reorders float sums; observed ~1e-7)."""
    torch.manual_seed(0)
    model = MLP()
    lr = torch.tensor(1e-2)  # a tensor hyperparameter the user changes in place between steps
    tx = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(lr, weight_decay=0.01))
    state = ft.TrainState.create(model, tx, copy=True)
    batches = [cls_batch(seed=i) for i in range(10)]
    results = {}
    for mode in ["eager", "compiled"]:
        step = make_train_step(model, tx, accumulate=2, compile=mode == "compiled")
        s, lrs = state, []
        for i, batch in enumerate(batches):
            lr.fill_(1e-2 * 0.8 ** i)
            with (no_recompile() if i > 0 else torch._dynamo.config.patch()):
                s, m = step(s, batch)
            lrs.append(float(m["learning_rate"]))
        results[mode] = s
        assert lrs == pytest.approx([1e-2 * 0.8 ** i for i in range(10)])
    assert ft.tree.relative_difference(results["compiled"].params, results["eager"].params) <= 1e-5
    assert int(results["compiled"].step) == 10


@pytest.mark.slow
def test_compiled_dropout_is_a_function_of_the_key():
    """Inductor draws its random seeds from the global generator at run time, which the step
    seeds from state.rng: compiled dropout is reproducible and changes with the key."""
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    tx = ft.optim.sgd(0.1)
    state = ft.TrainState.create(model, tx, seed=3, copy=True)
    step = make_train_step(model, tx, compile=True)
    batch = cls_batch()
    global_rng = torch.get_rng_state()
    a, _ = step(state, batch)
    with no_recompile():
        b, _ = step(state, batch)
        c, _ = step(state.replace(rng=ft.rng.key(4)), batch)
    assert torch.equal(global_rng, torch.get_rng_state())
    assert ft.tree.tensors_equal(a.params, b.params)
    assert not ft.tree.tensors_equal(a.params, c.params)
