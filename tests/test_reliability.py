"""Reliability v2 (issue 15): every fault survived, every resume exact, no path outside the run trusted.

One section per cause of the issue; each test fails on the code before the fix.
"""

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from functrain.io import checkpoint as ck
from functrain.trainer.args import TrainingArguments, TrainingArgumentsError
from functrain.trainer.callbacks import ExportableState, TrainerCallback
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model, params_of

HERE = os.path.dirname(os.path.abspath(__file__))


def _args(out, **kw):
    base = dict(per_device_train_batch_size=4, num_train_epochs=2, learning_rate=5e-2, logging_steps=1,
                save_strategy="steps", save_steps=1, report_to="none", disable_tqdm=True, seed=7)
    base.update(kw)
    return TrainingArguments(str(out), **base)


def _trainer(out, data=None, collator=None, callbacks=None, model=None, **kw):
    return Trainer(model=model or make_model(), args=_args(out, **kw), train_dataset=data or make_dataset(n=16),
                   data_collator=collator, callbacks=callbacks)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(out):
    return [s for s, _ in ck.checkpoint_dirs(str(out))]


# -- 1. rotation, reused output_dir, overwrite_output_dir --------------------------------------------


def test_new_run_into_used_output_dir_is_refused_unless_overwrite(tmp_path):
    _trainer(tmp_path, max_steps=4, save_total_limit=2).train()
    assert _steps(tmp_path) == [3, 4]
    with pytest.raises(ValueError, match=r"checkpoint-3.*checkpoint-4.*overwrite_output_dir"):
        _trainer(tmp_path, max_steps=2, save_total_limit=2).train()
    assert _steps(tmp_path) == [3, 4]  # refused before anything changed
    t = _trainer(tmp_path, max_steps=2, save_total_limit=2, overwrite_output_dir=True)
    t.train()
    assert _steps(tmp_path) == [1, 2]  # the other run's checkpoints are gone, this run's kept
    assert ck.find_resumable_checkpoint(str(tmp_path)).endswith("checkpoint-2")


def test_resume_from_an_older_checkpoint_supersedes_the_newer_ones_loudly(tmp_path, caplog):
    ref = _trainer(tmp_path / "ref", max_steps=6)
    ref.train()
    out = tmp_path / "run"
    _trainer(out, max_steps=6).train()
    t = _trainer(out, max_steps=6, save_total_limit=2)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train(resume_from_checkpoint=ck.checkpoint_path(str(out), 3))
    assert "checkpoint-4 is newer than the checkpoint this run resumes from" in caplog.text
    assert _steps(out) == [5, 6]  # this run's own, not deleted by rotation
    assert sorted(n.split(".")[0] for n in os.listdir(out) if ".superseded-" in n) == [
        "checkpoint-4", "checkpoint-5", "checkpoint-6"]  # the earlier future, kept aside
    assert _same(params_of(t), params_of(ref))
    t = _trainer(out, max_steps=6, overwrite_output_dir=True)
    t.train(resume_from_checkpoint=ck.checkpoint_path(str(out), 5))
    assert _steps(out) == [5, 6] and _same(params_of(t), params_of(ref))  # checkpoint-6 deleted, then rewritten


# -- 2. one trainer per output_dir ----------------------------------------------------------------


_HOLDER = """
import sys, time
sys.path[:0] = [{here!r}, {root!r}]
from _trainer_fixtures import make_dataset, make_model
from functrain import Trainer, TrainingArguments, TrainerCallback
class Hold(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        print("holding", flush=True)
        time.sleep(600)
args = TrainingArguments({out!r}, per_device_train_batch_size=4, max_steps=2, save_strategy="no", report_to="none",
                         disable_tqdm=True)
Trainer(model=make_model(), args=args, train_dataset=make_dataset(n=16), callbacks=[Hold()]).train()
"""


