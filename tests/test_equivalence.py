"""The equivalence matrix: options that must not change the math, each against a reference run.

Every run takes 4 AdamW steps (clipping on, unevenly padded labels) from a state whose params
differ from the module's own tensors: the state is a copy and the module's own parameters are then
overwritten with NaN ("poisoned"), so anything that computes through them (a checkpointed region
recomputed in the backward, an eval or a generation through the module) shows as NaN instead of
silently using stale weights. (``copy=False`` cells cannot poison: there the module holds the
stale step-0 tensors from the second step on.)

Bitwise where the arithmetic is the same (activation checkpointing recomputes the same ops;
donation and ``copy`` only change where results are written; the Trainer runs the bare step);
a stated tolerance where it is not (accumulation changes the summation order, inductor fuses,
vmap batches the matmuls). Pairs of options that cannot combine assert the clear error.
Distributed cells (data parallel, sharded, each with checkpointing) are in
``tests/test_distributed.py::test_step_parity_ddp_and_sharded``.
"""

import pytest
import torch
from torch import nn

import functrain as ft
from functrain import population as P
from functrain.step.recompute import checkpoint_modules
from functrain.step.train import make_eval_step, make_train_step
from step_models import Block, TinyGPTForCausalLM, gpt2, lm_batch

STEPS = 4
ACCUMULATION_TOL = 1e-4  # fp32 summation order over 4 AdamW steps (measured 3e-5 on gpt2: Adam amplifies)
COMPILE_TOL = 1e-5  # inductor vs eager (measured ~1e-7)
VMAP_TOL = 1e-5  # vmapped population of one vs the ordinary step (measured ~1e-7)


