"""A donated eager step runs the plain ``adamw`` chain as torch's fused AdamW kernel, in place
(functrain/core/optim/fused_adamw.py): given the same gradients, bitwise the numbers of
``torch.optim.AdamW(fused=True)`` and within one float rounding of the chain, over 20 steps from a
state whose params differ from the module's; a non-finite window changes nothing (params, moments,
counts, the recorded rate). Whole steps of a model agree to 1e-5 (the tolerance of the optimizer
parity tests): params an ulp apart give the next forward slightly different gradients, which
Adam's normalization enlarges where a gradient is near zero."""

import copy

import pytest
import torch

import functrain as ft
from functrain.core.optim import fused_adamw as F
from functrain.step.train import make_train_step
from step_models import gpt2, lm_batch, moved_state

train_module = __import__("functrain.step.train", fromlist=["make_train_step"])
LR, WD, STEPS = 1e-3, 0.1, 6
TOL = 1e-5  # whole model steps (see the module docstring)


def _schedule():
    return ft.schedules.get_schedule("linear", LR, num_training_steps=STEPS + 2, num_warmup_steps=2)


def _adamw(model):
    return ft.optim.adamw(_schedule(), weight_decay=WD, mask=ft.optim.default_weight_decay_mask(model))


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the step ran the fused update (the path under test, not the grouped one)."""
    calls = []
    real = train_module.fused_adamw_

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "fused_adamw_", spy)
    return calls


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)))


def _torch_fused_adamw(ref: dict, mask: dict):
    """``torch.optim.AdamW(fused=True)`` over the tensors ``ref``, weight decay where ``mask`` says,
    following the test's schedule with ``LambdaLR`` (as HF's Trainer builds it)."""
    groups = [{"params": [ref[n] for n in ref if mask[n]], "weight_decay": WD},
              {"params": [ref[n] for n in ref if not mask[n]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(_schedule()(torch.tensor(s))) / LR)


def test_fused_update_is_torch_fused_adamw_bitwise_and_the_chain_within_rounding():
    from functrain.step.grouped_update import apply_update_in_groups_

    torch.manual_seed(0)
    model = gpt2()
    tx = _adamw(model)
    fused = moved_state(model, tx)
    chain = copy.deepcopy(fused)
    ref = {k: v.clone().requires_grad_() for k, v in fused.params.items()}
    opt, sched = _torch_fused_adamw(ref, ft.optim.default_weight_decay_mask(model)(fused.params))
    spec = F.fused_adamw_of(tx)
    for i in range(20):
        gen = torch.Generator().manual_seed(i)
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in fused.params.items()}
        finite = torch.tensor(i != 7)  # step 7: a non-finite window, skipped (torch's optimizer not called)
        if i == 7:
            grads["transformer.wte.weight"][0, 0] = float("nan")
        before = ft.tree.clone((fused.params, fused.opt_state))
        F.fused_adamw_(spec, fused.params, ft.tree.clone(grads), fused.opt_state, finite=finite)
        apply_update_in_groups_(tx, chain.params, chain.opt_state, ft.tree.clone(grads), finite=finite)
        if i == 7:
            assert ft.tree.tensors_equal((fused.params, fused.opt_state), before)
            continue
        for k, p in ref.items():
            p.grad = grads[k]
        opt.step()
        sched.step()
    assert ft.tree.tensors_equal(fused.params, {k: p.detach() for k, p in ref.items()})
    assert ft.tree.tensors_equal(fused.opt_state[0].mu, {k: opt.state[p]["exp_avg"] for k, p in ref.items()})
    assert ft.tree.tensors_equal(fused.opt_state[0].nu, {k: opt.state[p]["exp_avg_sq"] for k, p in ref.items()})
    assert _max_diff(fused.params, chain.params) <= 2.5e-7
    assert _max_diff(fused.opt_state, chain.opt_state) <= 2.5e-7
    assert ft.tree.tensors_equal(fused.opt_state[2], chain.opt_state[2])  # counts and the recorded rate exactly
    assert int(fused.opt_state[0].count) == int(fused.opt_state[2].count) == 19


def test_donated_adamw_step_equals_torch_fused_adamw(kernel_calls):
    torch.manual_seed(0)
    model = gpt2()
    tx = _adamw(model)
    state = moved_state(model, tx)
    reference = copy.deepcopy(model)
    named = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in state.params.items():
            named[name].copy_(p)
    mask = ft.optim.default_weight_decay_mask(model)(state.params)
    opt, sched = _torch_fused_adamw(named, mask)
    step = make_train_step(model, tx, max_grad_norm=0.5, donate=True, leafwise_update=True)
    ptrs = [t.data_ptr() for t in ft.tree.leaves((state.params, state.opt_state))]
    assert any(mask.values()) and not all(mask.values())  # the mask decays some parameters, not others
    for i in range(STEPS):
        batch = lm_batch(seed=i)
        state, metrics = step(state, batch)
        loss = reference(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(metrics["grad_norm"], norm, rtol=1e-5, atol=0)
    assert len(kernel_calls) == STEPS
    assert [t.data_ptr() for t in ft.tree.leaves((state.params, state.opt_state))] == ptrs  # in place
    ours = {n: state.params[n] for n in state.params}
    theirs = {n: p.detach() for n, p in reference.named_parameters()}
    assert _max_diff(ours, theirs) < TOL
    assert _max_diff(state.opt_state[0].mu, {n: opt.state[named[n]]["exp_avg"] for n in state.params}) < TOL
    assert int(state.step) == int(state.opt_state[0].count) == int(state.opt_state[2].count) == STEPS


def test_donated_adamw_step_equals_the_pure_chain_over_many_steps(kernel_calls):
    torch.manual_seed(0)
    model = gpt2()
    tx = _adamw(model)
    pure_step = make_train_step(model, tx, max_grad_norm=1.0)
    fused_step = make_train_step(model, tx, max_grad_norm=1.0, donate=True, leafwise_update=True)
    pure = moved_state(model, tx)
    fused = copy.deepcopy(pure)
    for i in range(12):
        batch = lm_batch(seed=i % 4)
        pure, m_pure = pure_step(pure, batch)
        fused, m = fused_step(fused, batch)
        assert torch.equal(m["learning_rate"], m_pure["learning_rate"])
        torch.testing.assert_close(m["loss"], m_pure["loss"], rtol=1e-6, atol=0)
    assert len(kernel_calls) == 12
    assert _max_diff(fused.params, pure.params) < TOL
    assert _max_diff(fused.opt_state, pure.opt_state) < TOL
    assert ft.tree.tensors_equal(fused.opt_state[2], pure.opt_state[2])  # counts and the recorded rate exactly


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clip_norm_decides", "each_element_checked"])
def test_a_non_finite_window_changes_nothing(max_grad_norm, kernel_calls):
    torch.manual_seed(0)
    model = gpt2()
    tx = _adamw(model)

    def loss_fn(m, batch):  # the window's "factor" makes a chosen step's loss (and gradients) NaN
        out = m(input_ids=batch["input_ids"], labels=batch["labels"])
        return out.loss * batch["factor"].mean()

    pure_step = make_train_step(model, tx, loss_fn, skip_non_finite=True, max_grad_norm=max_grad_norm)
    fused_step = make_train_step(model, tx, loss_fn, skip_non_finite=True, max_grad_norm=max_grad_norm, donate=True,
                                 leafwise_update=True)
    pure = moved_state(model, tx)
    fused = copy.deepcopy(pure)
    skipped = []
    for i in range(5):
        b = lm_batch(seed=i)
        b["factor"] = torch.full((b["input_ids"].shape[0],), float("nan") if i == 2 else 1.0)
        before = ft.tree.clone((fused.params, fused.opt_state))
        pure, m_pure = pure_step(pure, b)
        fused, m = fused_step(fused, b)
        assert torch.equal(m["skipped"], m_pure["skipped"])
        skipped.append(bool(m["skipped"]))
        if i == 2:  # bitwise unchanged: params, moments, counts, the recorded learning rate
            assert ft.tree.tensors_equal((fused.params, fused.opt_state), before)
    assert skipped == [False, False, True, False, False]
    assert len(kernel_calls) == 5
    assert int(fused.step) == int(fused.opt_state[0].count) == int(fused.opt_state[2].count) == 4
    assert ft.tree.tensors_equal(fused.opt_state[2], pure.opt_state[2])
    assert _max_diff(fused.params, pure.params) < TOL


class _Shared(torch.nn.Module):
    """``a`` and ``b`` receive one gradient tensor (autograd hands ``a + b``'s to both); ``c``'s is an
    expanded view. Clipping in place must scale each once and write none of them twice."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4, 3))
        self.b = torch.nn.Parameter(torch.randn(4, 3))
        self.c = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return (((self.a + self.b) * x).sum() + 3.0 * self.c.sum()) / x.shape[0]


@pytest.mark.parametrize("max_grad_norm", [0.1, None])
def test_shared_and_expanded_gradients(max_grad_norm, kernel_calls):
    torch.manual_seed(0)
    model = _Shared()
    tx = ft.optim.adamw(1e-2, weight_decay=0.0)
    loss_fn = lambda m, batch: m(batch["x"])  # noqa: E731
    pure_step = make_train_step(model, tx, loss_fn, max_grad_norm=max_grad_norm)
    fused_step = make_train_step(model, tx, loss_fn, max_grad_norm=max_grad_norm, donate=True, leafwise_update=True)
    pure = moved_state(model, tx)
    fused = copy.deepcopy(pure)
    for i in range(4):
        batch = {"x": torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(i))}
        pure, m_pure = pure_step(pure, batch)
        fused, m = fused_step(fused, batch)
        torch.testing.assert_close(m["grad_norm"], m_pure["grad_norm"], rtol=1e-6, atol=0)
    assert len(kernel_calls) == 4
    assert _max_diff(fused.params, pure.params) < 1e-6
    assert _max_diff(fused.opt_state, pure.opt_state) < 1e-6


