"""Peak memory of evaluation: functrain streaming / argmax paths vs transformers Trainer.evaluate().

A tiny GPT-2 with a 32k vocabulary, 2,000 sequences of 128 tokens. Variants, each in its own
subprocess reporting its peak RSS (``ru_maxrss``), so one run's allocations cannot hide another's:

* ``streaming``: functrain ``evaluation_loop`` with a streaming accuracy (mergeable metric).
* ``argmax``: functrain, HF-style ``compute_metrics`` + ``preprocess_logits_for_metrics`` (argmax).
* ``hf``: ``transformers.Trainer.evaluate()`` with a ``compute_metrics`` and nothing else: it keeps
  every logit (2,000 x 128 x 32,000 fp32 = 32.8 GB; ``eval_accumulation_steps`` unset). A
  watchdog stops it once its RSS passes ``--hf-cap-mb`` and records how many batches it got through.
* ``hf_argmax``: the HF Trainer with ``preprocess_logits_for_metrics`` (argmax), the fair match for
  ``argmax``.
* ``hf_loss``: the HF Trainer without ``compute_metrics``, ``prediction_loss_only=True`` (loss only).
* ``trainer_loss`` / ``trainer_argmax``: functrain's Trainer in the same two bounded modes, the
  fair match for ``hf_loss`` / ``hf_argmax`` (same model, data, collator and arguments).

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
    if variant.startswith("hf"):
        import datasets
        import transformers

        ds = datasets.Dataset.from_list(rows)
        args = transformers.TrainingArguments("/tmp/eval_memory_hf", per_device_eval_batch_size=a.batch_size,
                                              report_to="none", use_cpu=True,
                                              prediction_loss_only=variant == "hf_loss")
        collator = transformers.DataCollatorForLanguageModeling(_hf_tokenizer(a.vocab), mlm=False)

        def compute_metrics(p):
            return {"n": float(np.asarray(p.predictions).size)}

        cap = _RssCap(a.hf_cap_mb)
        extra = {}
        if variant != "hf_loss":
            extra["compute_metrics"] = compute_metrics
        if variant == "hf_argmax":
            extra["preprocess_logits_for_metrics"] = lambda logits, labels: logits.argmax(-1)
        trainer = transformers.Trainer(model=model, args=args, eval_dataset=ds, data_collator=collator,
                                       callbacks=[cap], **extra)
        try:
            loss = trainer.evaluate()["eval_loss"]
        except _CapExceeded as e:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return {"variant": variant, "peak_rss_mb": peak_mb, "eval_loss": None, "stopped_at_cap_mb": a.hf_cap_mb,
                    "batches_done": e.batches, "num_batches": -(-a.num_seqs // a.batch_size)}
    elif variant.startswith("trainer"):
        loss = _functrain_trainer_loss(variant, model, rows, a)
    else:
        import functrain
        from functrain.data.collators import DataCollatorForLanguageModeling
        from functrain.data.loader import ResumableLoader
        from functrain.trainer.evaluation import evaluation_loop
        from functrain.core.metrics import Accuracy
        from functrain.step.train import make_eval_step

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


def _functrain_trainer_loss(variant: str, model, rows, a) -> float:
    """``Trainer.evaluate()`` of functrain in HF's bounded modes: loss only, or argmax predictions."""
    import datasets
    import numpy as np

    from functrain.data.collators import DataCollatorForLanguageModeling
    from functrain.trainer.args import TrainingArguments
    from functrain.trainer.trainer import Trainer

    args = TrainingArguments("/tmp/eval_memory_functrain", per_device_eval_batch_size=a.batch_size, report_to=[],
                             prediction_loss_only=variant == "trainer_loss")
    extra = {}
    if variant == "trainer_argmax":
        extra = {"compute_metrics": lambda p: {"n": float(np.asarray(p.predictions).size)},
                 "preprocess_logits_for_metrics": lambda logits, labels: logits.argmax(-1)}
    trainer = Trainer(model=model, args=args, eval_dataset=datasets.Dataset.from_list(rows),
                      data_collator=DataCollatorForLanguageModeling(pad_token_id=0), **extra)
    return trainer.evaluate()["eval_loss"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _CapExceeded(RuntimeError):
    def __init__(self, batches: int):
        super().__init__(f"RSS cap exceeded after {batches} batches")
        self.batches = batches


def _RssCap(cap_mb: float):
    """A TrainerCallback stopping evaluation once the process RSS passes ``cap_mb`` (so a run that
    would need 33 GB does not take the machine down)."""
    import transformers

    class RssCap(transformers.TrainerCallback):
        batches = 0

        def on_prediction_step(self, args, state, control, **kwargs):
            self.batches += 1
            if _rss_mb() > cap_mb:
                raise _CapExceeded(self.batches)

    return RssCap()


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
    p.add_argument("--variant", choices=["hf", "hf_argmax", "hf_loss", "streaming", "argmax", "trainer_loss",
                                         "trainer_argmax"])
    p.add_argument("--variants", default="streaming,argmax,trainer_loss,trainer_argmax,hf_loss,hf_argmax,hf")
    p.add_argument("--hf-cap-mb", type=float, default=6000.0, help="stop the full-logits HF run above this RSS")
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = ["--num-seqs", str(a.num_seqs), "--seq-len", str(a.seq_len), "--vocab", str(a.vocab),
              "--batch-size", str(a.batch_size), "--hf-cap-mb", str(a.hf_cap_mb)]
    results = {"config": vars(a) | {"variant": None}, "import_baseline_mb": baseline_mb(), "runs": {},
               "loadavg_at_start": list(os.getloadavg())}
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--variant", v, *common], env=env, text=True,
                             capture_output=True)
        if out.returncode != 0:
            results["runs"][v] = {"error": out.stderr[-2000:]}
            print(f"{v}: failed\n{out.stderr[-2000:]}")
            continue
        r = results["runs"][v] = json.loads(out.stdout.strip().splitlines()[-1])
        loss = "stopped" if r["eval_loss"] is None else f"{r['eval_loss']:.5f}"
        note = (f" (stopped at the {r['stopped_at_cap_mb']:.0f} MB cap after {r['batches_done']}/{r['num_batches']} "
                "batches)" if "batches_done" in r else "")
        print(f"{v:>10}: peak RSS {r['peak_rss_mb']:.0f} MB, eval_loss {loss}{note}")
    _ratios(results, a)
    out_path = ROOT / "benchmarks" / "results" / "eval_memory.json"
    results["machine"] = _machine()
    results["loadavg_at_end"] = list(os.getloadavg())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {out_path}")


