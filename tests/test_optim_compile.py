"""A compiled inject_hyperparams update follows hyperparameter changes without recompiling."""

import torch

import functrain.core.optim as optim
from functrain import tree


def test_compiled_inject_hyperparams_adamw_does_not_recompile_on_lr_change():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g), "s": torch.randn((), generator=g)}
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1,
                                               mask={"w": True, "b": False, "s": False})
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    def step(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    compiled = torch.compile(step, fullgraph=True, backend=counting_backend)
    eager_params, eager_state = params, tx.init(params)
    comp_params, comp_state = params, tx.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(6):
            if i in (2, 4):  # the user changes the learning rate between steps
                lr = torch.tensor(1e-2 / (i + 1))
                eager_state = eager_state._replace(hyperparams={**eager_state.hyperparams, "learning_rate": lr})
                comp_state = comp_state._replace(hyperparams={**comp_state.hyperparams, "learning_rate": lr.clone()})
            grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
            eager_params, eager_state = step(eager_params, grads, eager_state)
            comp_params, comp_state = compiled(comp_params, grads, comp_state)
            assert tree.relative_difference(comp_params, eager_params) < 1e-6
    assert len(compiles) == 1
    assert torch.allclose(comp_state.hyperparams["learning_rate"], torch.tensor(1e-2 / 5))
    # The lr change took effect: the last state's inner lr state records it.
    assert torch.allclose(comp_state.inner_state[2].learning_rate, torch.tensor(1e-2 / 5))


def test_masked_and_partition_compile_to_one_graph_and_match_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = tree.map(lambda p: torch.full_like(p, 0.5), params)
    txs = {
        "masked": optim.adamw(1e-2, weight_decay=0.1, mask=optim.default_weight_decay_mask(model)),
        "partition": optim.partition({"adam": optim.adam(1e-2), "sgd": optim.sgd(0.1, momentum=0.9)},
                                     {r"^0\.": "adam", r".*": "sgd"}),
        "if_finite": optim.apply_if_finite(optim.lion(1e-3), 2),
    }
    for name, tx in txs.items():
        compiles = []

        def backend(gm, example_inputs):
            compiles.append(gm)
            return gm.forward

        state = tx.init(params)
        eager_updates, eager_state = tx.update(grads, state, params)
        comp_updates, comp_state = torch.compile(tx.update, fullgraph=True, backend=backend)(grads, state, params)
        assert len(compiles) == 1, name
        assert tree.relative_difference(comp_updates, eager_updates) < 1e-6, name
        assert tree.tensors_equal(tree.map(lambda x: x.float(), comp_state), tree.map(lambda x: x.float(), eager_state)) or \
            tree.relative_difference(comp_state, eager_state) < 1e-6, name