def test_only_a_plain_adamw_with_number_hyperparameters_is_fused():
    assert F.fused_adamw_of(ft.optim.adamw(1e-3)) is not None
    assert F.fused_adamw_of(ft.optim.adamw(_schedule(), weight_decay=0.0)) is not None
    assert F.fused_adamw_of(ft.optim.adamw(1e-3, b1=torch.tensor(0.9))) is None  # a population's tensor
    assert F.fused_adamw_of(ft.optim.adamw(1e-3, amsgrad=True)) is None
    assert F.fused_adamw_of(ft.optim.chain(ft.optim.adamw(1e-3))) is None  # wrapped: another state layout
    assert F.fused_adamw_of(ft.optim.adam(1e-3)) is None


def test_the_kernel_is_not_used_where_it_cannot_run():
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    tx = ft.optim.adamw(1e-3)
    state = tx.init(params)
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    assert F.fused_adamw_applies(params, grads, state)
    assert not F.fused_adamw_applies(params, {**grads, "b": grads["b"].double()}, state)  # dtypes differ
    assert not F.fused_adamw_applies({**params, "w": torch.zeros(2, 3).t()}, grads, state)  # not contiguous
    assert not F.fused_adamw_applies(params, grads, ft.optim.chain(tx).init(params))  # another layout