def test_second_trainer_on_one_output_dir_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    out = str(tmp_path / "out")
    code = _HOLDER.format(here=HERE, root=os.path.dirname(HERE), out=out)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RuntimeError, match=rf"output_dir .* is in use by .*pid {holder.pid}"):
            _trainer(out, max_steps=2, save_strategy="no").train()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    t = _trainer(out, max_steps=2, save_strategy="no")  # the lock of a killed process does not block
    assert t.train().global_step == 2


# -- 3. random collators resume bitwise -----------------------------------------------------------


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _mlm_collator(kind):
    from functrain.data.collators import DataCollatorForLanguageModeling

    if kind == "functrain":
        return DataCollatorForLanguageModeling(pad_token_id=0, mlm=True, mask_token_id=4, vocab_size=32,
                                               mlm_probability=0.3)
    if kind == "functrain_seeded":
        return DataCollatorForLanguageModeling(pad_token_id=0, mlm=True, mask_token_id=4, vocab_size=32,
                                               mlm_probability=0.3, seed=5)
    import transformers
    from _tiny_tokenizer import make_tokenizer

    return transformers.DataCollatorForLanguageModeling(make_tokenizer(), mlm=True, mlm_probability=0.3)


def _mlm_rows():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 32, (int(torch.randint(4, 10, (), generator=g)),), generator=g).tolist()}
            for _ in range(16)]


@pytest.mark.parametrize("kind", ["functrain", "functrain_seeded", "transformers"])
def test_random_collator_resumes_bitwise(tmp_path, kind):
    kw = dict(max_steps=4, per_device_train_batch_size=4, save_steps=2, remove_unused_columns=False)
    ref = _trainer(tmp_path / "ref", data=_mlm_rows(), collator=_mlm_collator(kind), model=_bert(),
                   **{**kw, "save_strategy": "no"})
    ref.train()
    out = tmp_path / "run"
    _trainer(out, data=_mlm_rows(), collator=_mlm_collator(kind), model=_bert(), callbacks=[StopAt(3)], **kw).train()
    t = _trainer(out, data=_mlm_rows(), collator=_mlm_collator(kind), model=_bert(), **kw)
    t.train(resume_from_checkpoint=ck.checkpoint_path(str(out), 2))
    assert _same(params_of(t), params_of(ref))


# -- 4. save_strategy="epoch" and a stop in the middle of an epoch --------------------------------


def test_epoch_save_after_a_mid_epoch_stop_records_the_true_position(tmp_path):
    ref = _trainer(tmp_path / "ref", save_strategy="epoch")
    ref.train()  # 16 rows / 4 = 4 steps per epoch, 2 epochs
    out = tmp_path / "run"
    _trainer(out, save_strategy="epoch", callbacks=[StopAt(2)]).train()
    with open(os.path.join(ck.checkpoint_path(str(out), 2), ck.TRAINER_STATE_FILE)) as f:
        position = json.load(f)["data_position"]
    assert (position["epoch"], position["batch_index"]) == (0, 2)
    t = _trainer(out, save_strategy="epoch")
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 8
    assert _same(params_of(t), params_of(ref))


# -- 5. another optimizer -------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["lion", "sgd"])
def test_resume_into_another_optimizer_is_refused_naming_both(tmp_path, other):
    _trainer(tmp_path, max_steps=2, optim="adamw_torch", weight_decay=0.01).train()
    t = _trainer(tmp_path, max_steps=4, optim=other, weight_decay=0.01)
    with pytest.raises(ck.CheckpointError, match=rf"adamw_torch.*{other}"):
        t.train(resume_from_checkpoint=True)


# -- 6. no path outside the checkpoint is trusted -------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path):
    out = tmp_path / "out"
    t = _trainer(out, max_steps=2)
    t.train()
    return str(out), params_of(t)


def _relist(path, step):
    """Re-write a checkpoint's manifest after editing its files (as a tool would: a fresh listing)."""
    os.remove(os.path.join(path, ck.MANIFEST_FILE))
    ck.write_manifest(path, step=step, resumable=True)


