"""Numerical parity of functrain.optim with torch.optim / transformers over 30 steps (fp32).

Each case runs the same random gradients through a functrain transformation and a reference
optimizer and compares the parameters after every step: per leaf ``max|a - b| / max|b|`` must stay
below 1e-5.
"""

import math

import pytest
import torch
from torch import nn

import functrain.core.optim as optim
from functrain import tree

STEPS = 30
TOL = 1e-5
SHAPES = {"scalar": (), "vec": (7,), "mat": (5, 3), "cube": (2, 3, 4), "wide": (4, 9)}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def make_grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return {k: torch.randn(p.shape, generator=g) * 0.5 for k, p in params.items()}


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in b:
        den = b[k].abs().max().clamp_min(1e-12)
        worst = max(worst, float((a[k] - b[k]).abs().max() / den))
    return worst


def run_parity(tx, make_torch_opt, steps=STEPS, on_step=None):
    """Run both optimizers on identical grads; return the worst relative difference seen.

    Also checks the parameters really moved (else a no-op optimizer would pass).
    """
    params = make_params()
    start = tree.clone(params)
    ref = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make_torch_opt(list(ref.values()))
    state = tx.init(params)
    worst = 0.0
    for step in range(steps):
        if on_step is not None:
            state = on_step(step, state, opt)
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        worst = max(worst, max_rel_diff(params, {k: p.detach() for k, p in ref.items()}))
    assert max_rel_diff(params, start) > 10 * TOL, "parameters did not move: the comparison would be vacuous"
    return worst


ADAM_CASES = {
    "adamw": (lambda: optim.adamw(1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
    "adamw_amsgrad": (lambda: optim.adamw(1e-2, b1=0.8, b2=0.95, weight_decay=0.05, amsgrad=True),
                      lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05, amsgrad=True)),
    "adam": (lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
    "adam_l2_amsgrad": (lambda: optim.adam(1e-2, weight_decay=0.1, amsgrad=True),
                        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, amsgrad=True)),
}

SGD_CASES = {
    "sgd": (lambda: optim.sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum_dampening_wd": (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
                                  lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "sgd_nesterov": (lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
}

RMSPROP_CASES = {
    "rmsprop": (lambda: optim.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
    "rmsprop_centered": (lambda: optim.rmsprop(1e-2, decay=0.9, eps_in_sqrt=False, centered=True, weight_decay=0.01),
                         lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, centered=True, weight_decay=0.01)),
    "rmsprop_momentum": (lambda: optim.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False, momentum=0.9),
                         lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9)),
    "rmsprop_centered_momentum": (lambda: optim.rmsprop(1e-3, 0.99, 1e-6, eps_in_sqrt=False, centered=True, momentum=0.5),
                                  lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5, eps=1e-6)),
}

ADAGRAD_CASES = {
    "adagrad": (lambda: optim.adagrad(0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    "adagrad_all_options": (
        lambda: optim.adagrad(0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8),
        lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8)),
}


@pytest.mark.parametrize("case", {**ADAM_CASES, **SGD_CASES, **RMSPROP_CASES, **ADAGRAD_CASES})
def test_matches_torch_optim(case):
    ours, theirs = {**ADAM_CASES, **SGD_CASES, **RMSPROP_CASES, **ADAGRAD_CASES}[case]
    assert run_parity(ours(), theirs) <= TOL


ADAFACTOR_CONFIGS = {
    "external_lr": dict(lr=1e-2, relative_step=False, scale_parameter=False),
    "external_lr_scaled": dict(lr=1e-2, relative_step=False, scale_parameter=True),
    "beta1_weight_decay": dict(lr=1e-2, relative_step=False, scale_parameter=True, beta1=0.9, weight_decay=0.01),
    "relative_step": dict(lr=None, relative_step=True, scale_parameter=True),
    "relative_step_warmup": dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
}


@pytest.mark.parametrize("config", ADAFACTOR_CONFIGS)
def test_adafactor_matches_transformers(config):
    from transformers.optimization import Adafactor

    kw = dict(ADAFACTOR_CONFIGS[config])
    ours = optim.adafactor(kw.pop("lr"), **kw)
    assert run_parity(ours, lambda p: Adafactor(p, lr=ADAFACTOR_CONFIGS[config]["lr"], **kw)) <= TOL


class LionReference(torch.optim.Optimizer):
    """Algorithm 1 of Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms"), verbatim."""

    def __init__(self, params, lr, b1, b2, wd):
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2, wd=wd))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, b1, b2, wd = group["lr"], group["b1"], group["b2"], group["wd"]
            for theta in group["params"]:
                g = theta.grad
                m = self.state[theta].setdefault("m", torch.zeros_like(theta))
                c = b1 * m + (1 - b1) * g  # interpolate
                theta.sub_(lr * (torch.sign(c) + wd * theta))  # update with decoupled weight decay
                m.copy_(b2 * m + (1 - b2) * g)  # momentum tracking


def test_lion_matches_paper():
    ours = optim.lion(1e-3, b1=0.9, b2=0.99, weight_decay=0.1)
    assert run_parity(ours, lambda p: LionReference(p, lr=1e-3, b1=0.9, b2=0.99, wd=0.1)) <= TOL


def test_inject_hyperparams_lr_change_matches_torch_param_groups():
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1)

    def change_lr(step, state, opt):
        if step in (10, 20):
            new_lr = 1e-2 / (step // 10 + 1)
            state = state._replace(hyperparams={**state.hyperparams, "learning_rate": torch.tensor(new_lr)})
            for group in opt.param_groups:
                group["lr"] = new_lr
        return state

    worst = run_parity(tx, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), on_step=change_lr)
    assert worst <= TOL


def test_inject_hyperparams_schedule_matches_torch_lambda_lr():
    schedule = lambda count: 1e-2 * (1.0 - count.to(torch.float32) / STEPS)  # noqa: E731
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=schedule, weight_decay=0.1)
    scheds = []

    def make(p):
        opt = torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS))
        return opt

    def step_sched(step, state, opt):
        if step > 0:
            scheds[0].step()
        return state

    assert run_parity(tx, make, on_step=step_sched) <= TOL


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def test_masked_adamw_with_default_mask_matches_two_param_groups():
    model = _tiny_gpt2()
    decay_names = optim.decay_parameter_names(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert 0 < sum(n in decay_names for n in params) < len(params)
    tx = optim.adamw(1e-2, weight_decay=0.1, mask=optim.default_weight_decay_mask(model))
    ref = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in ref.items() if n in decay_names], "weight_decay": 0.1},
         {"params": [p for n, p in ref.items() if n not in decay_names], "weight_decay": 0.0}],
        lr=1e-2,
    )
    state = tx.init(params)
    for step in range(STEPS):
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
    assert max_rel_diff(params, {n: p.detach() for n, p in ref.items()}) <= TOL
    # And weight decay really was masked: unmasked decay lands elsewhere.
    plain = optim.adamw(1e-2, weight_decay=0.1)
    p2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    s2 = plain.init(p2)
    for step in range(STEPS):
        u, s2 = plain.update(make_grads(p2, step), s2, p2)
        p2 = optim.apply_updates(p2, u)
    assert max_rel_diff(p2, {n: p.detach() for n, p in ref.items()}) > 1e-4