def test_trainer_default_runs_the_kernel_and_matches_the_chain(tmp_path, kernel_calls, monkeypatch):
    from functrain import Trainer, TrainingArguments
    from _trainer_fixtures import make_dataset, make_model, params_of

    def run(name):
        args = TrainingArguments(str(tmp_path / name), per_device_train_batch_size=4, max_steps=6, save_strategy="no",
                                 report_to="none", learning_rate=1e-2, weight_decay=0.1, disable_tqdm=True, seed=3)
        trainer = Trainer(make_model(), args, train_dataset=make_dataset())
        trainer.train()
        return params_of(trainer)

    fused = run("fused")
    assert len(kernel_calls) == 6
    monkeypatch.setattr(train_module, "fused_adamw_of", lambda tx: None)
    chain = run("chain")
    assert len(kernel_calls) == 6
    assert _max_diff(fused, chain) < TOL


def test_skip_flag_comes_from_the_clip_norm_when_clipping():
    from functrain.step.train import window_finite

    loss = torch.tensor(1.0)
    huge = {"a": torch.full((4,), 1e20)}  # finite, but its l2 norm overflows fp32
    nan = {"a": torch.tensor([1.0, float("nan")])}
    for grads, clip, expected in [(huge, None, True), (huge, 1.0, False), (nan, None, False), (nan, 1.0, False)]:
        assert bool(window_finite(loss, grads, ft.tree.global_norm(grads), clip)) is expected
    assert not bool(window_finite(torch.tensor(float("inf")), {"a": torch.ones(2)}, torch.tensor(1.0), 1.0))