def _rewrite_manifest(path, edit):
    with open(os.path.join(path, ck.MANIFEST_FILE)) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(os.path.join(path, ck.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)


def _list_outside_file(tmp_path, absolute):
    def edit(manifest):
        outside = tmp_path / "outside.bin"
        outside.write_bytes(b"not yours")
        rel = str(outside) if absolute else os.path.join("..", "..", "outside.bin")
        manifest["files"][rel] = ck.file_entry(str(outside))
    return edit


@pytest.mark.parametrize("case", ["dotdot", "absolute", "wrong_shape_files", "wrong_shape_entry"])
def test_bad_manifest_falls_back_to_the_previous_checkpoint(two_checkpoints, tmp_path, case, caplog):
    out, _ = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    edit = {
        "dotdot": _list_outside_file(tmp_path, absolute=False),
        "absolute": _list_outside_file(tmp_path, absolute=True),
        "wrong_shape_files": lambda m: m.update(files=list(m["files"])),
        "wrong_shape_entry": lambda m: m["files"].update({ck.MODEL_FILE: "deadbeef"}),
    }[case]
    _rewrite_manifest(newest, edit)
    with pytest.raises(ck.CheckpointError):
        ck.verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        assert ck.find_resumable_checkpoint(out) == ck.checkpoint_path(out, 1)
    assert "skipping checkpoint-2" in caplog.text


def test_symlinked_weights_pointing_outside_are_refused(two_checkpoints, tmp_path):
    out, _ = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    model_file = os.path.join(newest, ck.MODEL_FILE)
    outside = tmp_path / "weights.safetensors"
    os.rename(model_file, outside)
    os.symlink(outside, model_file)  # same bytes, so the checksum alone would pass
    with pytest.raises(ck.CheckpointError, match="not a regular file"):
        ck.verify_checkpoint(newest)
    assert ck.find_resumable_checkpoint(out) == ck.checkpoint_path(out, 1)


def test_unlisted_index_file_is_never_read(two_checkpoints, tmp_path):
    out, params = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    evil = tmp_path / "evil.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in params.items()}, str(evil))
    with open(os.path.join(newest, ck.MODEL_INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: os.path.join("..", "..", "evil.safetensors") for k in params}}, f)
    t = _trainer(out, max_steps=2)
    t.train(resume_from_checkpoint=newest)  # nothing left to train: the loaded params come back as they are
    assert _same(params_of(t), params)


def test_best_model_checkpoint_outside_output_dir_is_dropped(two_checkpoints, tmp_path, caplog):
    out, _ = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    state_file = os.path.join(newest, ck.TRAINER_STATE_FILE)
    with open(state_file) as f:
        state = json.load(f)
    state["best_model_checkpoint"] = str(tmp_path / "elsewhere" / "checkpoint-9")
    with open(state_file, "w") as f:
        json.dump(state, f)
    _relist(newest, 2)
    t = _trainer(out, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train(resume_from_checkpoint=newest)
    assert t.state.best_model_checkpoint is None
    assert "best_model_checkpoint" in caplog.text


def test_weights_resaved_sharded_resume_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    kw = dict(max_steps=4, save_steps=2, remove_unused_columns=False)

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))

    from functrain.data.collators import DataCollatorForLanguageModeling

    rows = [{"input_ids": r["input_ids"]} for r in _mlm_rows()]
    ref = _trainer(tmp_path / "ref", data=rows, collator=DataCollatorForLanguageModeling(pad_token_id=0), model=gpt2(),
                   **kw)
    ref.train()
    out = tmp_path / "run"
    _trainer(out, data=rows, collator=DataCollatorForLanguageModeling(pad_token_id=0), model=gpt2(),
             callbacks=[StopAt(2)], **kw).train()
    path = ck.checkpoint_path(str(out), 2)
    model = gpt2()
    ck.load_model_weights(model, path)
    os.remove(os.path.join(path, ck.MODEL_FILE))
    model.save_pretrained(path, max_shard_size="2KB")
    assert os.path.isfile(os.path.join(path, ck.MODEL_INDEX_FILE))
    ck.write_manifest(path, step=2, resumable=True)
    t = _trainer(out, data=rows, collator=DataCollatorForLanguageModeling(pad_token_id=0), model=gpt2(), **kw)
    t.train(resume_from_checkpoint=path)
    assert _same(params_of(t), params_of(ref))


