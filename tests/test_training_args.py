import json

import pytest

from functrain.trainer.args import Seq2SeqTrainingArguments, TrainingArguments, TrainingArgumentsError


def test_hf_defaults(tmp_path):
    from transformers import TrainingArguments as HFArgs

    ours, theirs = TrainingArguments(str(tmp_path)), HFArgs(str(tmp_path))
    for name in ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
                 "adam_epsilon", "max_grad_norm", "seed", "logging_steps", "save_steps", "save_strategy",
                 "eval_strategy", "logging_strategy", "optim", "lr_scheduler_type", "remove_unused_columns",
                 "load_best_model_at_end", "dataloader_drop_last", "logging_first_step"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a == getattr(b, "value", b), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(fp16=True, bf16=True), "both"),
    (dict(learning_rate=-1e-3), "learning_rate must be >= 0"),
    (dict(optim="adamw_8bit_magic"), "known: .*adamw_torch"),
    (dict(lr_scheduler_type="zigzag"), "known schedule"),
    (dict(eval_strategy="sometimes"), "eval_strategy='sometimes'"),
    (dict(load_best_model_at_end=True), "needs evaluations"),
    (dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"), "match"),
    (dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=5), "multiple of eval_steps"),
    (dict(save_strategy="best"), "eval_strategy='no'"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be >= 1"),
    (dict(gradient_accumulation_steps=1.5), "integer"),
    (dict(max_steps=0), "max_steps"),
    (dict(adam_beta2=1.0), "adam_beta2"),
    (dict(report_to="swanlab"), "does not drive"),
    (dict(report_to="no_such_tracker"), "not a known tracker"),
    (dict(hub_strategy="sometimes"), "hub_strategy='sometimes'"),
    (dict(save_strategy="steps", save_steps=0), "save_steps must be > 0"),
    (dict(lr_scheduler_kwargs="{not json"), "lr_scheduler_kwargs"),
])
def test_validation_errors(tmp_path, kwargs, match):
    with pytest.raises(TrainingArgumentsError, match=match):
        TrainingArguments(str(tmp_path), **kwargs)


def test_derived_defaults(tmp_path):
    a = TrainingArguments(str(tmp_path), load_best_model_at_end=True, eval_strategy="steps", eval_steps=5,
                          save_steps=10)
    assert a.metric_for_best_model == "loss" and a.greater_is_better is False
    b = TrainingArguments(str(tmp_path), metric_for_best_model="accuracy")
    assert b.greater_is_better is True
    c = TrainingArguments(str(tmp_path), eval_strategy="steps", logging_steps=7)
    assert c.eval_steps == 7  # falls back on logging_steps, as in transformers
    assert TrainingArguments(str(tmp_path), report_to="none").report_to == []
    assert TrainingArguments(str(tmp_path), report_to="all").report_to == [
        "tensorboard", "mlflow", "wandb", "trackio", "comet_ml", "clearml"]
    assert TrainingArguments(str(tmp_path), bf16=True).precision == "bf16"
    assert TrainingArguments(str(tmp_path), warmup_steps=0.1).get_warmup_steps(95) == 10
    assert TrainingArguments(str(tmp_path), warmup_ratio=0.2).get_warmup_steps(10) == 2
    assert TrainingArguments(str(tmp_path), warmup_steps=3).get_warmup_steps(10) == 3


def test_json_round_trip(tmp_path):
    a = TrainingArguments(str(tmp_path), learning_rate=3e-4, lr_scheduler_kwargs={"num_cycles": 2},
                          label_names=["labels"], report_to="tensorboard", eval_strategy="epoch")
    path = tmp_path / "training_args.json"
    a.save_to_json(str(path))
    d = json.loads(path.read_text())
    assert d["learning_rate"] == 3e-4 and d["report_to"] == ["tensorboard"]
    b = TrainingArguments.from_json(str(path))
    assert b == a
    with pytest.raises(TrainingArgumentsError, match="unknown TrainingArguments field"):
        TrainingArguments.from_dict({**d, "not_a_field": 1})


def test_seq2seq_args(tmp_path):
    a = Seq2SeqTrainingArguments(str(tmp_path), predict_with_generate=True, generation_max_length=20,
                                 generation_num_beams=2)
    path = tmp_path / "a.json"
    a.save_to_json(str(path))
    assert Seq2SeqTrainingArguments.from_json(str(path)).generation_num_beams == 2
