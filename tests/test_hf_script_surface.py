"""What transformers' example scripts touch besides training: their arguments built with
``HfArgumentParser`` (the same command lines, JSON files and dicts, with the same meaning), and the
attributes they read off the arguments and the Trainer."""

import json
from dataclasses import dataclass, field

import pytest

from functrain import Seq2SeqTrainingArguments, TrainingArguments

transformers = pytest.importorskip("transformers")
HfArgumentParser = transformers.HfArgumentParser


@dataclass
class ModelArguments:  # as in run_clm.py
    model_name_or_path: str = field(default="gpt2")
    block_size: int | None = field(default=None)


COMMAND_LINE = ["--output_dir", "out", "--learning_rate", "1e-4", "--bf16", "--use_cpu", "--eval_strategy", "steps",
                "--eval_steps", "5", "--report_to", "none", "--lr_scheduler_type", "cosine", "--optim", "adafactor",
                "--gradient_checkpointing", "--save_total_limit", "2", "--per_device_train_batch_size", "4",
                "--gradient_accumulation_steps", "2", "--num_train_epochs", "3", "--warmup_steps", "0.1",
                "--optim_target_modules", "all-linear", "--no_remove_unused_columns",
                "--model_name_or_path", "tiny", "--block_size", "64"]


def test_an_example_scripts_command_line_parses_as_transformers_does(tmp_path):
    ours_model, ours = HfArgumentParser((ModelArguments, TrainingArguments)).parse_args_into_dataclasses(COMMAND_LINE)
    _, theirs = HfArgumentParser((ModelArguments, transformers.TrainingArguments)).parse_args_into_dataclasses(
        COMMAND_LINE)
    assert isinstance(ours, TrainingArguments) and ours_model.block_size == 64
    for name in ("output_dir", "learning_rate", "bf16", "eval_steps", "save_total_limit", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "num_train_epochs", "warmup_steps", "optim_target_modules",
                 "remove_unused_columns", "report_to"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.gradient_checkpointing is True and theirs.gradient_checkpointing is True  # a bare flag is True
    for name in ("eval_strategy", "lr_scheduler_type", "optim"):  # HF keeps enums, functrain their values
        assert getattr(ours, name) == getattr(getattr(theirs, name), "value", getattr(theirs, name)), name


def test_every_shared_field_parses_like_transformers():
    ours = {a.dest: a for a in HfArgumentParser(TrainingArguments)._actions}
    theirs = {a.dest: a for a in HfArgumentParser(transformers.TrainingArguments)._actions}
    shared = (set(ours) & set(theirs)) - {"help"}
    assert len(shared) > 100
    for dest in sorted(shared):
        o, h = ours[dest], theirs[dest]
        # the same flags (a bare --x, --no_x), arity and default; HF's enum fields add choices
        assert (o.option_strings, o.nargs, o.const, o.default) == (h.option_strings, h.nargs, h.const, h.default), dest


def test_json_files_and_dicts_parse(tmp_path):
    settings = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "fsdp": "full_shard auto_wrap",
                "model_name_or_path": "x"}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(settings))
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    for _, args in (parser.parse_json_file(str(path)), parser.parse_dict(settings)):
        assert args.per_device_train_batch_size == 4 and args.sharded


def test_seq2seq_arguments_parse():
    (args,) = HfArgumentParser(Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--predict_with_generate", "--generation_max_length", "32", "--generation_num_beams", "2"])
    assert args.predict_with_generate is True and args.generation_max_length == 32 and args.generation_num_beams == 2


def test_the_attributes_scripts_read_off_the_arguments_exist_with_hf_values(tmp_path):
    ours, theirs = TrainingArguments(str(tmp_path)), transformers.TrainingArguments(str(tmp_path), use_cpu=True)
    assert ours.default_optim == theirs.default_optim == ours.optim
    assert ours.place_model_on_device is True  # (transformers 5.24 returns None here)
    assert ours.parallel_mode.value == theirs.parallel_mode.value == "not_parallel"
    assert ours.ddp_timeout_delta == theirs.ddp_timeout_delta
    hf_members = {n for n in dir(transformers.TrainingArguments) if not n.startswith("_")}
    assert hf_members - set(dir(TrainingArguments)) <= {"is_torch_greater_or_equal_than_2_8"}


def test_the_trainer_attributes_scripts_read_exist_with_hf_values(tmp_path):
    from _trainer_fixtures import make_dataset, make_model

    from functrain import Trainer, TrainerCallback

    model, data = make_model(), make_dataset()
    ours = Trainer(model=model, args=TrainingArguments(str(tmp_path / "ours"), report_to="none", max_steps=2),
                   train_dataset=data)
    theirs = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        str(tmp_path / "hf"), report_to="none", use_cpu=True), train_dataset=data)
    for name in ("is_in_train", "is_deepspeed_enabled", "is_fsdp_enabled", "is_model_parallel", "neftune_noise_alpha",
                 "current_flos"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.model_wrapped is ours.model and theirs.model_wrapped is theirs.model
    assert ours.place_model_on_device is True

    seen = []

    class During(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(ours.is_in_train)

    ours.add_callback(During())
    ours.train()
    assert seen == [True, True] and ours.is_in_train is False