# -- 7. non-finite values -------------------------------------------------------------------------


def _data_with_nan(at=5):
    data = make_dataset(n=16)
    data[at] = {**data[at], "x": torch.full_like(data[at]["x"], float("nan"))}
    return data


def test_nan_batch_skips_the_update_counts_it_and_warns(tmp_path, caplog):
    t = _trainer(tmp_path, data=_data_with_nan(), max_steps=8, save_strategy="no", logging_steps=4)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        out = t.train()
    assert all(torch.isfinite(v).all() for v in params_of(t).values())
    assert out.metrics["nonfinite_updates_skipped"] == 2  # the NaN example comes once per epoch
    assert "non-finite" in caplog.text and "skipped" in caplog.text


def test_nan_batch_with_stop_policy_stops_naming_the_step(tmp_path):
    t = _trainer(tmp_path, data=_data_with_nan(), max_steps=8, save_strategy="no", logging_steps=4,
                 non_finite_policy="stop")
    with pytest.raises(FloatingPointError, match=r"step \d"):
        t.train()


def test_checkpoint_with_non_finite_params_is_not_a_resume_target(two_checkpoints, caplog):
    out, _ = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    weights = load_file(os.path.join(newest, ck.MODEL_FILE))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, os.path.join(newest, ck.MODEL_FILE), metadata={"format": "pt"})
    _relist(newest, 2)
    ck.verify_checkpoint(newest)  # intact bytes: only the values are bad
    with pytest.raises(ck.CheckpointError, match=rf"non-finite.*{name}"):
        _trainer(out, max_steps=3).train(resume_from_checkpoint=newest)
    t = _trainer(out, max_steps=2, resume_allow_non_finite=True)
    t.train(resume_from_checkpoint=newest)
    assert torch.isnan(params_of(t)[name]).all()
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t = _trainer(out, max_steps=3)
        t.train(resume_from_checkpoint=True)  # falls back to checkpoint-1; the bad one is moved aside
    assert "non-finite" in caplog.text and t.state.global_step == 3
    assert _steps(out) == [1, 2, 3] and all(torch.isfinite(v).all() for v in params_of(t).values())


