"""Trainer cells of the equivalence matrix (tiny GPT-2, dropout 0, CPU fp32).

- ``gradient_checkpointing=True``: within 2e-5 of transformers' Trainer with it over 8 steps, and
  bitwise equal to our own run without it;
- the Trainer equals the bare step it builds (same optimizer, same windows), bitwise;
- a run resumed from a checkpoint with checkpointing on (the fresh module's own tensors are then
  NOT the state's) equals the uninterrupted run, bitwise;
- ``torch_compile=True``: within 2e-5 of transformers' Trainer over 8 steps;
- ``full_determinism=True`` with ``torch_compile=True``: repeatable and resumable bitwise, and the
  compiled code has no thread-order-dependent ``atomic_add`` (the default compiled mode has).
"""

import pytest
import torch

import functrain as ft
from functrain import Trainer, TrainingArguments
from step_models import gpt2

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _dataset(n=8, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=g)
    labels = ids.clone()
    # The first label is never predicted (the loss shifts): masking it makes transformers' item
    # count (all labels != -100) equal to the loss's (and ours); otherwise HF divides by 16, not 15.
    labels[:, 0] = -100
    return [{"input_ids": row, "labels": lab} for row, lab in zip(ids, labels)]


def _args(cls, out, **kw):
    # One window = the whole dataset, so the HF Trainer's and ours see the same 8 rows per step
    # whatever order their samplers pick (the mean over the window does not depend on it).
    base = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8, learning_rate=1e-2,
                weight_decay=0.1, warmup_steps=2, max_grad_norm=1.0, logging_steps=4, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=3)
    base.update(kw)
    if cls is transformers.TrainingArguments:
        base.update(use_cpu=True, dataloader_drop_last=False)
    return cls(str(out), **base)


def _ours(out, callbacks=None, **kw):
    torch.manual_seed(0)
    trainer = Trainer(model=gpt2(), args=_args(TrainingArguments, out, **kw), train_dataset=_dataset(),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _params(_ours(tmp_path_factory.mktemp("plain")).model)


@pytest.mark.slow
def test_gradient_checkpointing_matches_transformers_trainer(tmp_path, plain):
    ours = _params(_ours(tmp_path / "ours", gradient_checkpointing=True).model)
    torch.manual_seed(0)
    model = gpt2()
    hf = transformers.Trainer(model=model, args=_args(transformers.TrainingArguments, tmp_path / "hf",
                                                      gradient_checkpointing=True),
                              train_dataset=_dataset())
    hf.train()
    assert hf.state.global_step == 8
    diff = ft.tree.relative_difference(ours, _params(model))
    assert diff <= 2e-5, diff
    assert ft.tree.tensors_equal(ours, plain), ft.tree.relative_difference(ours, plain)


def test_trainer_equals_the_bare_step_it_builds(tmp_path, plain):
    torch.manual_seed(0)
    model = gpt2()
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path), train_dataset=_dataset())
    tx = trainer.create_optimizer_and_scheduler(8)
    state = ft.TrainState.create(model, tx, seed=3, copy=True)
    # As the Trainer builds it: donated, leafwise (AdamW through torch's fused kernel), skipping non-finite windows.
    step = ft.make_train_step(model, tx, accumulate=2, max_grad_norm=1.0, donate=True, leafwise_update=True,
                              skip_non_finite=True)
    loader = trainer.get_train_dataloader()
    for epoch in range(8):
        for window in loader.iter_from(epoch, 0):
            state, _ = step(state, window)
    assert int(state.step) == 8
    assert ft.tree.tensors_equal(state.params, {k: v for k, v in plain.items() if k in state.params})


