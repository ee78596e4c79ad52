"""Seq2SeqTrainer on a tiny T5 built from a config: training with DataCollatorForSeq2Seq, and
predict_with_generate checked against model.generate and against transformers.Seq2SeqTrainer."""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from functrain import Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402
from functrain.data.collators import DataCollatorForSeq2Seq  # noqa: E402

PAD, EOS = 0, 1


def _t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                                d_kv=8, dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD,
                                eos_token_id=EOS)
    return transformers.T5ForConditionalGeneration(cfg)


def _data(n, seed):
    """Reverse the input: ragged lengths, so padding differs across batches."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ids = [int(t) for t in rng.integers(2, 32, size=int(rng.integers(2, 6)))]
        rows.append({"input_ids": ids + [EOS], "labels": ids[::-1] + [EOS]})
    return datasets.Dataset.from_list(rows)


def _args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=6, learning_rate=1e-2, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, predict_with_generate=True,
                generation_max_length=8, generation_num_beams=2)
    return Seq2SeqTrainingArguments(str(tmp_path / "out"), **{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2s")
    model = _t5()
    seen = []

    def compute_metrics(p):
        seen.append((p.predictions.copy(), p.label_ids.copy()))
        return {"exact": float((p.predictions == p.label_ids).all(-1).mean())}

    trainer = Seq2SeqTrainer(model=model, args=_args(tmp), train_dataset=_data(16, 0), eval_dataset=_data(6, 1),
                             data_collator=DataCollatorForSeq2Seq(pad_token_id=PAD, model=model),
                             compute_metrics=compute_metrics)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = trainer.train()
    return trainer, before, out, seen, tmp


def _direct_generate(model, dataset, batch_size, **kwargs):
    collate = DataCollatorForSeq2Seq(pad_token_id=PAD, model=model)
    rows = [dataset[i] for i in range(len(dataset))]
    model.eval()
    with torch.no_grad():
        return [model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kwargs)
                for b in (collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))]


def _assert_matches(predictions, direct, width):
    assert predictions.shape == (sum(len(d) for d in direct), width)
    row = 0
    for d in direct:
        block = predictions[row: row + len(d)]
        assert np.array_equal(block[:, : d.shape[1]], d.numpy())
        assert (block[:, d.shape[1]:] == PAD).all()  # right-padded with the pad token
        row += len(d)


def test_training_with_seq2seq_collator_changes_params_and_lowers_loss(trained):
    trainer, before, out, _, _ = trained
    assert out.global_step == 6 and np.isfinite(out.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_predict_with_generate_equals_model_generate_on_trained_params(trained):
    trainer, _, _, seen, _ = trained
    seen.clear()
    pred = trainer.predict(trainer.eval_dataset)
    direct = _direct_generate(copy.deepcopy(trainer.model), trainer.eval_dataset, 4, max_length=8, num_beams=2)
    # padded to the model generation config's max_length (20 by default), like transformers
    _assert_matches(pred.predictions, direct, 20)
    assert pred.label_ids.shape == (6, 20) and (pred.label_ids[:, 6:] == PAD).all()
    # compute_metrics saw the generated ids and the labels, not logits
    assert len(seen) == 1 and np.array_equal(seen[0][0], pred.predictions)
    assert np.array_equal(seen[0][1], pred.label_ids)
    assert {"test_loss", "test_exact", "test_runtime"} <= set(pred.metrics)


def test_gen_kwargs_override_args_in_evaluate(trained):
    trainer, _, _, seen, _ = trained
    seen.clear()
    metrics = trainer.evaluate(max_new_tokens=3, num_beams=1)
    direct = _direct_generate(copy.deepcopy(trainer.model), trainer.eval_dataset, 4, max_new_tokens=3, num_beams=1)
    _assert_matches(seen[0][0], direct, 20)
    assert "eval_exact" in metrics
    seen.clear()
    trainer.evaluate()  # the next call is back to the args' settings (max_length=8, beams=2)
    _assert_matches(seen[0][0], _direct_generate(copy.deepcopy(trainer.model), trainer.eval_dataset, 4,
                                                 max_length=8, num_beams=2), 20)


def test_same_arrays_and_loss_as_transformers_seq2seq_trainer(trained):
    trainer, _, _, _, tmp = trained
    ours = trainer.predict(trainer.eval_dataset)
    model = copy.deepcopy(trainer.model)
    hf_args = transformers.Seq2SeqTrainingArguments(str(tmp / "hf"), per_device_eval_batch_size=4, report_to="none",
                                                    use_cpu=True, predict_with_generate=True,
                                                    generation_max_length=8, generation_num_beams=2)
    hf = transformers.Seq2SeqTrainer(model=model, args=hf_args,
                                     data_collator=DataCollatorForSeq2Seq(pad_token_id=PAD, model=model))
    theirs = hf.predict(trainer.eval_dataset)
    assert np.array_equal(ours.predictions, theirs.predictions)
    assert np.array_equal(ours.label_ids, theirs.label_ids)
    # HF averages per-batch means (weighted by examples); ours weights by label tokens, so compare
    # against the token-weighted mean computed here directly.
    collate = DataCollatorForSeq2Seq(pad_token_id=PAD, model=model)
    batch = collate([trainer.eval_dataset[i] for i in range(6)])
    with torch.no_grad():
        direct = model.eval()(**batch).loss
    assert ours.metrics["test_loss"] == pytest.approx(float(direct), rel=1e-5)


def test_generation_config_argument_replaces_the_models(tmp_path):
    config = transformers.GenerationConfig(max_length=6, num_beams=2, decoder_start_token_id=PAD, pad_token_id=PAD,
                                           eos_token_id=EOS)
    model = _t5()
    trainer = Seq2SeqTrainer(model=model, args=_args(tmp_path, generation_config=config, generation_max_length=None,
                                                     generation_num_beams=None),
                             data_collator=DataCollatorForSeq2Seq(pad_token_id=PAD, model=model))
    assert model.generation_config.max_length == 6 and model.generation_config is not config
    pred = trainer.predict(_data(5, 2))
    direct = _direct_generate(copy.deepcopy(model), _data(5, 2), 4, generation_config=config)
    _assert_matches(pred.predictions, direct, 6)


def test_prediction_loss_only_and_no_generate_errors(tmp_path):
    model = _t5()
    calls = []
    original = model.generate
    model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer = Seq2SeqTrainer(model=model, args=_args(tmp_path), eval_dataset=_data(5, 2),
                             data_collator=DataCollatorForSeq2Seq(pad_token_id=PAD, model=model))
    metrics = trainer.evaluate()  # no compute_metrics: loss only, as transformers (no generate calls)
    assert "eval_loss" in metrics and not calls
    with pytest.raises(ValueError, match="needs a model with generate"):
        Seq2SeqTrainer(model=torch.nn.Linear(2, 2), args=_args(tmp_path))