def _ratios(results: dict, a) -> None:
    runs, base = results["runs"], results["import_baseline_mb"]

    def peak(v):
        return runs.get(v, {}).get("peak_rss_mb")

    for hf_v, ours in (("hf", "streaming"), ("hf", "argmax"), ("hf_argmax", "argmax"), ("hf_loss", "streaming"),
                       ("hf_loss", "trainer_loss"), ("hf_argmax", "trainer_argmax")):
        hf, mine = peak(hf_v), peak(ours)
        if not (hf and mine):
            continue
        stopped = "batches_done" in runs[hf_v]
        projected = None
        if stopped and hf_v == "hf":  # kept logits grow linearly with batches: project to the whole set
            frac = runs[hf_v]["batches_done"] / runs[hf_v]["num_batches"]
            projected = base + (hf - base) / frac
            results[f"projected_{hf_v}_peak_mb"] = projected
        key = f"ratio_{hf_v}_over_{ours}"
        results[key] = hf / mine
        results[key + "_above_imports"] = (hf - base) / max(mine - base, 1.0)
        bound = ">= " if stopped else ""
        print(f"{hf_v} peak / functrain {ours} peak: {bound}{hf / mine:.1f}x ({bound}{results[key + '_above_imports']:.1f}x "
              f"above the {base:.0f} MB import baseline)"
              + (f"; projected full-set peak {projected / 1024:.1f} GB" if projected else ""))
    hf_loss = runs.get("hf_loss", {}).get("eval_loss")
    ours = runs.get("streaming", {}).get("eval_loss")
    if hf_loss and ours:
        results["eval_loss_ratio_hf_over_ours"] = hf_loss / ours
        print(f"eval_loss HF / functrain = {hf_loss / ours:.6f} (seq_len-1)/seq_len = {(a.seq_len - 1) / a.seq_len:.6f}: "
              "HF divides GPT2LMHeadModel's shifted loss sum by the unshifted label count (docs/benchmarks.md)")


def _machine() -> dict:
    import platform

    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