@pytest.mark.parametrize("field", ["weight_decay", "max_grad_norm", "adam_epsilon", "learning_rate",
                                   "num_train_epochs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hyperparameters_are_refused(tmp_path, field, value):
    with pytest.raises(TrainingArgumentsError, match=field):
        TrainingArguments(str(tmp_path), **{field: value})


# -- 8. smaller causes ----------------------------------------------------------------------------


def test_mixed_int_and_float_labels_are_not_truncated():
    from functrain.data.collators import default_data_collator

    batch = default_data_collator([{"x": [1.0], "labels": 1}, {"x": [2.0], "labels": 1.7}])
    assert batch["labels"].dtype == torch.float32 and batch["labels"][1].item() == pytest.approx(1.7)


def test_windows_without_supervised_items_warn(tmp_path, caplog):
    data = [{**row, "labels": -100} for row in make_dataset(n=16)]
    t = _trainer(tmp_path, data=data, max_steps=2, save_strategy="no", logging_steps=2)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train()
    assert "no supervised" in caplog.text


def test_resume_with_another_seed_keeps_the_data_order_and_warns(tmp_path, caplog):
    ref = _trainer(tmp_path / "ref", max_steps=6, seed=3)
    ref.train()
    out = tmp_path / "run"
    _trainer(out, max_steps=6, seed=3, callbacks=[StopAt(2)]).train()
    t = _trainer(out, max_steps=6, seed=4)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train(resume_from_checkpoint=True)
    assert "seed" in caplog.text
    assert _same(params_of(t), params_of(ref))


@pytest.mark.parametrize("kw, field", [
    ({"num_train_epochs": float("nan")}, "num_train_epochs"), ({"num_train_epochs": float("inf")}, "num_train_epochs"),
    ({"seed": "abc"}, "seed"), ({"data_seed": 1.5}, "data_seed"), ({"per_device_train_batch_size": 8.0}, "per_device_train_batch_size"),
    ({"gradient_accumulation_steps": 2.0}, "gradient_accumulation_steps"),
])
def test_bad_numbers_fail_at_construction(tmp_path, kw, field):
    with pytest.raises(TrainingArgumentsError, match=field):
        TrainingArguments(str(tmp_path), **kw)


class _KwargsModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model()

    def forward(self, x, labels=None, **kwargs):
        return self.inner(x, labels)


def test_extra_batch_keys_for_a_kwargs_model_are_reported(tmp_path, caplog):
    data = [{"x": row["x"], "labels": row["labels"], "extra": 1.0} for row in make_dataset(n=16)]
    t = Trainer(model=_KwargsModel(), args=_args(tmp_path, max_steps=2, save_strategy="no",
                                                   remove_unused_columns=False), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train()
    assert "'extra'" in caplog.text and "**kwargs" in caplog.text


class _Counter(TrainerCallback, ExportableState):
    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kw):
        self.count += 1

    def state(self):
        return {"args": {}, "attributes": {"count": self.count}}


def test_trainer_state_cannot_set_arbitrary_callback_attributes(two_checkpoints, caplog):
    out, _ = two_checkpoints
    newest = ck.checkpoint_path(out, 2)
    state_file = os.path.join(newest, ck.TRAINER_STATE_FILE)
    with open(state_file) as f:
        state = json.load(f)
    state["stateful_callbacks"] = {"_Counter": {"args": {}, "attributes": {"count": 2, "on_step_end": "boom"}}}
    with open(state_file, "w") as f:
        json.dump(state, f)
    _relist(newest, 2)
    counter = _Counter()
    t = _trainer(out, max_steps=3, callbacks=[counter])
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train(resume_from_checkpoint=newest)
    assert counter.count == 3 and callable(counter.on_step_end)
    assert "on_step_end" in caplog.text


# -- issue 13: ignore_data_skip, a changed global batch on resume ---------------------------------


class _Recording:
    def __init__(self):
        self.batches = []

    def __call__(self, features):
        from functrain.data.collators import default_data_collator

        batch = default_data_collator(features)
        self.batches.append(batch["x"].clone())
        return batch


def test_ignore_data_skip_starts_the_epoch_from_its_first_batch(tmp_path):
    _trainer(tmp_path, max_steps=4, callbacks=[StopAt(2)]).train()
    fresh, resumed = _Recording(), _Recording()
    _trainer(tmp_path / "fresh", collator=fresh, max_steps=4, save_strategy="no").train()
    t = _trainer(tmp_path, collator=resumed, max_steps=4, ignore_data_skip=True)
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 4
    # batches[0] is the first-batch check; then the resumed run reads epoch 0 from its start
    assert torch.equal(resumed.batches[1], fresh.batches[1]) and torch.equal(resumed.batches[2], fresh.batches[2])


def test_changed_global_batch_on_resume_warns_and_continues(tmp_path, caplog):
    data = make_dataset(n=24)
    _trainer(tmp_path, data=data, per_device_train_batch_size=3, max_steps=8, callbacks=[StopAt(2)]).train()
    t = _trainer(tmp_path, data=data, per_device_train_batch_size=4, max_steps=4)
    with caplog.at_level(logging.WARNING, logger="functrain"):
        t.train(resume_from_checkpoint=True)
    assert "global batch" in caplog.text and "seen twice" in caplog.text
    assert t.state.global_step == 4
    assert (t.state.data_position["epoch"], t.state.data_position["batch_index"]) == (0, 3)
