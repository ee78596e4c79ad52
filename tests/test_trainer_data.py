"""Trainer data in / predictions out (issue 5): dict eval sets, compute_metrics with
preprocess_logits_for_metrics, streaming metrics, and clear errors raised before anything runs."""

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from functrain import Trainer, TrainerCallback, TrainingArguments
from functrain.data.collators import CollateError, DataCollatorForLanguageModeling
from functrain.core.metrics import Accuracy
from tests._trainer_fixtures import make_dataset, make_model

transformers = pytest.importorskip("transformers")


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2, save_strategy="no",
                report_to="none", disable_tqdm=True)
    return TrainingArguments(str(tmp_path / "out"), **{**base, **kw})


class _Events(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kw):
        self.events.append("train_begin")


# -- evaluate() with a dict of datasets ------------------------------------------------------------


def test_evaluate_dict_of_datasets_prefixes_and_by_name(tmp_path):
    sets = {"a": make_dataset(n=7, seed=3), "b": make_dataset(n=5, seed=4)}
    t = Trainer(model=make_model(), args=_args(tmp_path, eval_strategy="steps", eval_steps=2), train_dataset=make_dataset(),
                eval_dataset=sets)
    alone = {name: t.evaluate(ds)["eval_loss"] for name, ds in sets.items()}
    metrics = t.evaluate()
    assert metrics["eval_a_loss"] == pytest.approx(alone["a"]) and metrics["eval_b_loss"] == pytest.approx(alone["b"])
    assert alone["a"] != pytest.approx(alone["b"])
    assert not any(k.startswith("eval_loss") for k in metrics)
    assert set(t.evaluate("b")) >= {"eval_b_loss", "eval_b_runtime"} and "eval_a_loss" not in t.evaluate("b")
    with pytest.raises(KeyError, match=r"no set of that name \(named sets: \['a', 'b'\]\)"):
        t.evaluate("c")
    assert len(t.get_eval_dataloader("b").dataset) == 5  # a name picks the set, as in transformers
    with pytest.raises(KeyError, match="no set of that name"):
        t.get_eval_dataloader("c")
    t.train()  # evaluation during training logs one entry per set
    logged = [h for h in t.state.log_history if any(k.startswith("eval_") for k in h)]
    assert any("eval_a_loss" in h for h in logged) and any("eval_b_loss" in h for h in logged)


# -- compute_metrics + preprocess_logits_for_metrics, streaming metrics ---------------------------


def _lm_and_data(vocab=32):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    rng = np.random.default_rng(0)
    rows = [{"input_ids": [int(t) for t in rng.integers(1, vocab, size=int(rng.integers(2, 12)))]} for _ in range(11)]
    return model, rows


def test_preprocess_logits_for_metrics_and_streaming_metrics_agree_with_direct(tmp_path):
    model, rows = _lm_and_data()
    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    seen = {}

    def compute_metrics(p):
        seen["pred"], seen["labels"] = p.predictions, p.label_ids
        preds, labels = p.predictions[:, :-1], p.label_ids[:, 1:]
        valid = labels != -100
        return {"acc": float((preds[valid] == labels[valid]).mean())}

    t = Trainer(model=model, args=_args(tmp_path), data_collator=collator, compute_metrics=compute_metrics,
                preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
                streaming_metrics=lambda batch, logits: {"stream_acc": Accuracy.from_logits(logits, batch["labels"],
                                                                                            shift=True)})
    metrics = t.evaluate(rows)
    # direct computation over the whole set, one sequence at a time (no padding involved)
    total, count, correct = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
            correct += int((logits.argmax(-1) == ids[0, 1:]).sum())
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["eval_acc"] == pytest.approx(correct / count) and metrics["eval_stream_acc"] == pytest.approx(
        correct / count)
    # predictions are argmax ids (not logits), padded with -100 across batches of different widths
    assert seen["pred"].shape == (11, 11) and seen["pred"].dtype.kind == "i"
    padded = seen["pred"] == -100
    assert padded.any() and (seen["labels"][padded] == -100).all()
    pred = t.predict(rows)
    assert np.array_equal(pred.predictions, seen["pred"]) and np.array_equal(pred.label_ids, seen["labels"])
    assert pred.metrics["test_loss"] == pytest.approx(metrics["eval_loss"])
    assert pred.metrics["test_acc"] == metrics["eval_acc"] and "test_stream_acc" in pred.metrics


