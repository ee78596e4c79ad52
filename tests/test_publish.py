"""log_metrics / save_metrics and the model card, compared with what transformers writes for the
same metrics and log history (transformers' own functions are the reference)."""

import json
import types

import pytest

from functrain.trainer.args import TrainingArguments
from functrain.trainer.trainer import Trainer

from _trainer_fixtures import make_dataset, make_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / "tiny-model"
    args = TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2,
                             logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no",
                             report_to="none", disable_tqdm=True, seed=3, warmup_steps=2,
                             gradient_accumulation_steps=2)
    trainer = Trainer(model=make_model(), args=args, train_dataset=make_dataset(),
                      eval_dataset=make_dataset(n=8, seed=5))
    result = trainer.train()
    return trainer, result.metrics, trainer.evaluate()


def _hf_self(output_dir):
    """The attributes transformers' log_metrics / save_metrics read from a Trainer."""
    return types.SimpleNamespace(is_world_process_zero=lambda: True,
                                 args=types.SimpleNamespace(output_dir=str(output_dir)))


def test_log_metrics_prints_what_transformers_prints(trained, capsys):
    from transformers.trainer_pt_utils import log_metrics as hf_log_metrics

    trainer, train_metrics, _ = trained
    hf_log_metrics(_hf_self("unused"), "train", train_metrics)
    want = capsys.readouterr().out
    trainer.log_metrics("train", train_metrics)
    got = capsys.readouterr().out
    assert got == want and got.startswith("***** train metrics *****\n  epoch ")
    assert "train_runtime            = 0:00:" in got


def test_save_metrics_writes_the_files_transformers_writes(trained, tmp_path):
    from transformers.trainer_pt_utils import save_metrics as hf_save_metrics

    trainer, train_metrics, eval_metrics = trained
    out = trainer.args.output_dir
    trainer.save_metrics("train", train_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_metrics("test", {"test_loss": 1.5}, combined=False)
    hf_save_metrics(_hf_self(tmp_path), "train", train_metrics)
    hf_save_metrics(_hf_self(tmp_path), "eval", eval_metrics)
    hf_save_metrics(_hf_self(tmp_path), "test", {"test_loss": 1.5}, combined=False)
    for name in ("train_results.json", "eval_results.json", "test_results.json", "all_results.json"):
        assert (tmp_path / name).read_text() == open(f"{out}/{name}").read(), name
    merged = json.loads(open(f"{out}/all_results.json").read())
    assert merged == {**train_metrics, **eval_metrics}  # test_ was saved with combined=False


def test_model_card_has_hfs_results_table_hyperparameters_and_versions(trained):
    from huggingface_hub import ModelCard
    from transformers.modelcard import make_markdown_table, parse_log_history

    trainer, _, _ = trained
    trainer.create_model_card(language="en", license="apache-2.0", dataset="generated")
    path = f"{trainer.args.output_dir}/README.md"
    text = open(path, encoding="utf-8").read()
    _, lines, eval_results = parse_log_history(trainer.state.log_history)
    assert len(lines) == 2  # evaluations at steps 3 and 6
    assert "### Training results\n\n" + make_markdown_table(lines) in text
    assert "\n".join(f"- {k}: {v:.4f}" for k, v in eval_results.items()) in text  # the final evaluation
    for line in ("# tiny-model", "This model was trained from scratch on the generated dataset.",
                 "- learning_rate: 0.05", "- train_batch_size: 4", "- eval_batch_size: 8", "- seed: 3",
                 "- gradient_accumulation_steps: 2", "- total_train_batch_size: 8",
                 "- optimizer: Use adamw_torch_fused with betas=(0.9,0.999) and epsilon=1e-08 and "
                 "optimizer_args=No additional optimizer arguments",
                 "- lr_scheduler_type: linear", "- lr_scheduler_warmup_steps: 2", "- training_steps: 6",
                 f"- Transformers {transformers.__version__}", "- Pytorch "):
        assert line in text, line
    card = ModelCard.load(path)
    assert card.data.library_name == "functrain" and card.data.license == "apache-2.0"
    assert card.data.tags == ["generated_from_trainer"] and card.data.language == ["en"]
