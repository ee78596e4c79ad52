"""Parity of the wider optimizer set with outside references over 30 steps (fp32, <= 1e-5 relative).

References: torch.optim (Adamax, RAdam, NAdam, Adadelta, Muon, SGD), optax's NAdam formula, torch.optim.swa_utils
(parameter EMA), torch.optim.AdamW with its moment rounded to bf16 after each step (mu_dtype),
plain per-tensor loops written from the LAMB / LARS papers as optax defines them.
"""

import pytest
import torch
from torch import nn

import functrain.optim as optim
from functrain.core import tree
from test_optim_parity import STEPS, TOL, make_grads, max_rel_diff, run_parity

TORCH_CASES = {
    "adamax": (lambda: optim.adamax(2e-2), lambda p: torch.optim.Adamax(p, lr=2e-2)),
    "adamax_l2": (lambda: optim.adamax(1e-2, 0.8, 0.99, 1e-6, weight_decay=0.1),
                  lambda p: torch.optim.Adamax(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    # b2=0.9 makes rho_t cross 5 inside the run, so both the plain and rectified branches are compared.
    "radam": (lambda: optim.radam(1e-2, b2=0.9), lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9))),
    "radam_default_betas_wd": (lambda: optim.radam(1e-2, weight_decay=0.1),
                               lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1)),
    "radam_decoupled": (lambda: optim.radam(1e-2, b2=0.9, weight_decay=0.1, decoupled_weight_decay=True),
                        lambda p: torch.optim.RAdam(p, lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1,
                                                    decoupled_weight_decay=True)),
    "nadam_torch": (lambda: optim.nadam_torch(1e-2), lambda p: torch.optim.NAdam(p, lr=1e-2)),
    "nadam_torch_decoupled": (lambda: optim.nadam_torch(1e-2, momentum_decay=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                        lambda p: torch.optim.NAdam(p, lr=1e-2, momentum_decay=0.01, weight_decay=0.1,
                                                    decoupled_weight_decay=True)),
    "adadelta": (lambda: optim.adadelta(1.0), lambda p: torch.optim.Adadelta(p)),
    "adadelta_wd": (lambda: optim.adadelta(0.5, rho=0.8, eps=1e-5, weight_decay=0.1),
                    lambda p: torch.optim.Adadelta(p, lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1)),
    "sgd_nesterov_optax_defaults": (lambda: optim.sgd(0.05, 0.9, True),
                                    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_matches_torch_optim(case):
    ours, theirs = TORCH_CASES[case]
    assert run_parity(ours(), theirs) <= TOL


class _OptaxNAdam:
    """optax.nadam written from optax's definition (``scale_by_adam(nesterov=True)`` then ``-lr``),
    in float64: ``mu = b1 mu + (1 - b1) g``, ``nu = b2 nu + (1 - b2) g^2``,
    ``mu_hat = b1 mu / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)``, ``nu_hat = nu / (1 - b2^t)``,
    ``p -= lr mu_hat / (sqrt(nu_hat + eps_root) + eps)``."""

    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
        self.params, self.lr, self.b1, self.b2, self.eps, self.eps_root = params, lr, b1, b2, eps, eps_root
        self.mu = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.nu = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        for p, mu, nu in zip(self.params, self.mu, self.nu):
            g = p.grad.double()
            mu.mul_(b1).add_((1 - b1) * g)
            nu.mul_(b2).add_((1 - b2) * g * g)
            mu_hat = b1 * mu / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1 ** t)
            nu_hat = nu / (1 - b2 ** t)
            p.sub_((self.lr * mu_hat / (torch.sqrt(nu_hat + self.eps_root) + self.eps)).to(p.dtype))


@pytest.mark.parametrize("kwargs", [{}, {"b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-8}])
def test_nadam_is_optaxs_nadam(kwargs):
    assert run_parity(optim.nadam(1e-2, **kwargs), lambda p: _OptaxNAdam(p, 1e-2, **kwargs)) <= TOL
    # and it is not torch's NAdam (momentum schedule): the names really mean different optimizers
    assert run_parity(optim.nadam(1e-2), lambda p: torch.optim.NAdam(p, lr=1e-2)) > 1e-3


# -- optax defaults under optax names --------------------------------------------------------------


def test_optax_defaults_for_sgd_and_rmsprop():
    params = {"w": torch.randn(3)}
    assert optim.sgd(0.1).init(params)[1] == optim.identity().init(params)  # momentum=None: no trace state
    # optax's rmsprop: decay 0.9 and eps inside the square root; torch's (0.99, eps outside) differs.
    g = {"w": torch.tensor([0.5, -1.0, 2.0])}
    u, _ = optim.rmsprop(1.0).update(g, optim.rmsprop(1.0).init(params), params)
    expected = -g["w"] / torch.sqrt(0.1 * g["w"] ** 2 + 1e-8)
    torch.testing.assert_close(u["w"], expected, rtol=1e-6, atol=0)
    assert run_parity(optim.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False),
                      lambda p: torch.optim.RMSprop(p, lr=1e-2)) <= TOL
    assert run_parity(optim.rmsprop(1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)) > 1e-3


def test_scale_by_schedule_multiplies_by_plus_schedule():
    tx = optim.scale_by_schedule(lambda count: 0.5 * (count + 1).float())
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    u1, state = tx.update({"w": torch.ones(2)}, state)
    u2, state = tx.update({"w": torch.ones(2)}, state)
    assert u1["w"].tolist() == [0.5, 0.5] and u2["w"].tolist() == [1.0, 1.0]


def test_momentum_alias_is_gone():
    assert not hasattr(optim, "momentum")  # optax has no optax.momentum; use trace() or sgd(momentum=)


# -- extra args (value=loss) ----------------------------------------------------------------------


def test_chain_and_wrappers_forward_value_only_to_transforms_that_take_it():
    seen = []

    def update(updates, state, params=None, *, value, **extra):
        seen.append(float(value))
        return updates, state

    spy = optim.GradientTransformationExtraArgs(lambda p: optim.EmptyState(), update)
    plain = optim.scale(2.0)  # a plain transformation: must not receive value=
    tx = optim.chain(plain, optim.masked(spy, {"w": True, "b": False}),
                     optim.partition({"a": spy, "z": optim.set_to_zero()}, {"w": "a", "b": "z"}),
                     optim.MultiSteps(spy, 1).gradient_transformation(),
                     optim.apply_if_finite(spy, 2), optim.named_chain(("spy", spy)))
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    out, _ = tx.update(tree.ones_like(params), tx.init(params), params, value=torch.tensor(3.0))
    assert seen == [3.0] * 5
    assert out["b"].tolist() == [0.0] and out["w"].tolist() == [2.0, 2.0]


def test_train_step_passes_the_loss_as_value():
    from functrain import TrainState, make_train_step

    model = nn.Linear(3, 1)
    seen = {}

    def update(updates, state, params=None, *, value, **extra):
        return updates, value.detach().reshape(())

    spy = optim.GradientTransformationExtraArgs(lambda p: torch.zeros(()), update)
    tx = optim.chain(spy, optim.sgd(0.1))
    state = TrainState.create(model, tx, copy=True)
    batch = {"x": torch.randn(4, 3), "y": torch.randn(4, 1)}
    step = make_train_step(model, tx, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean())
    new, metrics = step(state, batch)
    seen["value"] = new.opt_state[0]
    torch.testing.assert_close(seen["value"], metrics["loss"])


# -- trust ratios ---------------------------------------------------------------------------------


class LambReference(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2020 with Adam bias correction (optax.lamb's definition)."""

    def __init__(self, params, lr, b1, b2, eps, wd):
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2, eps=eps, wd=wd))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                st["m"].mul_(group["b1"]).add_(p.grad, alpha=1 - group["b1"])
                st["v"].mul_(group["b2"]).addcmul_(p.grad, p.grad, value=1 - group["b2"])
                m_hat = st["m"] / (1 - group["b1"] ** st["t"])
                v_hat = st["v"] / (1 - group["b2"] ** st["t"])
                r = m_hat / (v_hat.sqrt() + group["eps"]) + group["wd"] * p
                w_norm, r_norm = p.norm(), r.norm()
                ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                p.sub_(group["lr"] * ratio * r)


class LarsReference(torch.optim.Optimizer):
    """LARS (You et al. 2017) in optax.lars's order: L2 decay, trust ratio, lr, momentum."""

    def __init__(self, params, lr, wd, coef, momentum):
        super().__init__(params, dict(lr=lr, wd=wd, coef=coef, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                d = p.grad + group["wd"] * p
                w_norm, d_norm = p.norm(), d.norm()
                ratio = group["coef"] * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(group["lr"] * ratio * d)
                p.sub_(buf)


def test_lamb_matches_paper():
    assert run_parity(optim.lamb(1e-2, weight_decay=0.1),
                      lambda p: LambReference(p, lr=1e-2, b1=0.9, b2=0.999, eps=1e-6, wd=0.1)) <= TOL


def test_lars_matches_paper():
    assert run_parity(optim.lars(0.5, weight_decay=0.01, trust_coefficient=0.01, momentum=0.9),
                      lambda p: LarsReference(p, lr=0.5, wd=0.01, coef=0.01, momentum=0.9)) <= TOL


# -- Muon -----------------------------------------------------------------------------------------


def _parity_2d(tx, make_opt, shapes, steps=STEPS):
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    start = tree.clone(params)
    ref = {k: nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make_opt(ref)
    state, worst = tx.init(params), 0.0
    for step in range(steps):
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for k, p in ref.items():
            p.grad = grads[k].clone()
        for o in (opt if isinstance(opt, list) else [opt]):
            o.step()
        worst = max(worst, max_rel_diff(params, {k: p.detach() for k, p in ref.items()}))
    assert max_rel_diff(params, start) > 10 * TOL
    return worst


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(nesterov):
    shapes = {"tall": (12, 5), "wide": (4, 9), "square": (6, 6)}
    tx = optim.partition({"m": optim.chain(optim.scale_by_muon(0.9, nesterov=nesterov),
                                           optim.add_decayed_weights(0.1), optim.scale_by_learning_rate(2e-2))},
                         lambda n, p: "m")
    worst = _parity_2d(tx, lambda ref: torch.optim.Muon(list(ref.values()), lr=2e-2, momentum=0.9,
                                                        nesterov=nesterov, weight_decay=0.1), shapes)
    assert worst <= TOL


def test_muon_alias_gives_the_rest_adamw():
    shapes = {"w": (8, 5), "bias": (8,), "scale": (3, 2, 2)}
    tx = optim.muon(2e-2, adam_weight_decay=0.01)

    def make(ref):
        return [torch.optim.Muon([ref["w"]], lr=2e-2),
                torch.optim.AdamW([ref["bias"], ref["scale"]], lr=2e-2, weight_decay=0.01)]

    assert _parity_2d(tx, make, shapes) <= TOL
    with pytest.raises(ValueError, match="2-D"):
        optim.scale_by_muon().init({"b": torch.zeros(3)})


# -- mu_dtype, freezing, named_chain --------------------------------------------------------------


def test_mu_dtype_bf16_matches_adamw_with_rounded_moment():
    tx = optim.adamw(1e-2, weight_decay=0.1)
    tx = optim.chain(optim.scale_by_adam(mu_dtype=torch.bfloat16), optim.add_decayed_weights(0.1),
                     optim.scale_by_learning_rate(1e-2))
    assert tx.init({"w": torch.zeros(2)})[0].mu["w"].dtype == torch.bfloat16

    def round_moment(step, state, opt):
        for st in opt.state.values():
            st["exp_avg"].copy_(st["exp_avg"].bfloat16().float())
        return state

    assert run_parity(tx, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), on_step=round_moment) <= TOL
    # and it is not plain AdamW (the rounding matters), so the test can fail
    assert run_parity(tx, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)) > TOL


def test_freezing_by_labels_matches_torch_on_trainable_subset():
    frozen = {"mat", "cube"}
    tx = optim.partition({"train": optim.adam(1e-2), "frozen": optim.set_to_zero()},
                         lambda name, p: "frozen" if name in frozen else "train")

    def make(params):  # torch sees every param, but only the trainable ones get gradients / steps
        return torch.optim.Adam(params[:2] + params[4:], lr=1e-2)

    worst = run_parity(tx, make)  # SHAPES order: scalar, vec, mat, cube, wide
    assert worst <= TOL


def test_named_chain_state_is_keyed_by_name_and_matches_chain():
    params = {"w": torch.randn(4)}
    g = {"w": torch.randn(4)}
    named = optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("adam", optim.adam(1e-2)))
    plain = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(1e-2))
    state = named.init(params)
    assert list(state) == ["clip", "adam"]
    u1, _ = named.update(g, state, params)
    u2, _ = plain.update(g, plain.init(params), params)
    assert torch.equal(u1["w"], u2["w"])
    with pytest.raises(ValueError, match="unique"):
        optim.named_chain(("a", optim.identity()), ("a", optim.identity()))


# -- MultiSteps, parameter EMA --------------------------------------------------------------------


def test_multisteps_matches_torch_with_averaged_gradients():
    k = 3
    tx = optim.MultiSteps(optim.adamw(1e-2, weight_decay=0.1), every_k_schedule=k).gradient_transformation()
    params = {"a": torch.randn(5, 3), "b": torch.randn(4)}
    start = tree.clone(params)
    ref = {n: nn.Parameter(v.clone()) for n, v in params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=1e-2, weight_decay=0.1)
    state, worst = tx.init(params), 0.0
    for step in range(10 * k):
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for n, p in ref.items():
            p.grad = grads[n] / k if p.grad is None else p.grad + grads[n] / k
        if step % k == k - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert bool(optim.MultiSteps(optim.identity(), k).has_updated(state))
        worst = max(worst, max_rel_diff(params, {n: p.detach() for n, p in ref.items()}))
    assert worst <= TOL and max_rel_diff(params, start) > 10 * TOL


def test_param_ema_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = nn.Linear(4, 3)
    ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    params = {n: p.detach().clone() + 0.5 for n, p in model.named_parameters()}  # differ from the module
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    tx = optim.with_param_ema(optim.sgd(0.1, 0.9), decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = tx.init(params)
    for step in range(STEPS):
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        ema_model.update_parameters(model)
        ours = optim.param_ema(state)
        theirs = {n: p.detach() for n, p in ema_model.module.named_parameters()}
        assert max_rel_diff(ours, theirs) <= TOL
    assert max_rel_diff(optim.param_ema(state), params) > 10 * TOL  # an average, not the params


# -- schedule-free, Prodigy -----------------------------------------------------------------------


def _with_train_mode(opt):
    opt.train()
    return opt


@pytest.mark.parametrize("ours, theirs", [
    (lambda: optim.schedule_free_adamw(1e-2),
     lambda p: __import__("schedulefree").AdamWScheduleFree(p, lr=1e-2, foreach=False)),
    (lambda: optim.schedule_free_adamw(1e-2, 0.8, 0.99, 1e-6, weight_decay=0.1, warmup_steps=5, r=0.5,
                                       weight_lr_power=1.5),
     lambda p: __import__("schedulefree").AdamWScheduleFreeReference(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6,
                                                                     weight_decay=0.1, warmup_steps=5, r=0.5,
                                                                     weight_lr_power=1.5)),
    (lambda: optim.schedule_free_sgd(0.1, 0.8, weight_decay=0.01, warmup_steps=3),
     lambda p: __import__("schedulefree").SGDScheduleFree(p, lr=0.1, momentum=0.8, weight_decay=0.01, warmup_steps=3)),
], ids=["adamw", "adamw_reference_all_options", "sgd"])
def test_schedule_free_matches_schedulefree_package(ours, theirs):
    tx = ours()
    opts = []

    def make(p):
        opts.append(_with_train_mode(theirs(p)))
        return opts[0]

    assert run_parity(tx, make) <= TOL
    # the averaged x sequence (what HF evaluates after optimizer.eval()) matches too
    params = {k: torch.randn(s) for k, s in {"a": (3, 2)}.items()}
    ref = [nn.Parameter(params["a"].clone())]
    opt = _with_train_mode(theirs(ref))
    state = tx.init(params)
    for step in range(STEPS):
        grads = make_grads(params, step)
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        ref[0].grad = grads["a"].clone()
        opt.step()
    opt.eval()
    assert max_rel_diff(optim.schedule_free_eval_params(state, params), {"a": ref[0].detach()}) <= TOL


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(weight_decay=0.1, use_bias_correction=True, d_coef=2.0, d0=1e-2),
    dict(weight_decay=0.1, decouple=False, safeguard_warmup=True, growth_rate=1.05, d0=1e-2),
    dict(betas=(0.0, 0.99), d0=1e-2),
], ids=str)
def test_prodigy_matches_prodigyopt(kwargs):
    from prodigyopt import Prodigy

    kw = dict(kwargs)
    b1, b2 = kw.pop("betas", (0.9, 0.999))
    tx = optim.prodigy(1.0, b1, b2, **kw)
    assert run_parity(tx, lambda p: Prodigy(p, lr=1.0, betas=(b1, b2), **kw)) <= TOL


class LookaheadReference:
    """Algorithm 1 of Zhang et al. 2019 ("Lookahead Optimizer: k steps forward, 1 step back")
    around a torch optimizer: slow weights copied at start; every k steps phi += alpha (theta - phi),
    theta = phi."""

    def __init__(self, inner, k, alpha):
        self.inner, self.k, self.alpha, self.t = inner, k, alpha, 0
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self):
        self.inner.step()
        self.t += 1
        if self.t % self.k == 0:
            fast = [p for g in self.inner.param_groups for p in g["params"]]
            for phi, theta in zip(self.slow, fast):
                phi.add_(theta - phi, alpha=self.alpha)
                theta.copy_(phi)


def test_lookahead_matches_paper():
    tx = optim.lookahead(optim.adam(1e-2), sync_period=4, slow_step_size=0.3)
    assert run_parity(tx, lambda p: LookaheadReference(torch.optim.Adam(p, lr=1e-2), 4, 0.3)) <= TOL
    assert run_parity(tx, lambda p: torch.optim.Adam(p, lr=1e-2)) > 1e-3  # lookahead really changes the path
