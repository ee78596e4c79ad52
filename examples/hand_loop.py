"""A research-style hand loop over the pure step: a tiny GPT-2 on generated token data.

    python examples/hand_loop.py             # eager, about 10 s on a laptop CPU
    python examples/hand_loop.py --compile   # one torch.compile graph (compiling takes a minute or two on CPU)
    python examples/hand_loop.py --steps 30  # quicker

What it shows: no Trainer at all. The model, the optimizer (a chain of pure gradient
transformations with the schedule inside) and a ``TrainState`` are built by hand, and the loop is
``state, metrics = train_step(state, batch)``. Metrics are tensors: reading them (``float(...)``)
is the only host sync, so it happens on logging steps only. ``tests/test_examples.py`` unit-tests
the step built here the way the design notes sketch it: build a state, call the step twice on
the same batch, compare.

The data is a toy language: each sequence counts up modulo the vocabulary from a random start,
so the loss should fall well below log(vocab) within a hundred steps.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import functrain as ft
from functrain.step.train import make_eval_step, make_train_step

VOCAB = 64


def make_batch(gen: torch.Generator, batch_size: int, seq_len: int, vocab: int = VOCAB) -> dict:
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    ids = (start + torch.arange(seq_len)) % vocab
    return {"input_ids": ids, "labels": ids.clone()}


def make_model(seq_len: int, seed: int = 0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


def make_optimizer(lr: float, total_steps: int, warmup: int = 10) -> ft.optim.GradientTransformation:
    def schedule(count):  # linear warmup then linear decay, as a function of a 0-d tensor
        up = (count + 1) / warmup
        down = (total_steps - count) / max(total_steps - warmup, 1)
        return lr * torch.clamp(torch.minimum(up, down), min=0.0)

    return ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(schedule, weight_decay=0.01))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = make_model(args.seq_len, args.seed)
    tx = make_optimizer(args.lr, args.steps)
    state = ft.TrainState.create(model, tx, seed=args.seed)
    train_step = make_train_step(model, tx, accumulate=args.accumulate, precision=args.precision,
                                 compile=args.compile, donate=True)
    eval_step = make_eval_step(model, precision=args.precision, compile=args.compile)

    gen = torch.Generator().manual_seed(args.seed)
    logged = []  # (step, loss) read on logging steps only
    for i in range(args.steps):
        state, metrics = train_step(state, make_batch(gen, args.batch_size, args.seq_len))
        if (i + 1) % args.log_every == 0 or i == 0:  # reading a metric is the only host sync
            logged.append((int(state.step), float(metrics["loss"])))
            print(f"step {logged[-1][0]:4d}  loss {logged[-1][1]:.4f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}  lr {float(metrics['learning_rate']):.2e}")
    held_out = make_batch(torch.Generator().manual_seed(args.seed + 1), 32, args.seq_len)
    eval_loss = float(eval_step(state, held_out)["loss"])
    print(f"eval loss {eval_loss:.4f}")
    return {"state": state, "logged": logged, "eval_loss": eval_loss}


if __name__ == "__main__":
    main()
