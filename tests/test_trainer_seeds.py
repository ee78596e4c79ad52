"""The seeds' quickstarts (/work/shared/seeds/000_*: sections 1, 4, 5, 6 and resume) with only the
import of Trainer/TrainingArguments changed, on tiny models built from configs and local data."""

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("functrain.step")
pytest.importorskip("functrain.data")

from transformers import AutoModelForCausalLM, DataCollatorWithPadding, DefaultDataCollator  # noqa: E402

from functrain import Trainer, TrainingArguments  # noqa: E402  (the only changed import)
from functrain import TrainerCallback  # noqa: E402  (test scaffolding only)


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "good", "great", "fine", "bad", "awful", "poor", "movie", "the", "was", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _text_dataset(n, seed):
    rng = np.random.default_rng(seed)
    pos, neg = ["good", "great", "fine"], ["bad", "awful", "poor"]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(pos if label else neg, size=int(rng.integers(1, 4))))
        texts.append(" ".join(words + ["the", "movie", "was"]))  # sentiment first: the pooled token
        labels.append(label)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def _classifier(num_labels=2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.AutoModelForSequenceClassification.from_config(cfg)


def compute_metrics(eval_pred):
    logits = eval_pred.predictions if hasattr(eval_pred, "predictions") else eval_pred[0]
    labels = eval_pred.label_ids if hasattr(eval_pred, "label_ids") else eval_pred[1]
    preds = np.argmax(logits, axis=-1)
    return {"accuracy": float((preds == labels).mean())}


@pytest.fixture
def text_setup(tmp_path):
    tok = _tokenizer(tmp_path)
    ds = datasets.DatasetDict({"train": _text_dataset(48, 0), "test": _text_dataset(16, 1)})

    def preprocess(batch):
        return tok(batch["text"], truncation=True)

    tok_ds = ds.map(preprocess, batched=True, remove_columns=["text"])
    if "label" in tok_ds["train"].column_names and "labels" not in tok_ds["train"].column_names:
        tok_ds = tok_ds.rename_column("label", "labels")
    return tok, tok_ds["train"].shuffle(seed=42), tok_ds["test"]


def test_seed1_text_classification_and_seed6_predict(tmp_path, text_setup):
    tok, train_ds, eval_ds = text_setup
    model = _classifier()
    collator = DataCollatorWithPadding(tokenizer=tok)
    args = TrainingArguments(output_dir=str(tmp_path / "out_cls"), learning_rate=1e-3, per_device_train_batch_size=8,
                             num_train_epochs=5, weight_decay=0.01, eval_strategy="no", save_strategy="no",
                             load_best_model_at_end=False, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                      data_collator=collator, compute_metrics=compute_metrics)
    before = trainer.evaluate()
    out = trainer.train()
    metrics = trainer.evaluate()
    assert out.global_step == 30 and metrics["eval_loss"] < before["eval_loss"]
    assert metrics["eval_accuracy"] >= 0.75
    trainer.save_model(str(tmp_path / "out_cls" / "final"))
    final = tmp_path / "out_cls" / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (final / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    batch = collator([eval_ds[i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trainer.model.eval()(**batch).logits)

    # 6) evaluate/predict-only
    pred = trainer.predict(trainer.eval_dataset)
    assert pred.predictions.shape == (16, 2) and pred.metrics["test_accuracy"] == metrics["eval_accuracy"]


class CustomLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits

        # Example: multi-label BCE loss (labels should be float multi-hot)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

        return (loss, outputs) if return_outputs else loss


def test_seed5_custom_loss_override(tmp_path, text_setup):
    tok, train_ds, eval_ds = text_setup
    to_multi_hot = lambda ex: {"labels": [float(ex["labels"]), 1.0 - float(ex["labels"])]}  # noqa: E731
    train_ds, eval_ds = train_ds.map(to_multi_hot), eval_ds.map(to_multi_hot)
    trainer = CustomLossTrainer(model=_classifier(), args=TrainingArguments(
        str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=8, num_train_epochs=2, save_strategy="no",
        report_to="none", disable_tqdm=True), train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer=tok))
    start = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    end = trainer.evaluate()["eval_loss"]
    assert end < start and 0 < result.training_loss < 1.0
    # the override is the loss: BCE of the final model on the eval set equals eval_loss
    batch = DataCollatorWithPadding(tokenizer=tok)([eval_ds[i] for i in range(len(eval_ds))])
    with torch.no_grad():
        labels = batch.pop("labels")
        bce = torch.nn.functional.binary_cross_entropy_with_logits(trainer.model.eval()(**batch).logits, labels)
    assert end == pytest.approx(float(bce), rel=1e-4)


def test_seed4_image_classification_with_transform(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(24):
        label = i % 3
        arr = (rng.random((20, 20, 3)) * 80).astype(np.uint8)
        arr[..., label] += 150  # the label is the dominant colour
        images.append(Image.fromarray(arr))
        labels.append(label)
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}).train_test_split(test_size=6, seed=0)
    ds = datasets.DatasetDict({"train": ds["train"], "validation": ds["test"]})
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3))

    def transform(example):
        # with_transform passes a batch (lists). The seed's per-example version ([0], raw "image"
        # kept) fails with transformers' own Trainer too, so this keeps only the model's inputs.
        enc = processor(example["image"], return_tensors="pt")
        return {"pixel_values": enc["pixel_values"], "labels": example["label"]}

    train_ds = ds["train"].with_transform(transform)
    eval_ds = ds["validation"].with_transform(transform)
    args = TrainingArguments(output_dir=str(tmp_path / "out_vit"), per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, num_train_epochs=2, learning_rate=5e-3,
                             eval_strategy="epoch", save_strategy="epoch", remove_unused_columns=False,
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=processor, data_collator=DefaultDataCollator())
    trainer.train()
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["epoch"] for h in evals] == [1.0, 2.0, 2.0]
    assert sorted(os.listdir(tmp_path / "out_vit")) >= ["checkpoint-3", "checkpoint-6"]
    assert (tmp_path / "out_vit" / "checkpoint-6" / "preprocessor_config.json").is_file()


class _StopAt(TrainerCallback):
    """Stops training after ``step`` steps, as an interruption would (the schedule is unchanged)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_and_causal_lm_from_pretrained(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    rng = np.random.default_rng(0)
    rows = [{"input_ids": list(rng.integers(0, 32, size=8)), "labels": None} for _ in range(24)]
    data = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])

    def run(out, stop=None, resume=None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        args = TrainingArguments(str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 num_train_epochs=2, learning_rate=1e-2, save_steps=2, logging_steps=1,
                                 report_to="none", disable_tqdm=True)
        t = Trainer(model=model, args=args, train_dataset=data, callbacks=[_StopAt(stop)] if stop else None)
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=3)
    resumed = run(tmp_path / "part", resume=True)
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    ckpt = tmp_path / "full" / "checkpoint-6"
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, full.model.eval()(x).logits)
