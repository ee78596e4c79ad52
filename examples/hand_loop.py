"""A research-style hand loop over the pure step: a tiny GPT-2 on generated token data.

    python examples/hand_loop.py             # eager, about 10 s on a laptop CPU
    python examples/hand_loop.py --compile   # one torch.compile graph (compiling takes a minute or two on CPU)

The data is a toy language: each sequence counts up modulo the vocabulary from a random start,
so the loss should fall well below log(vocab) within a hundred steps.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import functrain as ft
from functrain.step import make_eval_step, make_train_step


def make_batch(gen: torch.Generator, batch_size: int, seq_len: int, vocab: int) -> dict:
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    ids = (start + torch.arange(seq_len)) % vocab
    return {"input_ids": ids, "labels": ids.clone()}


def main(argv=None):
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
    torch.manual_seed(args.seed)
    vocab = 64
    config = GPT2Config(vocab_size=vocab, n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config)

    def schedule(count):  # linear warmup then linear decay, as a function of a 0-d tensor
        warmup = 10
        up = (count + 1) / warmup
        down = (args.steps - count) / (args.steps - warmup)
        return args.lr * torch.clamp(torch.minimum(up, down), min=0.0)

    tx = ft.optim.chain(ft.optim.clip_by_global_norm(1.0), ft.optim.adamw(schedule, weight_decay=0.01))
    state = ft.TrainState.create(model, tx, seed=args.seed)
    train_step = make_train_step(model, tx, accumulate=args.accumulate, precision=args.precision,
                                 compile=args.compile, donate=True)
    eval_step = make_eval_step(model, precision=args.precision, compile=args.compile)

    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.steps):
        state, metrics = train_step(state, make_batch(gen, args.batch_size, args.seq_len, vocab))
        if (i + 1) % args.log_every == 0 or i == 0:  # reading a metric is the only host sync
            print(f"step {int(state.step):4d}  loss {float(metrics['loss']):.4f}  "
                  f"grad_norm {float(metrics['grad_norm']):.3f}  lr {float(metrics['learning_rate']):.2e}")
    held_out = make_batch(torch.Generator().manual_seed(args.seed + 1), 32, args.seq_len, vocab)
    print(f"eval loss {float(eval_step(state, held_out)['loss']):.4f}")
    return state


if __name__ == "__main__":
    main()
