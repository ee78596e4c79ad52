"""The demo: a small GPT-2 learns to write Python, trained on this machine's own standard library.

``functrain demo`` needs no download: its corpus is the source of the Python standard library that
runs it (every machine with Python has it), read as bytes, so the vocabulary is the 256 byte
values. It trains a transformers ``GPT2LMHeadModel`` built from a config with the functrain
``Trainer`` (evaluation, checkpoints, progress bar, JSONL and TensorBoard logs), draws the loss
curves to a PNG and ends with a generated sample. Running it again resumes from the newest
checkpoint instead of starting over.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sysconfig
from pathlib import Path

import torch

PROMPT = "def "


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    # the model: a small GPT-2
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    # the data: the standard library's source as bytes
    corpus_bytes: int = 2_000_000
    eval_fraction: float = 0.02
    seq_len: int = 128
    batch_size: int = 16
    # training
    max_steps: int = 600
    learning_rate: float = 2e-3
    seed: int = 0
    torch_compile: bool = False
    # what it reports: eval loss, logs, a sample
    eval_steps: int = 200
    logging_steps: int = 20
    sample_tokens: int = 124

    @classmethod
    def quick(cls, output_dir: str) -> "DemoConfig":
        """Tiny settings for tests: seconds, not minutes."""
        return cls(output_dir=output_dir, max_steps=12, seq_len=32, batch_size=4, n_layer=1, n_embd=32,
                   n_head=2, corpus_bytes=40_000, eval_steps=6, logging_steps=3, sample_tokens=20)


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the standard library's top-level ``.py`` files, in name order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise FileNotFoundError("found no .py files in the Python standard library folder")
    chunks, total = [], 0
    for path in files:
        data = Path(path).read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def make_datasets(config: DemoConfig):
    """Train and eval ``datasets.Dataset``s of non-overlapping byte windows (labels = inputs)."""
    from datasets import Dataset

    data = torch.frombuffer(bytearray(stdlib_corpus(config.corpus_bytes)), dtype=torch.uint8).long()
    n_windows = len(data) // config.seq_len
    windows = data[: n_windows * config.seq_len].view(n_windows, config.seq_len)
    n_eval = max(1, int(n_windows * config.eval_fraction))
    train, evals = windows[:-n_eval], windows[-n_eval:]

    def to_dataset(t):
        ids = t.tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")

    return to_dataset(train), to_dataset(evals)


def make_model(config: DemoConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt_config = GPT2Config(
        vocab_size=256, n_positions=config.seq_len, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, bos_token_id=10, eos_token_id=10, pad_token_id=0,
    )
    return GPT2LMHeadModel(gpt_config)


def generate_sample(model, config: DemoConfig) -> str:
    """Sample ``sample_tokens`` bytes after ``PROMPT`` (seeded, so reruns print the same text)."""
    model.eval()
    prompt = torch.tensor([list(PROMPT.encode())])
    # GPT-2 has n_positions = seq_len learned positions: never generate past them.
    new_tokens = min(config.sample_tokens, config.seq_len - prompt.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            do_sample=True, top_k=20, temperature=0.8, pad_token_id=0,
        )
    window = out[0, : config.seq_len]
    return bytes(window.tolist()).decode("utf-8", errors="replace")


def run_demo(config: DemoConfig) -> dict:
    """Train (or resume), evaluate, plot and sample. Returns a summary dict."""
    from functrain.io.plot import plot_run
    from functrain.trainer.trainer import Trainer
    from functrain.trainer.args import TrainingArguments

    train_ds, eval_ds = make_datasets(config)
    model = make_model(config)
    args = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, config.max_steps // 20),
        weight_decay=0.1,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        report_to=["tensorboard"],
        seed=config.seed,
        torch_compile=config.torch_compile,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
    resume = _has_checkpoint(config.output_dir)
    if resume:
        print(f"Resuming from the newest checkpoint in {config.output_dir}")
    train_output = trainer.train(resume_from_checkpoint=True if resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(config.output_dir, "final"))
    png = plot_run(config.output_dir)
    sample = generate_sample(trainer.model, config)
    print(f"\neval loss {metrics['eval_loss']:.3f} (bits per byte {metrics['eval_loss'] / 0.6931:.2f})")
    print(f"curves: {png}\nmodel: {os.path.join(config.output_dir, 'final')}\n")
    print("sample:\n" + "-" * 60 + f"\n{sample}\n" + "-" * 60)
    return {"train": train_output, "eval": metrics, "plot": str(png), "sample": sample, "resumed": resume}


def _has_checkpoint(output_dir: str) -> bool:
    return any(p.is_dir() for p in Path(output_dir).glob("checkpoint-*"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--compile", action="store_true", help="compile the train step with torch.compile")
    parser.add_argument("--quick", action="store_true", help="tiny settings that finish in seconds")


def main_from_args(ns: argparse.Namespace) -> dict:
    config = DemoConfig.quick(ns.output_dir) if ns.quick else DemoConfig(output_dir=ns.output_dir)
    if not ns.quick:
        config.max_steps = ns.max_steps
    config.torch_compile = ns.compile
    return run_demo(config)
