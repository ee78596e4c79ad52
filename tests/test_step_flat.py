"""flat=True: params and optimizer state in a few contiguous segments, the update over them.

Checked against the per-tensor step and torch.optim.AdamW (+ clip_grad_norm_ + LambdaLR) over 10
steps from a state whose params differ from the module's, with clipping and a weight-decay mask;
checkpoints move between flat and per-tensor states; the module's parameters stay views of the
state's storage; what flat cannot run is refused before anything changes."""

import copy

import pytest
import torch
from torch import nn

import functrain as ft
from functrain.core.flat import is_flat, plan_layout
from functrain.io import checkpoint as ckpt
from functrain.step.train import make_train_step
from step_models import moved_state

STEPS, LR, WD, TOTAL, MAX_NORM = 10, 3e-2, 0.1, 12, 0.5


class Net(nn.Module):
    """Weights (decayed) and LayerNorm/bias parameters (not decayed), interleaved."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def batches(n=STEPS):
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(6, 8, generator=g), "y": torch.randn(6, 4, generator=g)} for _ in range(n)]


def linear(count):
    return LR * (1.0 - count / TOTAL)


def adamw(model):
    return ft.optim.adamw(linear, weight_decay=WD, mask=ft.optim.default_weight_decay_mask(model))


def torch_reference(model, start_params, data):
    """AdamW with HF's decay groups, clip_grad_norm_ and LambdaLR, from ``start_params``."""
    model = copy.deepcopy(model)
    model.load_state_dict(start_params, strict=False)
    decay = ft.optim.masks.decay_parameter_names(model)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named.items() if n in decay], "weight_decay": WD},
                             {"params": [p for n, p in named.items() if n not in decay], "weight_decay": 0.0}], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: linear(k) / LR)
    norms = []
    for b in data:
        opt.zero_grad()
        loss_fn(model, b).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        sched.step()
    return {n: p.detach() for n, p in model.named_parameters()}, norms


@pytest.mark.parametrize("mode", ["pure", "donated", "donated_leafwise"])
def test_flat_step_equals_per_tensor_step_and_torch_adamw(mode):
    torch.manual_seed(0)
    model = Net()
    tx = adamw(model)
    data = batches()
    start = moved_state(model, tx, 0.1)
    per_tensor = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM)
    # donated_leafwise: an eager donated step updates a few segments at a time (less memory alive)
    flat = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM, donate=mode != "pure", flat=True,
                           leafwise_update=mode == "donated_leafwise")
    ref_params, ref_norms = torch_reference(model, start.params, data)
    a = start
    layout = plan_layout(start.params, tx, pieces=8 if mode == "donated_leafwise" else 1)
    b = ft.flat.flatten_state(ft.tree.clone(start), tx)
    b, _ = flat(b, data[0])  # (the leafwise step lays the state out in pieces on its first call)
    a, _ = per_tensor(a, data[0])
    assert is_flat(b.params, layout)
    assert len(layout.segments) == 2 if mode != "donated_leafwise" else len(layout.segments) > 2  # decayed / not
    data = data[1:]
    ref_norms = ref_norms[1:]
    norms = []
    for batch in data:
        a, m_a = per_tensor(a, batch)
        b, m_b = flat(b, batch)
        norms.append(float(m_b["grad_norm"]))
        assert torch.allclose(m_b["loss"], m_a["loss"], rtol=1e-6)
        assert torch.equal(m_b["learning_rate"], m_a["learning_rate"])
        assert is_flat(b.params, layout)
    assert any(n > MAX_NORM for n in norms), "the test should exercise clipping"
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert list(b.params) == list(a.params)  # same names, same order
    assert ft.tree.structure(b.opt_state) == ft.tree.structure(a.opt_state)
    assert ft.tree.relative_difference(b.params, a.params) <= 1e-6
    assert ft.tree.relative_difference(b.opt_state, a.opt_state) <= 1e-6
    assert ft.tree.relative_difference(b.params, ref_params) <= 1e-5
    assert int(b.step) == STEPS


@pytest.mark.parametrize("name", ["sgd_nesterov_clip_in_tx", "lion"])
def test_other_elementwise_optimizers_match_the_per_tensor_step(name):
    torch.manual_seed(0)
    model = Net()
    tx = {"sgd_nesterov_clip_in_tx": ft.optim.chain(ft.optim.clip_by_global_norm(0.3),
                                                    ft.optim.sgd(0.05, momentum=0.9, nesterov=True)),
          "lion": ft.optim.lion(1e-3, weight_decay=0.01, mask=ft.optim.default_weight_decay_mask(model))}[name]
    a = moved_state(model, tx, 0.1)
    b = ft.tree.clone(a)
    per_tensor = make_train_step(model, tx, loss_fn)
    flat = make_train_step(model, tx, loss_fn, donate=True, flat=True)
    for batch in batches(6):
        a, _ = per_tensor(a, batch)
        b, _ = flat(b, batch)  # not flat yet: laid out on the first call
    assert is_flat(b.params, plan_layout(b.params, tx))
    assert ft.tree.relative_difference(b.params, a.params) <= 1e-6


