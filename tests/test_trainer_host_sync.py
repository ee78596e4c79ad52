"""Trainer.train() reads no tensor on the host except on logging steps (issue 8, target 6).

Every host read of a tensor's value (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``index``,
``numpy``) is a device sync on an accelerator. They are counted by patching those methods while
``Trainer.train()`` runs, and attributed to the step they happen in (a callback marks the
phases). Reads by host-only code are allowed: the RNG key lives on the CPU by design
(``functrain/core/rng.py``) and the sampler's index tensors are CPU data (``functrain/data/``), so
reading them never waits for a device. The last step may read (the end-of-training summary).
"""

import sys

import pytest
import torch
from torch import nn

import functrain
from functrain import Trainer, TrainerCallback, TrainingArguments

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 8))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class Phases(TrainerCallback):
    """Marks where the loop is: inside step k (begin..end) or after step k (logging/saving)."""

    def __init__(self):
        self.where = ("setup", 0)

    def on_step_begin(self, args, state, control, **kw):
        self.where = ("step", state.global_step + 1)

    def on_step_end(self, args, state, control, **kw):
        self.where = ("after", state.global_step)

    def on_train_end(self, args, state, control, **kw):
        self.where = ("end", state.global_step)


class ReadEveryStep(TrainerCallback):
    """A deliberately bad callback: reads the step counter on the host every step."""

    def on_step_end(self, args, state, control, train_state=None, **kw):
        int(train_state.step)


def _rows(n=48):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, generator=g), "labels": torch.randn(8, generator=g)} for _ in range(n)]


def _host_only(filename: str) -> bool:
    path = filename.replace("\\", "/")
    return path.endswith("functrain/core/rng.py") or "functrain/data/" in path


def record_host_reads(monkeypatch, phases):
    """Patch the host-read methods; return the list of (phase, step, caller) they append to."""
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, __original=original, __name=name, **kw):
            caller = sys._getframe(1)
            if not _host_only(caller.f_code.co_filename):
                reads.append((*phases.where, __name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
            return __original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


def train_and_record(monkeypatch, tmp_path, compile_, extra_callbacks=()):
    phases = Phases()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=7, logging_steps=3,
                             save_strategy="no", disable_tqdm=True, torch_compile=compile_, seed=0)
    trainer = Trainer(model=TinyRegressor(), args=args, train_dataset=_rows(),
                      callbacks=[phases, *extra_callbacks])
    reads = record_host_reads(monkeypatch, phases)
    trainer.train()
    monkeypatch.undo()
    return reads


def _assert_only_on_logging_steps(reads, logging_steps=3, max_steps=7, first_step_compiles=False):
    # Compiling (step 1) constant-folds on fake tensors, which calls item(): not a run-time read.
    inside = [r for r in reads if r[0] == "step" and not (first_step_compiles and r[1] == 1)]
    assert not inside, f"host reads inside the step: {inside}"
    after = {r[1] for r in reads if r[0] == "after"}
    allowed = {s for s in range(1, max_steps + 1) if s % logging_steps == 0} | {max_steps}
    assert after <= allowed, \
        f"host reads after non-logging steps: {[r for r in reads if r[0] == 'after' and r[1] not in allowed]}"
    assert after, "expected host reads on the logging steps (the loss is read there)"  # the hook works


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_no_host_read_outside_logging_steps(monkeypatch, tmp_path, compile_):
    reads = train_and_record(monkeypatch, tmp_path, compile_)
    _assert_only_on_logging_steps(reads, first_step_compiles=compile_)


def test_the_detector_catches_a_per_step_read(monkeypatch, tmp_path):
    reads = train_and_record(monkeypatch, tmp_path, False, [ReadEveryStep()])
    bad = sorted({r[1] for r in reads if r[0] == "after" and r[1] % 3})
    assert bad == [1, 2, 4, 5, 7]  # 7 also reads for the summary
    with pytest.raises(AssertionError, match="non-logging"):
        _assert_only_on_logging_steps(reads)


def test_functrain_exports_trainer_callback():  # the test's own precondition, checked explicitly
    assert functrain.TrainerCallback is TrainerCallback


class TinyTokenRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)

    def forward(self, input_ids, attention_mask, labels=None):
        pooled = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        return {"loss": nn.functional.mse_loss(pooled, labels), "logits": pooled}


def test_non_padding_token_count_is_read_only_on_logging_steps(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(48):
        mask = torch.zeros(6, dtype=torch.long)
        mask[: 1 + i % 6] = 1  # 1..6 real tokens, the rest padding
        rows.append({"input_ids": torch.randint(0, 20, (6,), generator=g), "attention_mask": mask,
                     "labels": torch.randn(8, generator=g)})
    phases = Phases()
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=12, logging_steps=3,
                             save_strategy="no", disable_tqdm=True, seed=0, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=TinyTokenRegressor(), args=args, train_dataset=rows, callbacks=[phases])
    reads = record_host_reads(monkeypatch, phases)
    out = trainer.train()
    monkeypatch.undo()
    _assert_only_on_logging_steps(reads, logging_steps=3, max_steps=12)
    # 12 steps x 4 rows = one pass over all 48 rows: every real token counted once, padding not.
    expected = sum(int(r["attention_mask"].sum()) for r in rows)
    assert out.metrics["num_input_tokens_seen"] == expected == trainer.state.num_input_tokens_seen
    assert expected < 48 * 6
