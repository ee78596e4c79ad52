"""The runner: any pure step over any pytree of states, hooks, exact resume, SIGTERM."""

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.data.loader import ResumableLoader
from functrain.io import checkpoint as ck
from functrain.runner import (
    Checkpoint, Evaluate, Hook, Jsonl, Log, Print, Profile, ProgressBar, StopWhen, TensorBoard, every,
)
from tests.step_models import MLP


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine: intra-op threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_rows(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, generator=g), "labels": torch.randint(0, 4, (), generator=g)} for _ in range(n)]


def make_setup(dropout=0.1):
    """Two models trained by one step: a pytree of states ({"a", "b"}), dropout drawn from each key."""
    torch.manual_seed(0)
    models = {"a": MLP(dropout=dropout), "b": MLP(dropout=dropout)}
    tx = ft.optim.adamw(ft.schedules.warmup_cosine(peak=1e-2, warmup=2, total=40))
    steps = {k: ft.make_train_step(m, tx) for k, m in models.items()}
    # Params differ from the modules' own tensors (copy=True, then perturbed).
    states = {k: ft.TrainState.create(m, tx, seed=i, copy=True) for i, (k, m) in enumerate(models.items())}
    states = {k: s.replace(params=ft.tree.map(lambda p: p + 0.01, s.params)) for k, s in states.items()}

    def step(state, batch):
        new, metrics = {}, {}
        for k in state:
            new[k], metrics[k] = steps[k](state[k], batch)
        return new, metrics

    return step, states, models


def loader(rows):
    return ResumableLoader(rows, 4, seed=3)


def test_run_trains_a_pytree_of_states_and_logs(tmp_path):
    step, states, models = make_setup()
    bar = ProgressBar()
    out = ft.run(step, states, loader(make_rows()), steps=20,
                 hooks=[Log(every=10), Jsonl(tmp_path / "m.jsonl"), Print(), bar])
    assert out.step == 20 and out.stop_reason is None and bar.bar.n == 20
    assert int(out.state["a"].step) == 20 and int(out.state["b"].step) == 20
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["step"] for r in rows] == [10, 20]
    assert {"a.loss", "b.loss", "a.grad_norm", "step_time"} <= set(rows[0])
    all_rows = ft.data.collators.default_data_collator(make_rows())
    for k in ("a", "b"):  # both trained: the loss over the whole data fell
        eval_step = ft.make_eval_step(models[k])
        assert float(eval_step(out.state[k], all_rows)["loss"]) < float(eval_step(states[k], all_rows)["loss"])


def test_run_equals_a_bare_loop():
    step, states, _ = make_setup()
    data = loader(make_rows())
    ref, it = states, iter(ResumableLoader(make_rows(), 4, seed=3))
    for _ in range(7):
        ref, _ = step(ref, next(it))
    out = ft.run(step, states, data, steps=7)
    assert ft.tree.tensors_equal(out.state, ref)


def _uninterrupted(tmp_path, steps):
    step, states, _ = make_setup()
    return ft.run(step, states, loader(make_rows()), steps=steps).state


class _KillAt(Hook):
    def __init__(self, at, how):
        self.at, self.how = at, how

    def on_step(self, run):
        if run.step == self.at:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("simulated crash")


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_interrupted_at_a_random_step_resumes_bitwise(tmp_path, how):
    total = 25  # 48 rows / 4 = 12 batches per epoch: the run crosses two epoch ends
    ref = _uninterrupted(tmp_path, total)
    at = random.Random(how).randrange(3, total - 2)
    step, states, _ = make_setup()
    hooks = [Checkpoint(tmp_path / "ck", every=4, keep=2), _KillAt(at, how)]
    if how == "crash":
        with pytest.raises(RuntimeError, match="simulated crash"):
            ft.run(step, states, loader(make_rows()), steps=total, hooks=hooks)
        expect = at - at % 4
    else:
        out = ft.run(step, states, loader(make_rows()), steps=total, hooks=hooks)
        assert out.stop_reason == "SIGTERM" and out.step == at
        expect = at  # SIGTERM saves the step it stopped at
    saved = ck.find_resumable_checkpoint(str(tmp_path / "ck"))
    assert saved.endswith(f"checkpoint-{expect}")
    step, fresh, _ = make_setup()  # a new process: fresh template, fresh loader
    ckpt = Checkpoint(tmp_path / "ck", every=4, keep=2)
    out = ft.run(step, fresh, loader(make_rows()), steps=total, hooks=[ckpt])
    assert ckpt.resumed_from == saved and out.step == total
    assert ft.tree.tensors_equal(out.state, ref)
    assert len(ck.checkpoint_dirs(str(tmp_path / "ck"))) == 2  # keep=2


def test_resume_restores_the_global_generators_and_hook_state(tmp_path):
    class Counter(Hook):
        def __init__(self):
            self.n = 0

        def on_step(self, run):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, d):
            self.n = d["n"]

    def noisy(i):  # data drawn from the global generator: resumed exactly only if it is restored
        return {"x": torch.randn(4, 8), "labels": torch.randint(0, 4, (4,))}

    step, states, _ = make_setup()
    torch.manual_seed(5)
    ref = ft.run(step, states, noisy, steps=6).state
    step, states, _ = make_setup()
    torch.manual_seed(5)
    ft.run(step, states, noisy, steps=3, hooks=[Checkpoint(tmp_path, every=3), Counter()])
    counter = Counter()
    step, states, _ = make_setup()
    torch.manual_seed(99)  # the new process's generator differs; the checkpoint's wins
    out = ft.run(step, states, noisy, steps=6, hooks=[Checkpoint(tmp_path, every=3), counter])
    assert ft.tree.tensors_equal(out.state, ref)
    assert counter.n == 6