def test_module_parameters_stay_views_of_the_state_after_each_donated_step():
    torch.manual_seed(0)
    model = Net()
    tx = adamw(model)
    state = ft.flat.flatten_state(moved_state(model, tx, 0.1), tx, model)
    step = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM, donate=True, flat=True)
    ptrs = [t.data_ptr() for t in ft.tree.leaves((state.params, state.opt_state))]
    x = batches(1)[0]["x"]
    for batch in batches(4):
        state, _ = step(state, batch)
        for name, p in model.named_parameters():
            assert p.data_ptr() == state.params[name].data_ptr() and torch.equal(p, state.params[name]), name
        bound = torch.func.functional_call(model, dict(state.params), (x,))
        assert torch.equal(model(x), bound)  # the module computes with the current params
    assert [t.data_ptr() for t in ft.tree.leaves((state.params, state.opt_state))] == ptrs  # updated in place


def test_checkpoints_move_between_flat_and_per_tensor_states(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tx = adamw(model)
    per_tensor = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM)
    flat = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM, donate=True, flat=True)
    data = batches(6)
    a = moved_state(model, tx, 0.1)
    b = ft.flat.flatten_state(ft.tree.clone(a), tx)
    for batch in data[:3]:
        a, _ = per_tensor(a, batch)
        b, _ = flat(b, batch)
    saved_flat = ckpt.save_tree_checkpoint(str(tmp_path / "flat"), 3, b, {"step": 3})
    saved_plain = ckpt.save_tree_checkpoint(str(tmp_path / "plain"), 3, a, {"step": 3})
    with ckpt.open_safetensors(f"{saved_flat}/{ckpt.STATE_FILE}") as f, \
            ckpt.open_safetensors(f"{saved_plain}/{ckpt.STATE_FILE}") as g:
        assert set(f.keys()) == set(g.keys())  # same files: same names and shapes
        assert all(f.get_slice(k).get_shape() == g.get_slice(k).get_shape() for k in f.keys())
    template = ft.TrainState.create(model, tx, copy=True)
    from_flat, _ = ckpt.load_tree(saved_flat, template)  # flat -> per-tensor
    from_plain, _ = ckpt.load_tree(saved_plain, ft.flat.flatten_state(template, tx))  # per-tensor -> flat step
    assert ft.tree.tensors_equal(from_flat, b)
    for batch in data[3:]:
        a, _ = per_tensor(a, batch)
        from_flat, _ = per_tensor(from_flat, batch)
        from_plain, _ = flat(from_plain, batch)
    assert ft.tree.relative_difference(from_flat.params, a.params) <= 1e-6
    assert ft.tree.relative_difference(from_plain.params, a.params) <= 1e-6


def test_what_flat_cannot_run_is_refused_before_the_state_changes():
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(ValueError, match="populations"):
        make_train_step(model, adamw(model), loss_fn, flat=True, differentiate="func")
    with pytest.raises(ValueError, match="sharded"):
        make_train_step(model, adamw(model), loss_fn, flat=True, param_transform=lambda p, has_items: p)
    shape_labels = ft.optim.partition({"a": ft.optim.sgd(0.1), "b": ft.optim.adam(1e-3)},
                                      lambda n, x: "a" if x.ndim == 2 else "b")
    refused = {"lamb": (ft.optim.lamb(1e-3), "elementwise"),
               "adafactor": (ft.optim.adafactor(), "elementwise"),
               "labels by shape": (shape_labels, "shape"),
               "mask pytree": (ft.optim.adamw(1e-3, mask={n: "bias" not in n for n, _ in model.named_parameters()}),
                               "functions of the params")}
    for name, (tx, message) in refused.items():
        state = ft.TrainState.create(model, tx, copy=True)
        before = ft.tree.clone(state.params)
        step = make_train_step(model, tx, loss_fn, donate=True, flat=True)
        with pytest.raises(ValueError, match=message):
            step(state, batches(1)[0])
        assert not state.consumed and ft.tree.tensors_equal(state.params, before), name


@pytest.mark.slow
def test_compiled_donated_flat_step_matches_the_per_tensor_step():
    torch.manual_seed(0)
    model = Net()
    tx = adamw(model)
    a = moved_state(model, tx, 0.1)
    b = ft.flat.flatten_state(ft.tree.clone(a), tx, model)
    # (the reference is the compiled donated per-tensor step: compiled donated steps of both kinds
    # leave the schedule's next learning rate in the state's learning_rate leaf, eager ones the
    # one just used; the params agree)
    # Both run the gradients compiled and the update in place after the graph (flat: the fused
    # AdamW kernel over each segment); checked against torch.optim.AdamW too.
    per_tensor = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM, donate=True, compile=True)
    flat = make_train_step(model, tx, loss_fn, max_grad_norm=MAX_NORM, donate=True, flat=True, compile=True)
    data = batches()
    ref_params, ref_norms = torch_reference(model, a.params, data)
    storages = [p.untyped_storage().data_ptr() for p in ft.tree.leaves((b.params, b.opt_state))]
    for batch, ref_norm in zip(data, ref_norms):
        a, m_a = per_tensor(a, batch)
        b, m_b = flat(b, batch)
        assert torch.allclose(m_b["grad_norm"], m_a["grad_norm"], rtol=1e-5)
        assert float(m_b["grad_norm"]) == pytest.approx(ref_norm, rel=1e-5)
        assert all(p.data_ptr() == b.params[n].data_ptr() for n, p in model.named_parameters())
    # written in place: the segments the state started with still hold it
    assert [p.untyped_storage().data_ptr() for p in ft.tree.leaves((b.params, b.opt_state))] == storages
    assert ft.tree.relative_difference(b.params, a.params) <= 1e-5
    assert ft.tree.relative_difference(b.opt_state, a.opt_state) <= 1e-5
    assert ft.tree.relative_difference(b.params, ref_params) <= 1e-5
    assert int(b.step) == STEPS
