"""Peak memory of evaluation: functrain streaming / argmax paths vs transformers Trainer.evaluate().

A tiny GPT-2 with a 32k vocabulary, 2,000 sequences of 128 tokens (the HF Trainer keeps every
logit: 2,000 x 128 x 32,000 fp32 = 32.8 GB if nothing stops it; with eval_accumulation_steps
unset it accumulates on the device). Each variant runs in its own subprocess and reports its peak
RSS (``ru_maxrss``), so one run's allocations cannot hide another's.

Usage:
    python benchmarks/eval_memory.py [--num-seqs 2000 --seq-len 128 --vocab 32000 --batch-size 8]
Writes benchmarks/results/eval_memory.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(vocab: int, seq_len: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _rows(n: int, seq_len: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


def run_variant(variant: str, a) -> dict:
    import numpy as np
    import torch

    model = _model(a.vocab, a.seq_len)
    rows = _rows(a.num_seqs, a.seq_len, a.vocab)
    if variant == "hf":
        import datasets
        import transformers

        ds = datasets.Dataset.from_list(rows)
        args = transformers.TrainingArguments("/tmp/eval_memory_hf", per_device_eval_batch_size=a.batch_size,
                                              report_to="none", use_cpu=True)
        collator = transformers.DataCollatorForLanguageModeling(_hf_tokenizer(a.vocab), mlm=False)

        def compute_metrics(p):
            return {"n": float(np.asarray(p.predictions).size)}

        trainer = transformers.Trainer(model=model, args=args, eval_dataset=ds, data_collator=collator,
                                       compute_metrics=compute_metrics)
        metrics = trainer.evaluate()
        loss = metrics["eval_loss"]
    else:
        import functrain
        from functrain.data.collators import DataCollatorForLanguageModeling
        from functrain.data.loader import ResumableLoader
        from functrain.evaluation import evaluation_loop
        from functrain.metrics import Accuracy
        from functrain.step import make_eval_step

        state = functrain.TrainState.create(model, functrain.optim.identity())
        step = make_eval_step(model, return_outputs=True)
        loader = ResumableLoader(rows, batch_size=a.batch_size, shuffle=False,
                                 collate_fn=DataCollatorForLanguageModeling(pad_token_id=0))
        kwargs = {}
        if variant == "streaming":
            kwargs["streaming_metrics"] = lambda b, o: {
                "accuracy": Accuracy.from_logits(o, b["labels"], shift=True)}
        else:  # argmax: the HF compute_metrics path with preprocess_logits_for_metrics
            kwargs["compute_metrics"] = lambda p: {"n": float(p.predictions.size)}
            kwargs["preprocess_logits_for_metrics"] = lambda logits, labels: logits.argmax(-1)
        with torch.no_grad():
            out = evaluation_loop(step, state, loader, **kwargs)
        loss = out.metrics["eval_loss"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_rss_mb": peak_mb, "eval_loss": float(loss)}


def _hf_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` ids, id 0 doubling as pad (same as our collator), built locally."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")
    return fast


def baseline_mb() -> float:
    code = "import torch, transformers, datasets, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).strip())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variant", choices=["hf", "streaming", "argmax"])
    p.add_argument("--variants", default="streaming,argmax,hf")
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["--num-seqs", str(a.num_seqs), "--seq-len", str(a.seq_len), "--vocab", str(a.vocab),
              "--batch-size", str(a.batch_size)]
    results = {"config": vars(a) | {"variant": None}, "import_baseline_mb": baseline_mb(), "runs": {}}
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--variant", v, *common], env=env, text=True,
                             capture_output=True)
        if out.returncode != 0:
            results["runs"][v] = {"error": out.stderr[-2000:]}
            print(f"{v}: failed\n{out.stderr[-2000:]}")
            continue
        results["runs"][v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:>10}: peak RSS {results['runs'][v]['peak_rss_mb']:.0f} MB, eval_loss {results['runs'][v]['eval_loss']:.5f}")
    hf = results["runs"].get("hf", {}).get("peak_rss_mb")
    base = results["import_baseline_mb"]
    for v in ("streaming", "argmax"):
        mine = results["runs"].get(v, {}).get("peak_rss_mb")
        if hf and mine:
            results[f"ratio_hf_over_{v}"] = hf / mine
            results[f"ratio_hf_over_{v}_above_imports"] = (hf - base) / max(mine - base, 1.0)
            print(f"HF Trainer.evaluate() peak / functrain {v} peak: {hf / mine:.1f}x "
                  f"({(hf - base) / max(mine - base, 1.0):.1f}x above the {base:.0f} MB import baseline)")
    out_path = ROOT / "benchmarks" / "results" / "eval_memory.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