def test_plain_iterable_resumes_by_skipping(tmp_path):
    batches = [ft.data.collators.default_data_collator(make_rows()[i:i + 4]) for i in range(0, 48, 4)]
    step, states, _ = make_setup()
    ref = ft.run(step, states, batches, steps=15).state  # a list is cycled: 12 batches, then again
    step, states, _ = make_setup()
    ft.run(step, states, batches, steps=15, hooks=[Checkpoint(tmp_path, every=5), StopWhen(lambda r: r.step == 10)])
    step, states, _ = make_setup()
    out = ft.run(step, states, batches, steps=15, hooks=[Checkpoint(tmp_path, every=5)])
    assert ft.tree.tensors_equal(out.state, ref)


def test_one_shot_iterator_ends_the_run():
    step, states, _ = make_setup()
    batches = (ft.data.collators.default_data_collator(make_rows()[i:i + 4]) for i in range(0, 12, 4))
    out = ft.run(step, states, batches, steps=10)
    assert out.step == 3 and out.stop_reason == "data exhausted"


def test_evaluate_logs_item_weighted_means(tmp_path):
    step, states, models = make_setup(dropout=0.0)
    eval_a = ft.make_eval_step(models["a"])
    val = [ft.data.collators.default_data_collator(make_rows(seed=1)[i:i + n]) for i, n in ((0, 4), (4, 2))]

    def eval_step(state, batch):
        return eval_a(state["a"], batch)

    logs = []
    out = ft.run(step, states, loader(make_rows()), steps=4,
                 hooks=[Evaluate(2, eval_step, val), every(1, lambda r: None),
                        StopWhen(lambda r: r.eval_metrics.get("eval_loss", 9) < 0, reason="never")])
    hooks_log = Hook()
    hooks_log.on_log = lambda run, l: logs.append((run.step, l))
    ev = Evaluate(1, eval_step, val)
    ev.evaluate(ft.runner.Run(state=out.state, steps=0, hooks=[hooks_log]))
    manual = [eval_a(out.state["a"], b) for b in val]
    expected = (float(manual[0]["loss"]) * 4 + float(manual[1]["loss"]) * 2) / 6
    assert logs[0][1]["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert out.eval_metrics["eval_loss"] > 0


def test_tensorboard_and_profile_write_files(tmp_path):
    pytest.importorskip("tensorboard")
    step, states, _ = make_setup()
    prof = Profile(tmp_path / "prof", start=2, steps=2)
    ft.run(step, states, loader(make_rows()), steps=6, hooks=[Log(every=2), TensorBoard(tmp_path / "tb"), prof])
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))
    trace = json.load(open(prof.path))
    assert prof.path.endswith("trace_steps_3-4.json") and trace["traceEvents"]


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    step, states, _ = make_setup()
    with pytest.raises(ValueError, match="steps must be an int"):
        ft.run(step, states, [], steps=-1)
    with pytest.raises(TypeError, match="hooks\\[0\\] is a function"):
        ft.run(step, states, [], steps=1, hooks=[lambda r: None])
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        Log(every=0)
    bad = {**states, "count": 3}
    with pytest.raises(TypeError, match="state leaf 'count' is a int"):
        ft.run(step, bad, [], steps=1, hooks=[Checkpoint(tmp_path, every=1)])
    assert not os.listdir(tmp_path)


def test_docs_runner_page_example_runs_trains_and_resumes(tmp_path, capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "runner.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("runs/ema", str(tmp_path / "ema"))
    code = code.replace("ft.step.compile_step(train_step)", "train_step")  # compiling: tests/test_recipes.py
    exec(compile(code, "docs/runner.md", "exec"), {})
    rows = [json.loads(line) for line in open(tmp_path / "ema" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(20, 201, 20))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert "200 None" in capsys.readouterr().out
    exec(compile(code, "docs/runner.md", "exec"), {})  # again: resumes at 200, nothing left to do
    assert len(open(tmp_path / "ema" / "metrics.jsonl").readlines()) == 10
    assert [s for s, _ in ck.checkpoint_dirs(str(tmp_path / "ema"))] == [100, 200]


def test_epoch_events_before_step_and_end_epoch():
    """Each pass over the data is an epoch; before_step sees the batch; end_epoch leaves the pass."""
    batches = [{"i": torch.tensor(i)} for i in range(3)]
    events = []

    class Recorder(Hook):
        def on_epoch_start(self, run):
            events.append(("start", run.epoch))

        def before_step(self, run):
            events.append(("batch", int(run.batch["i"])))

        def on_step(self, run):
            if run.step == 4:  # second epoch, after its first batch
                run.end_epoch()

        def on_epoch_end(self, run):
            events.append(("end", run.epoch))

    out = ft.run(lambda s, b: (s + b["i"], {}), torch.tensor(0), batches, steps=6, hooks=[Recorder()])
    assert events == [("start", 0), ("batch", 0), ("batch", 1), ("batch", 2), ("end", 0),
                      ("start", 1), ("batch", 0), ("end", 1),
                      ("start", 2), ("batch", 0), ("batch", 1), ("end", 2)]
    assert out.step == 6 and out.epoch == 3 and int(out.state) == 4
