"""Image classification: a tiny ViT learns scikit-learn's bundled handwritten digits (no download).

    python examples/image_classification.py            # about a minute on 2 CPU cores
    python examples/image_classification.py --quick    # seconds: 2 epochs
    python examples/image_classification.py --output-dir runs/digits --epochs 10

What it shows: the Hugging Face image recipe. The 8x8 digit images become a ``datasets.Dataset``
with an ``image`` column (PIL images) and a ``label`` column; ``with_transform`` builds
``pixel_values`` from the raw images each time a batch is read, which only works with
``remove_unused_columns=False`` (otherwise the Trainer would drop ``image``, a column the model's
``forward`` does not take, before the transform could see it). The model is a
``ViTForImageClassification`` built from a tiny config: 2x2 patches, one channel.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from transformers import DefaultDataCollator, ViTConfig, ViTForImageClassification

from functrain import Trainer, TrainingArguments

PIXEL_MAX = 16.0  # load_digits pixels are 0..16


def digits_dataset(seed: int = 0):
    """The 1797 digits as an image dataset, split 80/20 (stratified by label)."""
    digits = load_digits()
    images = [PILImage.fromarray((img * (255 / PIXEL_MAX)).astype(np.uint8), mode="L") for img in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return ds.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")


def transform(batch):
    """Raw PIL images -> normalized ``pixel_values`` (N, 1, 8, 8); ``label`` -> ``labels``."""
    pixels = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in batch["image"]])
    return {"pixel_values": torch.from_numpy((pixels - 0.5) / 0.5).unsqueeze(1),
            "labels": torch.tensor(batch["label"])}


def make_model(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96, num_labels=10,
                       id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    return ViTForImageClassification(config)


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/image_classification")
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--quick", action="store_true", help="2 epochs: well above chance, in seconds")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    splits = digits_dataset(args.seed)
    train_ds = splits["train"].with_transform(transform)  # pixel_values are built when a batch is read
    eval_ds = splits["test"].with_transform(transform)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=2 if args.quick else args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.learning_rate,
        warmup_steps=10,
        weight_decay=0.05,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=10,
        remove_unused_columns=False,  # IMPORTANT: the transform needs the raw "image" column
        seed=args.seed,
        report_to="none",
    )
    trainer = Trainer(model=make_model(args.seed), args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DefaultDataCollator(), compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    print(f"eval accuracy {metrics['eval_accuracy']:.3f} on {len(eval_ds)} held-out digits (chance: 0.1)")
    return {"trainer": trainer, "metrics": metrics}


if __name__ == "__main__":
    main()
