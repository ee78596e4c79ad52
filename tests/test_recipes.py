"""The recipes in examples/ (GAN, distillation from a frozen / an EMA teacher, MAML): each trains
(the documented metric falls), is interrupted at a random step and resumes bitwise under the
runner, and compiles whole. MAML's meta-gradients are checked against plain autograd."""

import importlib.util
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.io import checkpoint as ck
from functrain.runner import Checkpoint, Hook, Jsonl, Log

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile imports a traced function's module by name
    spec.loader.exec_module(module)
    return module


gan, distill, maml = (load_example(n) for n in ("gan", "distill", "maml"))


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RECIPES = {
    "gan": lambda **kw: (*gan.build(0, **kw), gan.make_data(batch_size=32)),
    "distill_frozen": lambda **kw: (*distill.build_frozen(0, **kw), distill.make_data(batch_size=32)),
    "distill_ema": lambda **kw: (*distill.build_ema(0, **kw), distill.make_data(batch_size=32)),
    "maml": lambda **kw: (*maml.build(0, **kw)[:2], maml.make_data(tasks=4)),
}


def logged(tmp_path, name, steps, every):
    step, state, data = RECIPES[name]()
    out = ft.run(step, state, data, steps=steps, hooks=[Log(every=every), Jsonl(tmp_path / "m.jsonl")])
    import json

    return out, [json.loads(line) for line in open(tmp_path / "m.jsonl")]


# -- they train, as documented ---------------------------------------------------------------------


def test_gan_generator_moves_to_the_target(tmp_path):
    _, rows = logged(tmp_path, "gan", 200, 10)
    assert rows[0]["mean_error"] > 1.5
    assert min(r["mean_error"] for r in rows[-5:]) < 0.5  # adversarial training oscillates: best of the last 5


def test_distillation_from_a_frozen_teacher(tmp_path):
    out, rows = logged(tmp_path, "distill_frozen", 100, 10)
    assert rows[0]["loss"] > 0.3 and rows[-1]["loss"] < 0.15
    step, fresh, _ = RECIPES["distill_frozen"]()
    assert ft.tree.tensors_equal(out.state.buffers, fresh.buffers)  # the teacher never changed
    assert all(k.startswith("student.") for k in out.state.params)


def test_self_distillation_with_an_ema_teacher(tmp_path):
    _, rows = logged(tmp_path, "distill_ema", 100, 10)
    assert rows[0]["loss"] > 1.0 and rows[-1]["loss"] < 0.25
    # The teacher in the state is the EMA of the student's encoder: check one step by hand.
    step, state, data = RECIPES["distill_ema"]()
    new, _ = step(state, data(0))
    for k, t in state.buffers.items():
        if k.startswith("teacher."):
            s = new.params["encoder." + k[len("teacher."):]]
            torch.testing.assert_close(new.buffers[k], 0.99 * t + 0.01 * s)
    assert not ft.tree.tensors_equal(new.buffers, state.buffers)


def test_maml_held_out_loss_after_adaptation_falls(tmp_path):
    step, state, parts = maml.build(0)
    held_out = [maml.make_data(tasks=32, seed=99)(0)]
    out = ft.run(step, state, maml.make_data(), steps=200,
                 hooks=[ft.runner.Evaluate(200, parts["eval_step"], held_out)])
    before = ft.runner.Evaluate(1, parts["eval_step"], held_out).evaluate(ft.runner.Run(state=state, steps=0))
    assert before["eval_loss"] > 4.0
    assert out.eval_metrics["eval_loss"] < 0.75 * before["eval_loss"]
    assert out.eval_metrics["eval_loss"] < out.eval_metrics["eval_loss_before"] - 0.5  # adaptation helps


# -- MAML against plain autograd -------------------------------------------------------------------


def test_maml_meta_gradients_and_steps_match_plain_autograd():
    step, state, parts = maml.build(0, inner_steps=2)
    model, data = parts["model"], maml.make_data(tasks=3)
    state = state.replace(params=ft.tree.map(lambda p: p * 1.1 + 0.01, state.params))  # not the module's tensors
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in state.params.items()}
    opt = torch.optim.Adam(ref.values(), lr=3e-3)

    def autograd_meta_loss(params, batch, second_order=True):
        losses = []
        for t in range(batch["xs"].shape[0]):
            adapted = dict(params)
            for _ in range(2):  # the inner SGD steps, keeping the graph (second order)
                inner = torch.nn.functional.mse_loss(torch.func.functional_call(model, adapted, (batch["xs"][t],)),
                                                     batch["ys"][t])
                grads = torch.autograd.grad(inner, list(adapted.values()), create_graph=second_order)
                adapted = {k: p - 0.01 * g for (k, p), g in zip(adapted.items(), grads)}
            out = torch.func.functional_call(model, adapted, (batch["xq"][t],))
            losses.append(torch.nn.functional.mse_loss(out, batch["yq"][t]))
        return torch.stack(losses).mean()

    meta = torch.func.grad(parts["meta_loss"])(state.params, data(0))
    autograd_loss = autograd_meta_loss(ref, data(0))
    expected = torch.autograd.grad(autograd_loss, list(ref.values()))
    for (k, g), e in zip(meta.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=k)
    # Second order matters here: first-order MAML (inner gradients as constants) differs clearly.
    first_order = torch.autograd.grad(autograd_meta_loss(ref, data(0), second_order=False), list(ref.values()))
    assert ft.tree.relative_difference(list(first_order), list(expected)) > 1e-3
    for i in range(4):
        state, metrics = step(state, data(i))
        opt.zero_grad()
        loss = autograd_meta_loss(ref, data(i))
        loss.backward()
        opt.step()
        torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for k in ref:
        torch.testing.assert_close(state.params[k], ref[k].detach(), rtol=1e-5, atol=1e-6)


# -- interrupted at a random step, resumed bitwise ---------------------------------------------------


class _SigtermAt(Hook):
    def __init__(self, at):
        self.at = at

    def on_step(self, run):
        if run.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_interrupted_at_a_random_step_resumes_bitwise(tmp_path, name):
    total = 12
    step, state, data = RECIPES[name]()
    reference = ft.run(step, state, data, steps=total).state
    at = random.Random(name).randrange(2, total - 1)
    step, state, data = RECIPES[name]()
    stopped = ft.run(step, state, data, steps=total, hooks=[Checkpoint(tmp_path, every=5), _SigtermAt(at)])
    assert stopped.stop_reason == "SIGTERM" and stopped.step == at
    step, state, data = RECIPES[name]()  # as a new process would: fresh state, resumed from disk
    resumed = Checkpoint(tmp_path, every=5)
    out = ft.run(step, state, data, steps=total, hooks=[resumed])
    assert resumed.resumed_from == ck.checkpoint_path(str(tmp_path), at)
    assert ft.tree.tensors_equal(out.state, reference)


# -- compiled whole --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_compiles_whole_and_matches_eager(name):
    """fullgraph=True: a graph break fails the compile. The aot_eager backend traces forward and
    backward as inductor does, without generating kernels (quicker on 2 cores)."""
    torch._dynamo.reset()
    step, state, data = RECIPES[name](compile="aot_eager")
    eager, estate, _ = RECIPES[name]()
    for i in range(3):
        state, m = step(state, data(i))
        estate, em = eager(estate, data(i))
    assert ft.tree.relative_difference(state, estate) < 1e-5
    assert ft.tree.relative_difference(m, em) < 1e-5