class StopAt(ft.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop = state.global_step == self.step


def test_resumed_with_checkpointing_equals_uninterrupted(tmp_path, plain):
    _ours(tmp_path, callbacks=[StopAt(4)], gradient_checkpointing=True, save_strategy="steps", save_steps=4)
    torch.manual_seed(1)  # a fresh module whose own tensors are not the checkpoint's
    trainer = Trainer(model=gpt2(), args=_args(TrainingArguments, tmp_path, gradient_checkpointing=True),
                      train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert ft.tree.tensors_equal(_params(trainer.model), plain)


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class BigramLM(torch.nn.Module):
    """An embedding and a head: the smallest model whose backward has an accumulating scatter."""

    def __init__(self, vocab=64, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def _embedding_model():
    torch.manual_seed(0)
    return BigramLM()


def _bigram_run(out, callbacks=None, resume=None, **kw):
    trainer = Trainer(model=_embedding_model(), args=_args(TrainingArguments, out, **kw), train_dataset=_dataset(),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return _params(trainer.model)


@pytest.mark.slow
def test_full_determinism_compiled_is_repeatable_and_resumable(tmp_path, restore_determinism):
    kw = dict(torch_compile=True, full_determinism=True, max_steps=6, logging_steps=3)
    runs = []
    for name in ("a", "b"):
        torch._dynamo.reset()
        runs.append(_bigram_run(tmp_path / name, **kw))
    assert ft.tree.tensors_equal(runs[0], runs[1])
    torch._dynamo.reset()
    _bigram_run(tmp_path / "r", callbacks=[StopAt(3)], save_strategy="steps", save_steps=3, **kw)
    torch._dynamo.reset()
    resumed = _bigram_run(tmp_path / "r", resume=str(tmp_path / "r" / "checkpoint-3"), **kw)
    torch._dynamo.reset()
    assert ft.tree.tensors_equal(resumed, runs[0])


def test_deterministic_step_compiles_without_atomic_adds():
    """The cause of non-repeatable compiled runs: inductor lowers the embedding backward (an
    accumulating scatter) to ``atomic_add`` inside loops split over threads; deterministic=True
    falls back to aten's deterministic kernel."""
    from torch._inductor.utils import run_and_get_code

    codes = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # atomic adds appear only in loops split over threads (another test may set 1)
    # Fresh code generation: a cache hit (an earlier test compiled the same graph) returns no source.
    no_caches = (torch._inductor.config.patch(fx_graph_cache=False),
                 torch._functorch.config.patch(enable_autograd_cache=False))
    for deterministic in (False, True):
        torch._dynamo.reset()
        model = _embedding_model()
        tx = ft.optim.sgd(0.1)
        step = ft.make_train_step(model, tx, compile=True, deterministic=deterministic)
        state = ft.TrainState.create(model, tx, copy=True)
        batch = _dataset()[0]
        batch = {k: v[None] for k, v in batch.items()}
        with no_caches[0], no_caches[1]:
            _, code = run_and_get_code(step, state, batch)
        codes[deterministic] = "\n".join(code)
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    assert "atomic_add" in codes[False]
    assert "atomic_add" not in codes[True]
    assert not torch.are_deterministic_algorithms_enabled()  # the step put the process-wide flag back


class ReadsTheModel(ft.TrainerCallback):
    """What HF callbacks do with their ``model`` argument: read it between steps."""

    def __init__(self):
        self.stale = []

    def on_step_end(self, args, state, control, model=None, train_state=None, **kw):
        params = dict(model.named_parameters())
        self.stale += [k for k, v in train_state.params.items() if not torch.equal(params[k], v)]


def test_callbacks_read_the_state_through_the_model(tmp_path):
    reader = ReadsTheModel()
    _ours(tmp_path, callbacks=[reader], max_steps=3)
    assert reader.stale == []


@pytest.mark.slow
def test_compiled_trainer_matches_transformers_trainer(tmp_path):
    """torch_compile=True: the window gradients are compiled and AdamW runs after the graph, in
    place, a group of parameters at a time (one copy of the state); same numbers as HF's Trainer."""
    torch._dynamo.reset()
    ours = _ours(tmp_path / "ours", torch_compile=True)
    assert ours.state.global_step == 8
    torch.manual_seed(0)
    model = gpt2()
    transformers.Trainer(model=model, args=_args(transformers.TrainingArguments, tmp_path / "hf"),
                         train_dataset=_dataset()).train()
    diff = ft.tree.relative_difference(_params(ours.model), _params(model))
    assert diff <= 2e-5, diff
    torch._dynamo.reset()


def _trained(out, dropout, **kw):
    torch.manual_seed(0)
    trainer = Trainer(model=gpt2(dropout=dropout), args=_args(TrainingArguments, out, **kw), train_dataset=_dataset())
    trainer.train()
    return trainer


@pytest.mark.slow
def test_compiled_gradient_checkpointing_with_accumulation_matches_transformers_trainer(tmp_path, plain):
    """``torch_compile=True`` + ``gradient_checkpointing=True`` + 2 accumulation steps (torch 2.13
    cannot put both microbatches' recomputation in one graph: the forward is compiled per microbatch)."""
    torch._dynamo.reset()
    ours = _params(_trained(tmp_path / "ours", 0.0, gradient_checkpointing=True, torch_compile=True).model)
    torch.manual_seed(0)
    model = gpt2()
    hf = transformers.Trainer(model=model, args=_args(transformers.TrainingArguments, tmp_path / "hf",
                                                      gradient_checkpointing=True, torch_compile=True),
                              train_dataset=_dataset())
    hf.train()
    assert ft.tree.relative_difference(ours, _params(model)) <= 2e-5
    assert ft.tree.relative_difference(ours, plain) <= 2e-5


@pytest.mark.slow
def test_compiled_gradient_checkpointing_with_dropout_equals_the_eager_run(tmp_path):
    """GPT-2's default dropout inside checkpointed blocks, compiled, accumulating: the eager run's
    numbers (inductor drawing its random numbers through aten, so the masks are the same)."""
    torch._dynamo.reset()
    eager = _trained(tmp_path / "eager", 0.1)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = _trained(tmp_path / "compiled", 0.1, gradient_checkpointing=True, torch_compile=True)
    losses = [h["loss"] for h in compiled.state.log_history if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in eager.state.log_history if "loss" in h], rel=1e-5)
    assert ft.tree.relative_difference(_params(compiled.model), _params(eager.model)) <= 1e-5
