"""Sequence to sequence: a tiny T5 learns to reverse strings, evaluated by generating.

    python examples/seq2seq.py             # a few minutes on 2 CPU cores
    python examples/seq2seq.py --quick     # seconds (learns only part of the task)

What it shows: the Hugging Face ``Seq2SeqTrainer`` recipe with only the import changed.
``Seq2SeqTrainingArguments(predict_with_generate=True)`` makes evaluation call
``model.generate`` (up to ``generation_max_length`` tokens, ``generation_num_beams`` beams), so
``compute_metrics`` receives generated token ids and can score whole answers (here: exact match
and per-character accuracy). The data is generated (random letter strings and their reverses),
the tokenizer is a character-level ``tokenizers`` WordLevel model built locally and the model is a
``T5ForConditionalGeneration`` from a tiny config; ``DataCollatorForSeq2Seq`` pads the inputs and
the labels (with -100) and builds ``decoder_input_ids``.
"""

from __future__ import annotations

import argparse
import logging
import random

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from functrain import Seq2SeqTrainer, Seq2SeqTrainingArguments

LETTERS = "abcdefghij"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's order: pad 0 (also the decoder start), eos 1
MAX_LEN = 8


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per letter; every sequence ends with ``</s>``."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(LETTERS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def reverse_task(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    sources = ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, MAX_LEN - 2))) for _ in range(n)]
    return Dataset.from_dict({"source": sources, "target": [s[::-1] for s in sources]})


def make_model(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                      num_decoder_layers=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, relative_attention_num_buckets=8)
    return T5ForConditionalGeneration(config)


def make_compute_metrics(tokenizer):
    def compute_metrics(eval_pred):
        preds, labels = eval_pred
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded_preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
        preds_text = [p.replace(" ", "") for p in decoded_preds]
        labels_text = [t.replace(" ", "") for t in decoded_labels]
        exact = np.mean([p == t for p, t in zip(preds_text, labels_text)])
        chars = np.mean([sum(a == b for a, b in zip(p, t)) / len(t) for p, t in zip(preds_text, labels_text)])
        return {"exact_match": float(exact), "char_accuracy": float(chars)}

    return compute_metrics


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/seq2seq")
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="a few hundred examples, 3 epochs")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size = 3, 320
    logging.getLogger("transformers").setLevel(logging.ERROR)

    tokenizer = make_tokenizer()

    def preprocess(batch):
        enc = tokenizer(batch["source"])
        enc["labels"] = tokenizer(batch["target"])["input_ids"]
        return enc

    columns = ["source", "target"]
    train_ds = reverse_task(args.train_size, args.seed).map(preprocess, batched=True, remove_columns=columns)
    eval_ds = reverse_task(64, args.seed + 1).map(preprocess, batched=True, remove_columns=columns)
    model = make_model(len(tokenizer), args.seed)

    training_args = Seq2SeqTrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        warmup_steps=10,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=10,
        predict_with_generate=True,
        generation_max_length=MAX_LEN,
        generation_num_beams=1,
        seed=args.seed,
        report_to="none",
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=make_compute_metrics(tokenizer),
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    sample = tokenizer.batch_decode(trainer.predict(eval_ds.select(range(4))).predictions, skip_special_tokens=True)
    print(f"eval exact match {metrics['eval_exact_match']:.3f}, char accuracy {metrics['eval_char_accuracy']:.3f}")
    print("reversed samples:", [s.replace(" ", "") for s in sample])
    return {"trainer": trainer, "metrics": metrics}


if __name__ == "__main__":
    main()