def test_streaming_metrics_alone_keep_no_predictions(tmp_path):
    model, rows = _lm_and_data()
    t = Trainer(model=model, args=_args(tmp_path), data_collator=DataCollatorForLanguageModeling(pad_token_id=0),
                streaming_metrics=lambda b, o: {"accuracy": Accuracy.from_logits(o, b["labels"], shift=True)})
    metrics = t.evaluate(rows)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_loss" in metrics


# -- clear errors, raised before anything runs ----------------------------------------------------


def _assert_nothing_ran(t, events, tmp_path):
    assert events.events == [] and t.train_state is None and t.state.global_step == 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_labels_error_names_key_and_present_ones(tmp_path):
    events = _Events()
    rows = [{"x": r["x"]} for r in make_dataset()]
    t = Trainer(model=make_model(), args=_args(tmp_path), train_dataset=rows, callbacks=[events])
    with pytest.raises(ValueError, match=r"no 'labels', which TinyClassifier's loss needs; keys present after "
                                         r"collation: \['x'\]"):
        t.train()
    _assert_nothing_ran(t, events, tmp_path)
    # the same data with compute_loss_func: it needs labels too
    t = Trainer(model=make_model(), args=_args(tmp_path), train_dataset=rows,
                compute_loss_func=lambda out, labels, num_items_in_batch=None: out["logits"].sum())
    with pytest.raises(ValueError, match="no 'labels'"):
        t.train()


def test_string_column_reaching_the_collator_is_named(tmp_path):
    events = _Events()
    t = Trainer(model=make_model(), args=_args(tmp_path, remove_unused_columns=False), train_dataset=make_dataset(),
                callbacks=[events])
    with pytest.raises(CollateError, match="'unused'"):
        t.train()
    _assert_nothing_ran(t, events, tmp_path)
    # with remove_unused_columns=True (default) the text column is dropped and training runs
    Trainer(model=make_model(), args=_args(tmp_path), train_dataset=make_dataset()).train()


def test_ragged_lists_without_padding_collator_are_named(tmp_path):
    events = _Events()
    model, rows = _lm_and_data()
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows]
    t = Trainer(model=model, args=_args(tmp_path), train_dataset=rows, callbacks=[events])
    with pytest.raises(CollateError, match=r"column 'input_ids' has values of different lengths.*does not pad"):
        t.train()
    _assert_nothing_ran(t, events, tmp_path)


def test_empty_datasets_are_named(tmp_path):
    t = Trainer(model=make_model(), args=_args(tmp_path), train_dataset=[])
    with pytest.raises(ValueError, match="the train_dataset is empty"):
        t.train()
    with pytest.raises(ValueError, match="the eval_dataset is empty"):
        t.evaluate([])


class _Stream(tud.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_iterable_dataset_needs_max_steps(tmp_path):
    rows = make_dataset(n=24)
    for r in rows:
        r.pop("unused")
    t = Trainer(model=make_model(), args=_args(tmp_path, max_steps=-1), train_dataset=_Stream(rows))
    with pytest.raises(ValueError, match="has no length.*set max_steps"):
        t.train()
    t = Trainer(model=make_model(), args=_args(tmp_path, max_steps=3), train_dataset=_Stream(rows))
    assert t.train().global_step == 3
    t = Trainer(model=make_model(), args=_args(tmp_path, max_steps=3), train_dataset=_Stream([]))
    with pytest.raises(ValueError, match="dataset is empty"):
        t.train()


def test_first_batch_check_leaves_random_state_unchanged(tmp_path):
    import random

    from functrain.data.collators import DataCollatorForLanguageModeling as Collator

    model, rows = _lm_and_data()
    collator = Collator(pad_token_id=0, mlm=True, seed=3, mask_token_id=1, vocab_size=32)
    t = Trainer(model=model, args=_args(tmp_path), train_dataset=rows, data_collator=collator)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), collator.generator.get_state())
    t._check_first_batch(rows)
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1]) and torch.equal(states[3], collator.generator.get_state())