class Deep(nn.Module):
    """Three tanh blocks and a classifier head: small enough to compile in seconds."""

    def __init__(self, d=16, classes=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(d, classes)

    def forward(self, x, labels=None):
        for b in self.blocks:
            x = b(x)
        logits = self.head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        return out


def _checkpoint_blocks(model):
    checkpoint_modules(model, lambda name, m: name.count(".") == 1 and name.startswith("blocks."))


MODELS = {
    # name: (build, enable activation checkpointing, batch i)
    "gpt2": (lambda: gpt2(dropout=0.0), lambda m: m.gradient_checkpointing_enable(),
             lambda i: lm_batch(seed=i, pad_rows={1: 3, 6: 14})),
    "tiny_gpt": (lambda: TinyGPTForCausalLM(layers=2, dropout=0.0), lambda m: checkpoint_modules(m, Block),
                 lambda i: lm_batch(seed=i, pad_rows={1: 3, 6: 14})),
    "deep": (Deep, _checkpoint_blocks, lambda i: _cls_batch(i)),
}


def _cls_batch(i, n=8, d=16):
    g = torch.Generator().manual_seed(i)
    labels = torch.randint(0, 4, (n,), generator=g)
    labels[[1, 2, 3]] = -100  # the first microbatch of 2 has 1 item, the second 4
    return {"x": torch.randn(n, d, generator=g), "labels": labels}


def build(name, ckpt=False):
    make, enable, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    if ckpt:
        enable(model)
    return model


def poison(model):
    """Overwrite the module's own parameters with NaN: any computation that reads them shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))


def _tx():
    return ft.optim.adamw(1e-2, weight_decay=0.1)


def run(name, *, ckpt=False, copy=True, accumulate=1, **step_kw):
    """4 steps from a fresh state; returns (params, losses)."""
    model = build(name, ckpt)
    tx = _tx()
    state = ft.TrainState.create(model, tx, copy=copy)
    if copy:
        poison(model)
    step = make_train_step(model, tx, accumulate=accumulate, max_grad_norm=1.0, **step_kw)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, MODELS[name][2](i))
        losses.append(metrics["loss"])
    return state.params, torch.stack(losses)


@pytest.fixture(scope="module")
def reference():
    """Eager, one microbatch, no checkpointing, no donation, copy=True: per model and accumulation."""
    cache = {}

    def get(name, accumulate=1):
        if (name, accumulate) not in cache:
            cache[name, accumulate] = run(name, accumulate=accumulate)
        return cache[name, accumulate]

    return get


def assert_bitwise(got, ref):
    assert ft.tree.tensors_equal(got[0], ref[0]), ft.tree.relative_difference(got[0], ref[0])
    assert torch.equal(got[1], ref[1])


# -- activation checkpointing, donation, copy: bitwise ---------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("name", ["gpt2", "tiny_gpt", "deep"])
def test_activation_checkpointing_is_bitwise(reference, name, accumulate):
    got = run(name, ckpt=True, accumulate=accumulate)
    assert torch.isfinite(got[1]).all(), "the recomputation read the module's own (poisoned) tensors"
    assert_bitwise(got, reference(name, accumulate))


@pytest.mark.parametrize("name", ["gpt2", "deep"])
def test_donation_with_checkpointing_is_bitwise(reference, name):
    assert_bitwise(run(name, ckpt=True, accumulate=2, donate=True), reference(name, 2))


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
def test_state_sharing_the_module_storage_is_bitwise(reference, donate):
    # copy=False: the state IS the module's storage at step 0; without donation the module keeps
    # the step-0 tensors from then on (stale), with donation it follows the state.
    assert_bitwise(run("gpt2", ckpt=True, copy=False, donate=donate), reference("gpt2"))


# -- accumulation, compile, populations: stated tolerances ----------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "deep"])
def test_accumulation_split(reference, name):
    got, ref = run(name, ckpt=True, accumulate=2), reference(name, 1)
    assert ft.tree.relative_difference(got[0], ref[0]) <= ACCUMULATION_TOL
    assert torch.allclose(got[1], ref[1], rtol=1e-6)


def test_compile_with_checkpointing_and_donation(reference):
    torch._dynamo.reset()
    got = run("deep", ckpt=True, compile=True, donate=True)
    torch._dynamo.reset()
    assert torch.isfinite(got[1]).all(), "the recomputation read the module's own (poisoned) tensors"
    assert ft.tree.relative_difference(got[0], reference("deep")[0]) <= COMPILE_TOL


# gpt2: the whole compiled step without checkpointing is 1.7e-5 from eager too (inductor's fused
# reductions, amplified by Adam as the accumulation order is), so its bound is ACCUMULATION_TOL.
@pytest.mark.parametrize("name, tol", [("deep", COMPILE_TOL), ("gpt2", ACCUMULATION_TOL)])
def test_compile_with_checkpointing_and_accumulation(reference, name, tol):
    # Compiled per microbatch forward (torch 2.13 cannot recompute two microbatches' regions in one
    # graph); its compiled backward recomputes from its saved inputs, not the poisoned module.
    torch._dynamo.reset()
    got = run(name, ckpt=True, compile=True, accumulate=2, donate=True)
    torch._dynamo.reset()
    assert torch.isfinite(got[1]).all(), "the recomputation read the module's own (poisoned) tensors"
    assert ft.tree.relative_difference(got[0], reference(name, 2)[0]) <= tol


def test_population_of_one_equals_the_ordinary_step(reference):
    model = build("deep")
    tx = _tx()
    stacked = P.stack_states([ft.TrainState.create(model, tx, copy=True)])
    poison(model)
    step = P.make_population_train_step(model, tx, accumulate=2, max_grad_norm=1.0)
    for i in range(STEPS):
        stacked, _ = step(stacked, _cls_batch(i))
    member = P.unstack_state(stacked, 1)[0]
    assert ft.tree.relative_difference(member.params, reference("deep", 2)[0]) <= VMAP_TOL


def test_population_with_checkpointing_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot run activation checkpointing"):
        P.make_population_train_step(build("deep", ckpt=True), _tx())


# -- reading through the module: eval, generation ---------------------------------------------------


def test_eval_and_generation_read_the_state_not_the_module():
    model = build("gpt2", ckpt=True)
    tx = _tx()
    state = ft.TrainState.create(model, tx, copy=True)
    clean = build("gpt2")
    poison(model)
    step = make_train_step(model, tx)
    for i in range(2):
        state, _ = step(state, lm_batch(seed=i))
    clean.load_state_dict({**state.params, "lm_head.weight": state.params["transformer.wte.weight"]})
    clean.eval()
    batch = lm_batch(seed=9)
    got = make_eval_step(model, return_outputs=True)(state, batch)
    with torch.no_grad():
        want = clean(**batch)
    assert torch.equal(got["loss"], want.loss) and torch.equal(got["outputs"], want.logits)
    from functrain.trainer.generation import generate_predictions

    prompt = {"input_ids": batch["input_ids"][:2, :4]}
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(generate_predictions(model, state, prompt, kwargs, pad_to_max_length=False),
                       clean.generate(**prompt, **kwargs))
