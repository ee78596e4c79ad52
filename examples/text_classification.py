"""Sequence classification: a tiny BERT learns the sentiment of short sentences, "not" included.

    python examples/text_classification.py                     # about a minute on 2 CPU cores
    python examples/text_classification.py --quick             # a few seconds (fewer epochs)
    python examples/text_classification.py --output-dir runs/cls --epochs 8

What it shows: the Hugging Face text-classification recipe with only the Trainer import changed.
A local JSON Lines file (``examples/data/sentiment.jsonl``, regenerate it with
``examples/data/make_sentiment.py``) is loaded with ``datasets.load_dataset("json", ...)``; a
word-level tokenizer is trained on it with ``tokenizers`` and wrapped in
``PreTrainedTokenizerFast``; the model is a ``BertForSequenceClassification`` built from a tiny
config (nothing is downloaded); batches are padded by ``DataCollatorWithPadding``;
``compute_metrics`` reports accuracy after every epoch. The saved model and tokenizer load back
with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from datasets import load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerFast

from functrain import Trainer, TrainingArguments

DATA = Path(__file__).with_name("data") / "sentiment.jsonl"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def train_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on ``texts``, adding ``[CLS] ... [SEP]`` like BERT's."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                               ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def make_model(vocab_size: int, seed: int = 0) -> BertForSequenceClassification:
    import torch

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    return BertForSequenceClassification(config)


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/text_classification")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--quick", action="store_true", help="4 epochs of 10 larger steps: well above chance, in seconds")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_size, args.learning_rate = 4, 32, 5e-3
    logging.getLogger("transformers").setLevel(logging.ERROR)

    # 1. Data: a local file through datasets, split 80/20, tokenized.
    raw = load_dataset("json", data_files=str(DATA), split="train").train_test_split(test_size=0.2, seed=args.seed)
    tokenizer = train_tokenizer(raw["train"]["text"])
    tokenized = raw.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True,
                        remove_columns=["text"])

    # 2. Model and Trainer, as with transformers.
    model = make_model(len(tokenizer), args.seed)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        warmup_steps=5,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=10,
        seed=args.seed,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["test"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()  # model + tokenizer in output_dir, loadable with from_pretrained
    print(f"eval accuracy {metrics['eval_accuracy']:.3f} on {len(tokenized['test'])} held-out sentences")
    return {"trainer": trainer, "metrics": metrics, "tokenizer": tokenizer}


if __name__ == "__main__":
    main()
